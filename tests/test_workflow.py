"""The whole Snakefile, end to end, on a tiny config and local files of real text."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import polars as pl
import pytest
import yaml

from tests.conftest import CACHE, REPO

pytestmark = pytest.mark.slow

MODULES = {
    "seedtext": ["argparse", "subprocess", "inspect", "tarfile", "logging/__init__"],
    "ood": ["email/message", "http/client"],
    "alpha": ["typing"],
    "beta": ["pathlib"],
    "gamma": ["collections/__init__", "functools"],
}


def tiny_config(root) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(cache_dir=str(CACHE))
    config["sources"] = {
        "docs": {
            "load": {"path": "json", "data_files": ["data/docs.jsonl"], "split": "train"},
            "text_column": "body",
            "partition_by": ["topic"],
            "rename": {"typing": "alpha", "pathlib": "beta", "collections": "gamma", "functools": "gamma"},
            "partitions": {"alpha": 1, "beta": 1, "gamma": 2},
            "heldout_fraction": 0.15,
        }
    }
    config["seed"].update(load={"path": "json", "data_files": ["data/seed.jsonl"], "split": "train"}, text_column="body")
    config["eval"].update(
        ood={"netdocs": {"load": {"path": "parquet", "data_files": ["data/ood.parquet"]}, "text_column": "body"},
             "seedheld": {"load": {"seed_heldout": True}, "text_column": "body"}},
        max_docs=40, max_tokens=3000, max_tokens_id=1500, batch_size=8,
    )
    config["decontaminate"].update(against=["netdocs", "seedheld"])
    config["tokenizer"].update(vocab_size=512, segment_chars=1500)
    config["model"].update(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, context_length=32)
    config["train"].update(unit_tokens=1500)
    config["train"]["seed_phase"].update(tokens=6000, batch_size=4, warmup_steps=5)
    config["train"]["continued"].update(batch_size=4, warmup_steps=2)
    config["mixtures"].update(k=2, sample=None)
    config["merge"].update(methods=["micro", "macro", "weighted", "merged"])
    return config


def write_data(root, texts_by_module):
    data = root / "data"
    data.mkdir()
    with open(data / "docs.jsonl", "w") as fh:
        for part in ("alpha", "beta", "gamma"):
            for module in MODULES[part]:
                for doc in texts_by_module[module]:
                    fh.write(json.dumps({"body": doc, "topic": module.split("/")[0]}) + "\n")
    with open(data / "seed.jsonl", "w") as fh:
        for module in MODULES["seedtext"]:
            for doc in texts_by_module[module]:
                fh.write(json.dumps({"body": doc}) + "\n")
    pl.DataFrame({"body": [d for m in MODULES["ood"] for d in texts_by_module[m]]}).write_parquet(data / "ood.parquet")


def snakemake(root, *args, timeout=900, env=None):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(root),
           "--cores", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def complete_run(root):
    """Write the tiny study into `root` and run it to the end, each job seeing only the
    packages its rule's conda environment declares (tests/test_envs.py)."""
    from tests.conftest import stdlib_docstrings
    from tests.test_envs import with_rule_environments

    write_data(root, stdlib_docstrings([m for ms in MODULES.values() for m in ms]))
    (root / "config.yaml").write_text(yaml.safe_dump(tiny_config(root)))
    done = snakemake(root, env=with_rule_environments())
    assert done.returncode == 0, done.stderr[-4000:]
    return root


@pytest.fixture(scope="module")
def run(tiny_workflow):
    return tiny_workflow


