"""The study configs of configs/: each validates and plans exactly its own study.

Job counts are computed from each config with mergemix.config (partitions, units, seq
samples, engine batches), never written down by hand, so a config edit that changes the
study changes the expectation too. Also here: fix-one-partition mixtures (paper A.5),
user weights of the weighted proxy, and configs/paper.yaml read through the real
`datasets` loading path from local stand-ins of its hub datasets.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import re
import shlex
import subprocess
import sys

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergemix import config as mc, merge
from tests.conftest import REPO, make_checkpoint, stdlib_docstrings

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def snakemake(root, *args, timeout=300):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(root),
           "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def job_stats(output: str) -> dict[str, int]:
    """Rule -> job count from the first 'Job stats' table of `snakemake -n`."""
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        found = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not found:
            break
        counts[found[1]] = int(found[2])
    return counts


def expected_jobs(config: dict) -> dict[str, int]:
    """The jobs a study config implies, from mergemix.config's nouns."""
    parts = mc.partitions(config)
    units = {p: mc.units(config, p) for p in parts}
    mixtures = mc.mixtures(config)
    seq = mc.seq_mixtures(config, mixtures)
    large = mc.transfer_mixtures(config, mixtures)
    ood = config["eval"]["ood"]
    ood_files = [n for n, spec in ood.items() if "seed_heldout" not in spec["load"]]
    loads = [spec["load"] for spec in config["sources"].values()] + [config["seed"]["load"]]
    loads += [ood[n]["load"] for n in ood_files]
    demos = {load["demo"] for load in loads if "demo" in load}
    several = sum(1 for n in units.values() if n > 1)
    jobs = {
        "demo_corpus": len(demos),
        "partition": len(parts) + 1 + len(ood_files),
        "tokenizer": 1,
        "shards": len(parts) + 1,
        "shards_ood": len(ood_files),
        "data_table": 1,
        "seed": 1,
        "evaluate_seed": 1,
        "unit": sum(units.values()),
        "ind": several,
        "evaluate_ind": several,
        "evaluate_unit": len(parts) - several,
        "seq": len(seq),
        "evaluate_seq": len(seq),
        "score_merged": len(config["merge"]["methods"]) * len(mc.mixture_batches(config, mixtures)),
        "collect": 1,
        "rank": 1,
        # judged against seq models only where some are trained
        "analyze": 1 if seq else 0,
        "figures": 1 if seq else 0,
        "efficiency": 1 if seq else 0,
        "all": 1,
    }
    if config.get("transfer"):
        jobs.update(seed_large=1, seq_large=len(large), evaluate_seq_large=len(large), collect_transfer=1,
                    analyze_transfer=1)
    if config["decontaminate"]["enabled"]:
        jobs.update(eval_filter=1, decontaminate=len(parts), decontamination_table=1)
    if config["seed"]["pretrained"]:
        jobs["shards"] -= 1
        jobs["partition"] -= 1
    return {rule: n for rule, n in jobs.items() if n}