def test_every_model_domain_pair_is_scored_consistently(run):
    table = pl.read_csv(run / "results/perplexity.csv", schema_overrides={"method": pl.Utf8, "model_id": pl.Utf8})
    assert table.columns == ["model_kind", "model_id", "mixture", "method", "domain", "domain_kind",
                             "n_docs", "n_tokens", "n_bytes", "nll_sum", "ppl", "bpb"]
    mixtures = {"alpha+beta", "alpha+gamma", "beta+gamma"}
    kinds = table.group_by("model_kind").agg(pl.col("model_id").n_unique()).sort("model_kind")
    # seed; unit models of the 1-unit partitions; one ind model (gamma has 2 units); 3 seq; 4 x 3 merged
    assert dict(kinds.iter_rows()) == {"ind": 1, "merged": 12, "seed": 1, "seq": 3, "unit": 2}
    assert set(table.filter(pl.col("model_kind") == "seq")["mixture"]) == mixtures
    # ppl and bpb follow from the sums
    for row in table.iter_rows(named=True):
        assert row["ppl"] == pytest.approx(math.exp(row["nll_sum"] / row["n_tokens"]), rel=1e-6)
        assert row["bpb"] == pytest.approx(row["nll_sum"] / math.log(2) / row["n_bytes"], rel=1e-6)
    # every model saw exactly the same documents of a domain
    same = table.group_by("domain").agg(pl.col("n_tokens").n_unique(), pl.col("n_bytes").n_unique())
    assert same["n_tokens"].max() == 1 and same["n_bytes"].max() == 1
    # seq and merged models are scored on the OOD sets and their own partitions only
    seq = table.filter(pl.col("model_id") == "alpha+gamma")
    assert set(seq["domain"]) == {"netdocs", "seedheld", "alpha", "gamma"}
    # continued pretraining helps in domain: each seq model beats the seed on its partitions
    seed = dict(table.filter(pl.col("model_kind") == "seed").select("domain", "ppl").iter_rows())
    for row in table.filter((pl.col("model_kind") == "seq") & (pl.col("domain_kind") == "id")).iter_rows(named=True):
        assert row["ppl"] < seed[row["domain"]], row


def test_merges_are_distinct_and_never_written(run):
    table = pl.read_csv(run / "results/perplexity.csv", schema_overrides={"method": pl.Utf8})
    merged = table.filter((pl.col("model_kind") == "merged") & (pl.col("mixture") == "alpha+gamma"))
    by_method = dict(merged.filter(pl.col("domain") == "netdocs").select("method", "nll_sum").iter_rows())
    # gamma has two units, so micro (1/3 each) and macro (1/2 alpha) are different averages,
    # and merged (alpha's unit model and gamma's ind model, 1/2 each) is a third one
    assert len({by_method[m] for m in ("micro", "macro", "merged")}) == 3
    # alpha+beta: one unit each, so micro and macro are the same average, scored identically
    ab = table.filter((pl.col("model_kind") == "merged") & (pl.col("mixture") == "alpha+beta") & (pl.col("domain") == "netdocs"))
    ab = dict(ab.select("method", "nll_sum").iter_rows())
    assert ab["micro"] == pytest.approx(ab["macro"], rel=1e-9)
    # ... and a one-unit partition's ind model is its unit model: merged is that average too
    assert ab["micro"] == pytest.approx(ab["merged"], rel=1e-9)
    # The engine scored every average in memory: no merged checkpoint was ever written.
    assert not (run / "work/models/merged").exists()
    # Merged rows come in engine batches keyed by the mixture's member listed last.
    for method in ("micro", "macro", "weighted", "merged"):
        batches = sorted(p.relative_to(run / "results/ppl/merged" / method).as_posix()
                         for p in (run / "results/ppl/merged" / method).rglob("*.csv"))
        assert batches == ["beta/0.csv", "gamma/0.csv"]
        timings = pl.read_csv(run / f"results/benchmarks/engine/{method}/gamma/0.csv")
        assert sorted(timings["mixture"]) == ["alpha+gamma", "beta+gamma"]
    for kind in ("unit/docs/gamma/1", "ind/gamma", "seq/alpha+beta", "seed"):
        side = json.loads((run / "work/models" / kind / "mergemix.json").read_text())
        assert side["seed_sha256"] == json.loads((run / "work/models/seed/mergemix.json").read_text())["weights_sha256"]