def test_configs_folder_has_every_study():
    names = {p.name for p in CONFIGS}
    assert {"paper.yaml", "study_5.1_k2.yaml", "study_5.1_k3.yaml", "study_5.2_uneven.yaml", "study_5.3_mixed.yaml",
            "study_A5_fix_one.yaml", "study_5.4_size_transfer.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_plans_exactly_its_study(path, tmp_path):
    """`snakemake --configfile X` plans X alone: the demo's config.yaml is not merged in."""
    config = mc.load(str(path))
    done = snakemake(tmp_path, "-n", "--configfile", str(path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    planned, expected = job_stats(done.stdout + done.stderr), expected_jobs(config)
    assert planned.pop("total") == sum(expected.values())
    assert planned == expected
    assert "is extended by additional config" not in done.stdout + done.stderr
    assert not (tmp_path / "work").exists()


def test_a_size_transfer_without_small_seq_models_still_scores_the_ind_models(tmp_path):
    """mean_ind and ind_id are proxies of the large seq models too: with mixtures.seq
    false they went missing from the transfer tables without a word."""
    config = mc.load(str(REPO / "configs/study_5.4_size_transfer.yaml"))
    config["mixtures"]["seq"] = False
    path = tmp_path / "transfer_noseq.yaml"
    path.write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "-n", "--configfile", str(path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    planned = job_stats(done.stdout + done.stderr)
    assert "seq" not in planned and planned["analyze_transfer"] == 1
    parts = mc.partitions(config)
    assert planned.get("evaluate_unit", 0) + planned.get("evaluate_ind", 0) == len(parts) > 0


def test_study_designs_match_the_paper():
    """What each study is for, checked on the config's own mixtures."""
    def load(name):
        return mc.load(str(REPO / "configs" / name))

    k2, k3 = load("study_5.1_k2.yaml"), load("study_5.1_k3.yaml")
    assert mc.partitions(k2) == mc.partitions(k3)
    n = len(mc.partitions(k2))
    assert len(mc.mixtures(k2)) == math.comb(n, 2) and len(mc.mixtures(k3)) == math.comb(n, 3)
    uneven = load("study_5.2_uneven.yaml")
    assert len({mc.units(uneven, p) for p in mc.partitions(uneven)}) >= 3  # 1, 2 and 3 units
    assert {"micro", "macro", "merged"} <= set(uneven["merge"]["methods"])
    mixed = load("study_5.3_mixed.yaml")
    owner = mc.partitions(mixed)
    assert any(len({owner[p] for p in mc.mixture_members(m)}) == 2 for m in mc.mixtures(mixed))
    fix = load("study_A5_fix_one.yaml")
    assert len(mc.mixtures(fix)) == len(mc.seq_mixtures(fix)) == 22  # the paper's 22 mixtures
    size = load("study_5.4_size_transfer.yaml")
    assert set(mc.transfer_mixtures(size)) <= set(mc.seq_mixtures(size))
    paper = load("paper.yaml")
    assert paper["transfer"] and paper["train"]["precision"] == "bf16" and paper["model"]["context_length"] == 2048


# --- fix-one-partition mixtures (paper A.5) ---------------------------------------------


def study(n: int, **mixtures) -> dict:
    """The shipped config with n one-unit partitions p00.. and the given mixtures keys."""
    config = mc.load(str(REPO / "config.yaml"))
    config["sources"]["sotu"]["partitions"] = {f"p{i:02d}": 1 for i in range(n)}
    config["mixtures"].update({"sample": None, "include": [], **mixtures})
    return config


@pytest.mark.parametrize("k, fixed", [(2, ["p03"]), (3, ["p03"]), (3, ["p00", "p07"])])
def test_fixed_partitions_are_in_every_mixture(k, fixed):
    config = study(9, k=k, fixed=fixed)
    mixtures = mc.mixtures(config)
    assert len(mixtures) == math.comb(9 - len(fixed), k - len(fixed)) == len(set(mixtures))
    for m in mixtures:
        members = mc.mixture_members(m)
        assert len(members) == k and set(fixed) <= set(members)
    # the varying members cover every subset of the other partitions
    others = {tuple(sorted(set(mc.mixture_members(m)) - set(fixed))) for m in mixtures}
    assert len(others) == len(mixtures)
    # a seeded sample keeps the fixed partitions too
    sampled = mc.mixtures(study(9, k=k, fixed=fixed, sample=4))
    assert len(sampled) == 4 and all(set(fixed) <= set(mc.mixture_members(m)) for m in sampled)


def test_no_fixed_key_keeps_the_old_mixtures():
    """Configs written before `mixtures.fixed` existed study the same mixtures."""
    config = study(8, k=2, sample=5)
    without = copy.deepcopy(config)
    del without["mixtures"]["fixed"]
    mc.validate(without)
    assert mc.mixtures(without) == mc.mixtures(config)


@pytest.mark.parametrize(
    "mixtures, expected",
    [
        ({"k": 2, "fixed": ["p99"]}, "mixtures.fixed names unknown partition 'p99': known partitions are p00, p01"),
        ({"k": 2, "fixed": ["p00", "p01"]}, "mixtures.fixed lists 2 partition(s) but mixtures.k is 2"),
        ({"k": 2, "fixed": ["p00"], "include": [["p01", "p02"]]}, "mixtures.include[0] lacks the fixed partition 'p00'"),
    ],
)
def test_bad_fixed_partitions_name_the_problem(mixtures, expected):
    with pytest.raises(mc.ConfigError) as err:
        mc.validate(study(4, **mixtures))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_unknown_fixed_partition_stops_snakemake_before_any_job(tmp_path):
    config = mc.load(str(REPO / "configs" / "study_A5_fix_one.yaml"))
    config["mixtures"]["fixed"] = ["1905s"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "-n", "--configfile", str(path))
    assert done.returncode != 0
    assert "config error: mixtures.fixed names unknown partition '1905s'" in done.stdout + done.stderr
    assert not (tmp_path / "work").exists()


# --- user weights of the weighted proxy ----------------------------------------------------


def planned_commands(root, config) -> list[str]:
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    done = snakemake(root, "-n", "-p", "--configfile", str(path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return [line.strip() for line in done.stdout.splitlines() if "mergemix.engine --method weighted" in line]


def flag_values(command: str, flag: str) -> list[str]:
    words = shlex.split(command.split(" > ")[0])
    return [words[i + 1] for i, word in enumerate(words) if word == flag]


def test_user_weights_reach_merge_weights(tmp_path):
    """merge.weights become the engine's --weight flags, and those its exact averaging weights."""
    config = study(4, k=2, sample=None)
    config["merge"].update(methods=["weighted"], weights={"p01": 3, "p02": 0.5})
    config["analysis"].update(figure_proxy="weighted", rank_by="weighted")  # proxies must be scored
    commands = planned_commands(tmp_path, config)
    assert len(commands) == len(mc.mixture_batches(config))
    by_mixture = {}
    for command in commands:
        assert "--tokens" not in command  # token counts are neither read nor needed
        groups = {}
        for partition, path in merge.parse_pairs(flag_values(command, "--model"), "--model"):
            groups.setdefault(partition, []).append(path)
        shares = merge.partition_shares([], flag_values(command, "--weight"))
        for mixture in flag_values(command, "--mixture"):
            members = mc.mixture_members(mixture)
            by_mixture[mixture] = merge.merge_weights("weighted", {p: groups[p] for p in members}, shares)
    unit = "work/models/unit/sotu/{}/0".format
    assert by_mixture["p01+p02"] == {unit("p01"): 3 / 3.5, unit("p02"): 0.5 / 3.5}
    assert by_mixture["p00+p01"] == {unit("p00"): 0.25, unit("p01"): 0.75}  # p00 unlisted: weight 1
    assert by_mixture["p00+p03"] == {unit("p00"): 0.5, unit("p03"): 0.5}
    assert len(by_mixture) == 6

    # without user weights the weighted method reads every partition's token count
    del config["merge"]["weights"]
    for command in planned_commands(tmp_path, config):
        assert "--weight" not in command
        assert flag_values(command, "--tokens")[0].endswith("/train.json")


def test_weighted_merge_with_user_weights_is_exact(tmp_path, tiny_model_config):
    a = make_checkpoint(tmp_path / "a", tiny_model_config, seed=1)
    b = make_checkpoint(tmp_path / "b", tiny_model_config, seed=2)
    out = tmp_path / "merged"
    assert merge.main(["--method", "weighted", "--model", f"a={tmp_path / 'a'}", "--model", f"b={tmp_path / 'b'}",
                       "--weight", "a=3", "--weight", "b=1", "--out", str(out)]) == 0
    side = json.loads((out / "mergemix.json").read_text())
    assert side["weights"] == {str(tmp_path / "a"): 0.75, str(tmp_path / "b"): 0.25}
    merged = load_file(out / "model.safetensors")
    for name, tensor in a.state_dict().items():
        expected = tensor.float() * 0.75 + b.state_dict()[name].float() * 0.25
        assert torch.equal(merged[name], expected), name


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--weight", "a=0"], "--weight 0: expected a positive number"),
        (["--weight", "a=heavy"], "--weight heavy: expected a positive number"),
        (["--weight", "a=1", "--tokens", "b=5"], "either --tokens or --weight"),
    ],
)
def test_bad_weights_are_refused(tmp_path, tiny_model_config, capsys, flags, expected):
    make_checkpoint(tmp_path / "a", tiny_model_config, seed=1)
    make_checkpoint(tmp_path / "b", tiny_model_config, seed=2)
    code = merge.main(["--method", "weighted", "--model", f"a={tmp_path / 'a'}", "--model", f"b={tmp_path / 'b'}",
                       *flags, "--out", str(tmp_path / "merged")])
    assert code == 1 and expected in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_weights_of_unknown_partitions_are_refused():
    config = study(3, k=2)
    config["merge"]["weights"] = {"p00": 2, "p77": 1}
    with pytest.raises(mc.ConfigError, match="merge.weights names unknown partition 'p77'"):
        mc.validate(config)


def test_transfer_sample_is_inside_the_seq_sample():
    config = study(10, k=2, seq_sample=12, include=[["p08", "p09"]])
    config["transfer"] = copy.deepcopy(mc.load(str(REPO / "configs" / "study_5.4_size_transfer.yaml"))["transfer"])
    config["transfer"]["seq_sample"] = 5
    seq, large = mc.seq_mixtures(config), mc.transfer_mixtures(config)
    assert "p08+p09" in large and set(large) <= set(seq) and len(large) < len(seq)
    # the same seeded ranking: the large sample is the seq sample of that size
    smaller = copy.deepcopy(config)
    smaller["mixtures"]["seq_sample"] = 5
    assert large == mc.seq_mixtures(smaller)
    config["transfer"]["model"]["num_heads"] = 7
    with pytest.raises(mc.ConfigError, match=r"transfer.model.hidden_size \(256\) must be divisible"):
        mc.validate(config)


# --- configs/paper.yaml through `datasets`, from local stand-ins of its hub datasets -------

# Hub dataset -> local stand-in folder; each stand-in has the hub dataset's columns, and a
# README whose `configs:` metadata gives `load_dataset(folder, name=..., split=...)` the
# same configurations and splits as the hub.
STANDINS = {"claran/modular-s2orc": "standins/modular-s2orc",
            "claran/m2d2-wiki-decon-parquet": "standins/m2d2-wiki",
            "allenai/paloma": "standins/paloma"}
KEEP = {"sources": ["s2orc_bio_2019", "s2orc_cs_2017", "wiki_mass_media", "wiki_visual_arts"],
        "ood": ["c4_en", "ptb"]}
TEXT_OF = {"Biology,2019-2019": "typing", "ComputerScience,2017-2017": "inspect",
           "Culture_and_the_arts__Mass_media": "pathlib", "Culture_and_the_arts__Visual_arts": "tarfile",
           "c4_en": "email/message", "ptb": "http/client"}
SEED_MODULES = ["argparse", "subprocess", "logging/__init__"]


def write_jsonl_gz(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def write_readme(folder, configs: dict[str, tuple[str, str]]):
    """A dataset card whose metadata declares each configuration's split and files."""
    meta = {"configs": [{"config_name": name, "data_files": [{"split": split, "path": files}]}
                        for name, (split, files) in configs.items()]}
    (folder / "README.md").write_text("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n")


def write_standins(root, texts):
    s2orc = root / STANDINS["claran/modular-s2orc"]
    for name in ("Biology,2019-2019", "ComputerScience,2017-2017"):
        field, years = name.split(",")
        write_jsonl_gz(s2orc / name / "train" / f"{field}-{years[:4]}.gz-0000.json.gz", [
            {"added": "2024-01-01", "attributes": {"bff_contained_ngram_count": 0}, "created": "2019-01-01",
             "id": f"{field}-{i}", "metadata": {"extfieldsofstudy": [field], "provenance": "s2orc", "s2fieldsofstudy": [field],
                                                "sha1": f"{i:040x}", "year": int(years[:4])},
             "source": "s2orc", "text": text, "version": "v1"} for i, text in enumerate(texts[TEXT_OF[name]])])
    write_readme(s2orc, {n: ("train", f"{n}/train/*.json.gz") for n in ("Biology,2019-2019", "ComputerScience,2017-2017")})
    wiki = root / STANDINS["claran/m2d2-wiki-decon-parquet"]
    names = ("Culture_and_the_arts__Mass_media", "Culture_and_the_arts__Visual_arts")
    for name in names:
        (wiki / name).mkdir(parents=True)
        pl.DataFrame({"text": texts[TEXT_OF[name]]}).write_parquet(wiki / name / "train-00000-of-00001.parquet")
    write_readme(wiki, {n: ("train", f"{n}/train-*.parquet") for n in names})
    paloma = root / STANDINS["allenai/paloma"]
    for name in ("c4_en", "ptb"):
        write_jsonl_gz(paloma / name / "val" / "val_0.jsonl.gz", [
            {"text": t, "id": str(i), "added": "2023-01-01", "source": name, "metadata": "{}"}
            for i, t in enumerate(texts[TEXT_OF[name]])])
    write_readme(paloma, {n: ("val", f"{n}/val/*.jsonl.gz") for n in ("c4_en", "ptb")})
    # C4 files matched by both of paper.yaml's seed patterns (00000-00009, 00010-00015)
    for number, module in zip((0, 1, 10), SEED_MODULES):
        write_jsonl_gz(root / f"standins/c4/en/c4-train.{number:05d}-of-01024.json.gz", [
            {"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"}
            for i, t in enumerate(texts[module])])


def standin_config(root) -> dict:
    """paper.yaml with hub names pointed at the stand-ins, a few sources, a BPE trained here."""
    text = (REPO / "configs" / "paper.yaml").read_text()
    for hub, local in STANDINS.items():
        text = text.replace(f"path: {hub},", f"path: {local},")
    text = text.replace("hf://datasets/allenai/c4/", "standins/c4/")
    config = yaml.safe_load(text)
    config["sources"] = {s: config["sources"][s] for s in KEEP["sources"]}
    config["eval"]["ood"] = {o: config["eval"]["ood"][o] for o in KEEP["ood"]}
    config["tokenizer"].update(name=None, vocab_size=512)  # the hub's tokenizer is out of reach
    config["mixtures"].update(seq_sample=None)
    config["transfer"]["seq_sample"] = None
    mc.validate(config)
    return config


@pytest.mark.slow
def test_paper_config_reads_its_datasets_through_datasets(tmp_path):
    """Every kind of load in paper.yaml (hub configuration by name, split `val`, C4 files
    by glob pattern) runs through `datasets` on stand-ins with the hub datasets' columns."""
    modules = sorted(set(TEXT_OF.values()) | set(SEED_MODULES))
    texts = stdlib_docstrings(modules)
    write_standins(tmp_path, texts)
    path = tmp_path / "paper_standin.yaml"
    config = standin_config(tmp_path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = snakemake(tmp_path, "--configfile", str(path), "--until", "shards", "shards_ood", timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    def docs(group, name):
        return pl.read_parquet(tmp_path / f"work/partitions/{group}/{name}.parquet")["text"].to_list()

    for source, spec in config["sources"].items():
        (partition,) = spec["partitions"]
        # the configuration named in `load.name`, and only it, became the partition
        assert docs(source, partition) == texts[TEXT_OF[spec["load"]["name"]]], source
        side = json.loads((tmp_path / f"work/tokens/{source}/{partition}/train.json").read_text())
        assert side["n_tokens"] > 0
    for name in KEEP["ood"]:
        assert docs("ood", name) == texts[TEXT_OF[name]]
        assert json.loads((tmp_path / f"work/tokens/ood/{name}/heldout.json").read_text())["n_tokens"] > 0
    # both seed patterns matched: all three C4 stand-in files
    assert sorted(docs("seed", "seed")) == sorted(t for m in SEED_MODULES for t in texts[m])