def test_engine_rows_equal_the_file_based_merge_and_evaluation(run):
    """The workflow's `merge` rule writes the checkpoint on request; evaluate.py scores it."""
    target = "work/models/merged/macro/alpha+gamma"
    try:
        done = snakemake(run, f"{target}/model.safetensors")
        assert done.returncode == 0, done.stderr[-4000:]
        domains = ["netdocs:ood:3000:work/tokens/ood/netdocs/heldout", "seedheld:ood:3000:work/tokens/seed/seed/heldout",
                   "alpha:id:1500:work/tokens/docs/alpha/heldout", "gamma:id:1500:work/tokens/docs/gamma/heldout"]
        cmd = [sys.executable, "-m", "mergemix.evaluate", "--model", target, "--model-kind", "merged",
               "--model-id", "macro/alpha+gamma", "--mixture", "alpha+gamma", "--method", "macro",
               *[f for d in domains for f in ("--domain", d)], "--max-docs", "40", "--batch-size", "8", "--seed", "0",
               "--out", "file-based.csv"]
        done = subprocess.run(cmd, cwd=run, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
        reference = pl.read_csv(run / "file-based.csv", schema_overrides={"method": pl.Utf8})
    finally:
        shutil.rmtree(run / "work/models/merged", ignore_errors=True)
        (run / "file-based.csv").unlink(missing_ok=True)
    table = pl.read_csv(run / "results/perplexity.csv", schema_overrides={"method": pl.Utf8})
    engine = table.filter(pl.col("model_id") == "macro/alpha+gamma").sort("domain")
    reference = reference.sort("domain")
    assert engine.select("domain", "n_docs", "n_tokens", "n_bytes").equals(
        reference.select("domain", "n_docs", "n_tokens", "n_bytes"))
    for mine, ref in zip(engine.iter_rows(named=True), reference.iter_rows(named=True)):
        assert mine["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-6), ref["domain"]


def test_analysis_outputs_have_every_domain_and_proxy(run):
    corr = pl.read_csv(run / "results/correlations.csv")
    domains = set(corr["domain"])
    assert {"netdocs", "seedheld", "in-domain"} <= domains
    assert {"micro", "macro", "weighted", "merged", "mean_ind", "ind_id"} <= set(corr["proxy"])
    assert (corr.filter(pl.col("domain") == "netdocs")["n_mixtures"] == 3).all()
    # every statistic is there for every domain and proxy of the 3 mixtures (3 pairs)
    assert (corr.filter(pl.col("domain") == "netdocs")["n_pairs"] == 3).all()
    assert corr["pairwise_acc"].is_between(0, 1).all() and corr["true_rank"].is_between(1, 3).all()
    for n in (2, 3, 4):
        table = (run / f"results/tables/table{n}.md").read_text()
        assert table.startswith(f"Table {n}") and "micro" in table and "ind_id" in table
        assert (run / f"results/tables/table{n}.tex").read_text().count(r"\bottomrule") == 1
        assert "netdocs" in (run / f"results/tables/table{n}.csv").read_text() or n == 3
    stems = ["figure3", *[f"figure4_{p}" for p in ("micro", "macro", "weighted", "merged", "mean_ind", "ind_id")],
             *[f"figure{n}" for n in range(5, 10)]]
    for stem in stems:
        for ext in ("png", "pdf"):
            data = (run / f"results/figures/{stem}.{ext}").read_bytes()
            assert data[:4] in (b"\x89PNG", b"%PDF"), stem
    for bench in ("train/seed.tsv", "evaluate/seq/alpha+beta.tsv", "evaluate/merged/micro/gamma/0.tsv"):
        assert (run / "results/benchmarks" / bench).stat().st_size > 0


def test_data_table_matches_the_shards_and_what_the_units_trained_on(run):
    config = yaml.safe_load((run / "config.yaml").read_text())
    table = pl.read_csv(run / "results/tables/data.csv")
    parts = config["sources"]["docs"]["partitions"]
    assert table["partition"].to_list() == list(parts) and table["units"].to_list() == list(parts.values())
    unit_tokens = config["train"]["unit_tokens"]
    window = config["train"]["continued"]["batch_size"] * config["model"]["context_length"]
    for row in table.iter_rows(named=True):
        shard = json.loads((run / f"work/tokens/docs/{row['partition']}/train.json").read_text())
        assert row["train_tokens"] == shard["n_tokens"] and row["train_docs"] == shard["n_source_docs"]
        assert row["passes"] == round(row["units"] * unit_tokens / shard["n_tokens"], 2)
        for unit in range(row["units"]):
            trained = json.loads((run / f"work/models/unit/docs/{row['partition']}/{unit}/mergemix.json").read_text())
            assert unit_tokens - window < trained["tokens"] <= unit_tokens
    assert (run / "results/tables/data.md").read_text().startswith("Data per partition")


def ood_geometric_means(table: pl.DataFrame, kind: str, method: str = "") -> dict[str, float]:
    """exp(mean log ppl) over the OOD sets per mixture, straight from perplexity.csv's rows."""
    rows = table.filter((pl.col("model_kind") == kind) & (pl.col("method") == method) & (pl.col("domain_kind") == "ood"))
    out = {}
    for mixture, group in rows.group_by("mixture"):
        assert group.height == 2, group  # netdocs and seedheld
        out[mixture[0]] = math.exp(sum(math.log(v) for v in group["ppl"]) / group.height)
    return out


def test_ranking_orders_every_mixture_by_its_micro_perplexity(run):
    ranking = pl.read_csv(run / "results/ranking.csv")
    table = pl.read_csv(run / "results/perplexity.csv")
    micro, seq = ood_geometric_means(table, "merged", "micro"), ood_geometric_means(table, "seq")
    assert sorted(ranking["mixture"]) == sorted(micro) == ["alpha+beta", "alpha+gamma", "beta+gamma"]
    assert ranking["ood_score"].to_list() == pytest.approx(sorted(micro.values()), rel=1e-9)
    for row in ranking.iter_rows(named=True):
        assert row["ood_score"] == pytest.approx(micro[row["mixture"]], rel=1e-9)
        assert row["seq_ood_score"] == pytest.approx(seq[row["mixture"]], rel=1e-9)
    assert f"| 1 | {ranking['mixture'][0]} |" in (run / "results/tables/ranking.md").read_text()


def test_a_proxies_only_study_trains_no_seq_model_and_ends_in_a_ranking(run, tmp_path):
    """mixtures.seq: false, the cheap ablation itself: no seq model, no tables against one,
    no ind model (gamma's would cost as much as its two units), and a ranking of the same
    mixtures from the same merged models."""
    study = tmp_path / "study"
    shutil.copytree(run, study, symlinks=True)
    for gone in ("work/models/seq", "results/ppl/seq", "work/models/ind", "results/ppl/ind"):
        shutil.rmtree(study / gone)
    for stale in ("results/ranking.csv", "results/correlations.csv"):
        (study / stale).unlink()
    config = yaml.safe_load((study / "config.yaml").read_text())
    config["mixtures"]["seq"] = False
    config["merge"]["methods"] = ["micro"]  # `merged` averages ind models
    (study / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plan = snakemake(study, "-n")
    assert plan.returncode == 0, plan.stderr[-4000:]
    planned = sorted(line.split()[1].rstrip(":") for line in plan.stdout.splitlines() if line.startswith("rule "))
    assert planned == ["all", "collect", "rank"], planned
    # Ranking by an ind-model proxy needs gamma's ind model again, and every ind model's scores.
    config["analysis"]["rank_by"] = "mean_ind"
    (study / "rank_ind.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    plan = snakemake(study, "-n", "--configfile", str(study / "rank_ind.yaml"))
    assert plan.returncode == 0, plan.stderr[-4000:]
    planned = sorted(line.split()[1].rstrip(":") for line in plan.stdout.splitlines() if line.startswith("rule "))
    assert planned == ["all", "collect", "evaluate_ind", "ind", "rank"], planned
    done = snakemake(study)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    table = pl.read_csv(study / "results/perplexity.csv")
    assert "seq" not in set(table["model_kind"])
    assert not (study / "results/correlations.csv").exists()
    before = pl.read_csv(run / "results/ranking.csv")
    after = pl.read_csv(study / "results/ranking.csv")
    assert after["mixture"].to_list() == before["mixture"].to_list()
    assert after["ood_score"].to_list() == before["ood_score"].to_list()
    assert after["seq_ood_score"].null_count() == after.height == 3


def test_efficiency_ledger_reads_the_runs_measurements(run):
    rows = pl.read_csv(run / "results/tables/efficiency.csv")
    measured = {r["item"]: r for r in rows.filter(pl.col("section") == "measured").iter_rows(named=True)}
    # 4 unit models (gamma has 2), 1 ind model (gamma), 3 seq models, 2 engine batches x 4 methods
    assert measured["unit models trained"]["jobs"] == 4
    assert measured["ind models trained (several-unit partitions)"]["jobs"] == 1
    assert measured["seq models trained"]["jobs"] == 3
    assert measured["merged models scored (engine batches)"]["jobs"] == 8
    # tokens are the sidecars' counts, which never exceed a unit (1500 tokens)
    unit_tokens = [json.loads((run / f"work/models/unit/docs/{u}/mergemix.json").read_text())["tokens"]
                   for u in ("alpha/0", "beta/0", "gamma/0", "gamma/1")]
    assert measured["unit models trained"]["tokens"] == sum(unit_tokens)
    assert all(0 < t <= 1500 for t in unit_tokens)
    seed_s = float((run / "results/benchmarks/train/seed.tsv").read_text().splitlines()[1].split("\t")[0])
    assert measured["seed pretraining"]["seconds"] == pytest.approx(seed_s, abs=0.01)
    # 3 partitions, k = 2: all C(3, 2) = 3 candidates are studied
    allc = rows.filter((pl.col("section") == "all candidates") & (pl.col("item") == "total"))
    assert set(allc["mixtures"]) == {3}
    assert (run / "results/tables/efficiency.md").read_text().startswith("Efficiency")


def test_figures_target_and_report(run, tmp_path):
    """`snakemake figures` redraws figures from the result tables alone; the report embeds them."""
    done = snakemake(run, "figures", "--forcerun", "figures", "-n")
    assert done.returncode == 0, done.stderr[-4000:]
    planned = [line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith("rule ")]
    assert planned == ["figures"], planned
    report = tmp_path / "report.html"
    done = snakemake(run, "--report", str(report))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "(WARNING/" not in done.stdout + done.stderr, "a caption or category the report's docutils warns about"
    html = report.read_text(errors="replace")
    for name in ("figure3.png", "figure4_weighted.png", "figure9.png", "table3.csv", "efficiency.csv", "ranking.csv",
                 "data.csv"):
        assert name in html, name


def test_jobs_use_the_workflows_python_whatever_the_path(run, tmp_path):
    """`.venv/bin/snakemake` without an activated venv: the rules' `python` is still the one
    that has mergemix, not the system's (which lacks it) or none."""
    study = tmp_path / "study"
    shutil.copytree(run, study, symlinks=True)
    env = {**os.environ, "PATH": os.pathsep.join(["/usr/local/bin", "/usr/bin", "/bin"])}
    before = (study / "results/perplexity.csv").read_bytes()
    (study / "results/perplexity.csv").unlink()
    done = snakemake(study, "results/perplexity.csv", env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert (study / "results/perplexity.csv").read_bytes() == before


def test_outputs_have_the_permissions_of_the_umask(run):
    """A group sharing a study can read every output: none is left private (0600) by a
    temporary file it was written through."""
    umask = os.umask(0)
    os.umask(umask)
    files = [p for d in ("work", "results") for p in (run / d).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.suffix == ".parquet" for p in files)
    private = sorted(str(p.relative_to(run)) for p in files if p.stat().st_mode & 0o777 != 0o666 & ~umask)
    assert not private, f"{len(private)} outputs without the umask's permissions, e.g. {private[:5]}"


def test_rerun_plans_nothing(run):
    done = snakemake(run, "-n")
    assert done.returncode == 0
    assert "Nothing to be done" in done.stdout + done.stderr


def test_adding_a_partition_plans_only_new_engine_batches(run, tmp_path):
    """A new source listed last anchors every new mixture: old batches are not planned."""
    from tests.conftest import stdlib_docstrings

    study = tmp_path / "study"
    shutil.copytree(run, study, symlinks=True)  # copy2 keeps mtimes, .snakemake keeps params
    with open(study / "data/more.jsonl", "w") as fh:
        for doc in stdlib_docstrings(["shutil"])["shutil"]:
            fh.write(json.dumps({"body": doc}) + "\n")
    config = yaml.safe_load((study / "config.yaml").read_text())
    config["sources"]["more"] = {
        "load": {"path": "json", "data_files": ["data/more.jsonl"], "split": "train"},
        "text_column": "body", "partition_by": [], "rename": {}, "partitions": {"delta": 1}, "heldout_fraction": 0.15,
    }
    (study / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    done = snakemake(study, "-n")
    assert done.returncode == 0, done.stderr[-4000:]
    planned = {word.rstrip(",") for line in done.stdout.splitlines() if line.strip().startswith("output:")
               for word in line.split()[1:]}
    merged = sorted(f for f in planned if f.startswith("results/ppl/merged/"))
    assert merged == [f"results/ppl/merged/{m}/delta/0.csv" for m in ("macro", "merged", "micro", "weighted")]
    # No existing unit or seq model retrains.
    assert not [f for f in planned if f.startswith(("work/models/unit/docs/", "work/models/seq/alpha+beta"))]
    assert "work/models/seq/alpha+delta/model.safetensors" in planned


def test_recursive_globs_and_paths_with_spaces_reach_their_jobs(run, tmp_path, tokenizer_dir):
    """A `**` data_files pattern declares the files at its top level as inputs too (so
    editing one reruns its partition), and a tokenizer folder whose path holds a space
    reaches the tokenizer job as one argument; an s3:// file is left to datasets."""
    shutil.copytree(run / "data", tmp_path / "data")
    lines = (tmp_path / "data/docs.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "data/docs.jsonl").unlink()
    (tmp_path / "data/docs/more").mkdir(parents=True)
    (tmp_path / "data/docs/top.jsonl").write_text("".join(lines[::2]))
    (tmp_path / "data/docs/more/deep.jsonl").write_text("".join(lines[1::2]))
    tokenizer = tmp_path / "my tokenizers" / "bpe"
    shutil.copytree(tokenizer_dir, tokenizer)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["sources"]["docs"]["load"]["data_files"] = ["data/docs/**/*.jsonl"]
    config["sources"]["docs"]["rename"][None] = "untitled"  # YAML `null:`, the raw key of missing values
    config["tokenizer"]["name"] = str(tokenizer)
    config["sources"]["remote"] = {  # read by datasets through fsspec: no input for Snakemake to check
        "load": {"path": "json", "data_files": ["s3://bucket/d.jsonl"], "split": "train"}, "text_column": "body",
        "partition_by": [], "partitions": {"faraway": 1}, "heldout_fraction": 0.15}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "-n", "work/partitions/remote/faraway.parquet")
    assert done.returncode == 0, done.stderr[-3000:]

    done = snakemake(tmp_path, "-n", "work/partitions/docs/alpha.parquet")
    assert done.returncode == 0, done.stderr[-3000:]
    inputs = {word.rstrip(",") for line in done.stdout.splitlines() if line.strip().startswith("input:")
              for word in line.split()[1:]}
    assert {"data/docs/top.jsonl", "data/docs/more/deep.jsonl"} <= inputs, inputs
    done = snakemake(tmp_path, "work/tokenizer/tokenizer.json")
    assert done.returncode == 0, (done.stderr + (tmp_path / "logs/tokenizer.log").read_text())[-3000:]
    assert json.loads((tmp_path / "work/tokenizer/tokenizer.json").read_text()) == json.loads(
        (tokenizer / "tokenizer.json").read_text())


def test_bad_config_fails_before_any_job(run, tmp_path):
    shutil.copytree(run / "data", tmp_path / "data")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["train"]["unit_tokenz"] = 5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "-n")
    assert done.returncode != 0
    assert "unknown key 'train.unit_tokenz'" in done.stderr + done.stdout
    assert not (tmp_path / "work").exists()


def test_a_finished_study_whose_data_path_breaks_stops_with_the_key(run, tmp_path):
    """Snakemake alone answers "Nothing to be done" when a finished job's input is gone
    (it tolerates missing inputs of up-to-date outputs): a mistyped or moved data path
    would leave the old results standing as if they were the new ones."""
    study = tmp_path / "study"
    shutil.copytree(run, study, symlinks=True)
    config = yaml.safe_load((study / "config.yaml").read_text())
    config["sources"]["docs"]["load"]["data_files"] = ["docs.jsonl"]
    (study / "config.yaml").write_text(yaml.safe_dump(config))
    before = sorted(p.relative_to(study) for p in study.rglob("*"))
    done = snakemake(study, "-n")
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "docs.jsonl" in line]
    assert errors == [f"config error: sources.docs.load.data_files: data file 'docs.jsonl' does not exist under "
                      f"{study}; fix the path or restore the file"], errors
    assert sorted(p.relative_to(study) for p in study.rglob("*")) == before


def test_missing_text_column_fails_before_training(run, tmp_path):
    shutil.copytree(run / "data", tmp_path / "data")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["sources"]["docs"]["text_column"] = "content"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "work/partitions/docs/alpha.parquet")
    assert done.returncode != 0
    log = (tmp_path / "logs/partition/docs/alpha.log").read_text()
    assert "text column 'content' not found" in log
    assert not (tmp_path / "work/partitions/docs/alpha.parquet").exists()
