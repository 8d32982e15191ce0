"""The in-memory merge-and-score engine against the file-based path (merge.py -> evaluate.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from mergemix import engine, evaluate, merge
from mergemix.evaluate import Domain
from mergemix.tokenize import load_tokenizer, write_shard
from tests.conftest import make_checkpoint

EVAL = ["--max-docs", "12", "--batch-size", "4", "--seed", "3"]
# Partition -> seeds of its unit models: c has two units, so micro, macro and weighted differ.
UNITS = {"a": [11], "b": [12], "c": [13, 14]}
MIXTURES = ["a+b", "a+c", "b+c"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, tokenizer_dir, texts, tiny_model_config) -> dict:
    """Unit checkpoints of three partitions and shards of real text: two OOD sets, three held-out sets."""
    root = tmp_path_factory.mktemp("engine")
    tok = load_tokenizer(tokenizer_dir)
    shards = {"web": "argparse", "code": "inspect", "a": "typing", "b": "pathlib", "c": "subprocess"}
    for name, module in shards.items():
        write_shard(tok, texts[module][:15], root / "tokens" / name / "heldout", {"tokenizer_sha256": "x"})
    write_shard(tok, texts["tarfile"][:20], root / "tokens" / "c" / "train", {"tokenizer_sha256": "x"})
    units = {p: [root / "unit" / p / str(i) for i in range(len(seeds))] for p, seeds in UNITS.items()}
    for p, seeds in UNITS.items():
        for path, seed in zip(units[p], seeds):
            make_checkpoint(path, tiny_model_config, seed=seed)
    domains = [f"web:ood:600:{root}/tokens/web/heldout", f"code:ood:400:{root}/tokens/code/heldout"]
    domains += [f"{p}:id:300:{root}/tokens/{p}/heldout" for p in UNITS]
    return {"root": root, "units": units, "domains": domains}


def model_flags(units: dict[str, list[Path]], partitions: list[str]) -> list[str]:
    return [flag for p in partitions for u in units[p] for flag in ("--model", f"{p}={u}")]


def domain_flags(domains: list[str], partitions: list[str]) -> list[str]:
    """OOD sets, then the held-out sets of `partitions` in order (the workflow's order)."""
    chosen = [d for d in domains if ":ood:" in d] + [d for p in partitions for d in domains if d.startswith(f"{p}:id:")]
    return [flag for d in chosen for flag in ("--domain", d)]


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def file_based(study: dict, method: str, mixture: str, tmp: Path, tokens: list[str]) -> list[dict]:
    """merge.py writes the averaged checkpoint, evaluate.py scores it: the reference path."""
    parts = mixture.split("+")
    ckpt = tmp / "merged" / method / mixture
    assert merge.main(["--method", method, *model_flags(study["units"], parts), *tokens, "--out", str(ckpt)]) == 0
    out = tmp / "file" / method / f"{mixture}.csv"
    args = ["--model", str(ckpt), *domain_flags(study["domains"], parts), "--out", str(out), "--model-kind", "merged",
            "--model-id", f"{method}/{mixture}", "--mixture", mixture, "--method", method, *EVAL]
    assert evaluate.main(args) == 0
    return read_rows(out)


def run_engine(study: dict, method: str, mixtures: list[str], out: Path, extra: list[str] = ()) -> int:
    mixture_flags = [flag for m in mixtures for flag in ("--mixture", m)]
    return engine.main(["--method", method, *model_flags(study["units"], list(UNITS)), *mixture_flags,
                        *[flag for d in study["domains"] for flag in ("--domain", d)], "--out", str(out),
                        *EVAL, "--device", "cpu", *extra])


@pytest.mark.parametrize("method", ["micro", "macro", "weighted", "merged"])
def test_engine_rows_equal_file_based_rows(study, tmp_path, method):
    tokens = ["--tokens", "a=300", "--tokens", "b=100", "--tokens", f"c={study['root']}/tokens/c/train.json"]
    tokens = tokens if method == "weighted" else []
    out = tmp_path / "engine.csv"
    assert run_engine(study, method, MIXTURES, out, [*tokens, "--timings", str(tmp_path / "timings.csv")]) == 0
    got = read_rows(out)
    expected = [row for m in MIXTURES for row in file_based(study, method, m, tmp_path, tokens)]
    assert list(got[0]) == evaluate.COLUMNS
    assert len(got) == len(expected) == 3 * 4  # 2 OOD + 2 held-out sets per mixture
    for mine, ref in zip(got, expected):
        for col in evaluate.COLUMNS:
            if col in ("nll_sum", "ppl", "bpb"):
                # On one CPU the two paths agree bit for bit (same weights, same float32
                # accumulation order, same windows); the tolerance only allows for devices.
                assert float(mine[col]) == pytest.approx(float(ref[col]), rel=1e-6, abs=0), (col, ref)
            else:
                assert mine[col] == ref[col], (col, ref)
    # Different mixtures really are different models.
    assert len({row["nll_sum"] for row in got if row["domain"] == "web"}) == 3
    timings = read_rows(tmp_path / "timings.csv")
    assert [t["mixture"] for t in timings] == MIXTURES
    assert [int(t["n_checkpoints"]) for t in timings] == [2, 3, 3]


def test_average_is_bitwise_the_file_based_average(study):
    """Same weights, same float32 accumulation, same term order: the same bits."""
    units = study["units"]
    groups = {"a": units["a"], "c": units["c"]}
    weights = merge.merge_weights("macro", {p: [str(u) for u in us] for p, us in groups.items()})
    by_name = {str(u): u for us in groups.values() for u in us}
    reference = merge.average({by_name[k]: w for k, w in weights.items()})
    eng = engine.Engine([u for us in groups.values() for u in us], torch.device("cpu"), max_docs=4, seed=0)
    eng.load_average({by_name[k]: w for k, w in weights.items()})
    state = eng.model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], torch.from_numpy(tensor)), name


def test_bf16_average_is_rounded_as_a_merged_checkpoint_stores_it(tmp_path, tiny_model_config):
    """GPU runs save bfloat16 checkpoints: merge.py rounds their float32 average back to
    bfloat16, so the engine must score that rounded model too."""
    from mergemix import model as mm

    paths = []
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        model = mm.build(tiny_model_config, 512, 0).to(torch.bfloat16)
        paths.append(tmp_path / str(seed))
        mm.save(model, paths[-1], {"kind": "unit", "seed_sha256": "s" * 64})
    weights = {p: 1 / 3 for p in paths}
    reference = merge.average(weights)  # bfloat16 bits, as merge.py writes them
    eng = engine.Engine(paths, torch.device("cpu"), max_docs=4, seed=0)
    eng.load_average(weights)
    state = eng.model.state_dict()
    for name, bits in reference.items():
        stored = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
        assert torch.equal(state[name].float(), stored.float()), name


def test_one_model_mixture_is_that_models_own_evaluation(study, tmp_path):
    out = tmp_path / "engine.csv"
    assert run_engine(study, "micro", ["a"], out) == 0
    got = read_rows(out)
    ref_out = tmp_path / "a.csv"
    args = ["--model", str(study["units"]["a"][0]), *domain_flags(study["domains"], ["a"]), "--out", str(ref_out),
            "--model-kind", "merged", "--model-id", "micro/a", "--mixture", "a", "--method", "micro", *EVAL]
    assert evaluate.main(args) == 0
    assert got == read_rows(ref_out)  # exact: weight 1.0 reproduces every bit


def test_micro_of_identical_models_is_the_model(tmp_path, tiny_model_config, study):
    root = study["root"]
    original = make_checkpoint(tmp_path / "p", tiny_model_config, seed=5)
    make_checkpoint(tmp_path / "q", tiny_model_config, seed=5)
    domains = [Domain("web", "ood", 600, root / "tokens/web/heldout"), Domain("p", "id", 300, root / "tokens/a/heldout"),
               Domain("q", "id", 300, root / "tokens/b/heldout")]
    jobs = engine.plan_batch(["p+q"], {"p": [tmp_path / "p"], "q": [tmp_path / "q"]}, domains)
    rows, _ = engine.run("micro", jobs, None, max_docs=12, batch_size=4, seed=3, device=torch.device("cpu"))
    expected = evaluate.evaluate(original.eval(), domains, max_docs=12, batch_size=4, seed=3)
    assert [{k: r[k] for k in expected[0]} for r in rows] == expected


def test_windows_are_prepared_once_per_domain(study, monkeypatch):
    calls = []
    real = engine.prepare_domain

    def counting(domain, *args):
        calls.append(domain.name)
        return real(domain, *args)

    monkeypatch.setattr(engine, "prepare_domain", counting)
    domains = [Domain.parse(d) for d in study["domains"]]
    jobs = engine.plan_batch(MIXTURES, study["units"], domains)
    rows, _ = engine.run("micro", jobs, None, max_docs=12, batch_size=4, seed=3, device=torch.device("cpu"))
    assert len(rows) == 12
    assert sorted(calls) == sorted(d.name for d in domains)  # 5 domains, 12 (mixture, domain) scores


def test_no_checkpoint_touches_the_disk(study, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in study["root"].rglob("*")}
    assert run_engine(study, "micro", MIXTURES, tmp_path / "out" / "rows.csv") == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["rows.csv"]
    assert {p: p.stat().st_mtime_ns for p in study["root"].rglob("*")} == before


def test_refuses_other_seed_and_writes_nothing(tmp_path, tiny_model_config, study, capsys):
    make_checkpoint(tmp_path / "x", tiny_model_config, seed=1, seed_sha="1" * 64)
    make_checkpoint(tmp_path / "y", tiny_model_config, seed=2, seed_sha="2" * 64)
    root = study["root"]
    out = tmp_path / "rows.csv"
    code = engine.main(["--method", "micro", "--model", f"x={tmp_path / 'x'}", "--model", f"y={tmp_path / 'y'}",
                        "--mixture", "x+y", "--domain", f"x:id:300:{root}/tokens/a/heldout",
                        "--domain", f"y:id:300:{root}/tokens/b/heldout", "--out", str(out), "--device", "cpu"])
    assert code == 1
    assert "only models of one seed" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("device", ["meta", "cpu:1", "xpu"])
def test_a_device_the_engine_cannot_use_is_refused_before_reading(device, study, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert run_engine(study, "micro", MIXTURES[:1], out, ["--device", device]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --device {device}:"), err[-3:]
    assert not out.exists()


def test_rows_and_timings_never_land_in_a_checkpoint(study, tmp_path, capsys):
    unit = study["units"]["a"][0]
    before = {p.name: p.read_bytes() for p in unit.iterdir()}
    assert run_engine(study, "micro", MIXTURES[:1], unit / "model.safetensors") == 1
    assert "inside the checkpoint" in capsys.readouterr().err
    out = tmp_path / "rows.csv"
    assert run_engine(study, "micro", MIXTURES[:1], out, ["--timings", str(unit / "timings.csv")]) == 1
    assert "inside the checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in unit.iterdir()} == before
    assert not out.exists()


def test_refuses_other_shape_naming_the_tensor(tmp_path, tiny_model_config):
    from dataclasses import replace

    make_checkpoint(tmp_path / "x", tiny_model_config, seed=1)
    make_checkpoint(tmp_path / "y", replace(tiny_model_config, intermediate_size=128), seed=1)
    (tmp_path / "y" / "config.json").write_text((tmp_path / "x" / "config.json").read_text())
    with pytest.raises(merge.MergeError, match=r"tensor 'gpt_neox\.layers\.0\.mlp\.dense_4h_to_h\.weight' has shape"):
        engine.Engine([tmp_path / "x", tmp_path / "y"], torch.device("cpu"), max_docs=4, seed=0)


def test_batch_plan_names_what_is_missing(study):
    domains = [Domain.parse(d) for d in study["domains"]]
    with pytest.raises(engine.EngineError, match="no --model given for partition 'z'"):
        engine.plan_batch(["a+z"], study["units"], domains)
    with pytest.raises(engine.EngineError, match="no in-domain set for partition 'b'"):
        engine.plan_batch(["a+b"], study["units"], [d for d in domains if d.name != "b"])
    jobs = engine.plan_batch(["a+c"], study["units"], domains)
    assert [d.name for d in jobs[0].domains] == ["web", "code", "a", "c"]
    assert jobs[0].groups == {"a": study["units"]["a"], "c": study["units"]["c"]}


def test_weighted_needs_token_counts(study, tmp_path, capsys):
    assert run_engine(study, "weighted", ["a+b"], tmp_path / "rows.csv") == 1
    assert "weighted merge needs the token count of partition 'a'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_engine_matches_cpu(study, tmp_path):
    assert run_engine(study, "macro", MIXTURES, tmp_path / "cpu.csv") == 0
    mixture_flags = [flag for m in MIXTURES for flag in ("--mixture", m)]
    assert engine.main(["--method", "macro", *model_flags(study["units"], list(UNITS)), *mixture_flags,
                        *[flag for d in study["domains"] for flag in ("--domain", d)],
                        "--out", str(tmp_path / "gpu.csv"), *EVAL, "--device", "cuda"]) == 0
    cpu_rows, gpu_rows = read_rows(tmp_path / "cpu.csv"), read_rows(tmp_path / "gpu.csv")
    assert len(gpu_rows) == len(cpu_rows) > 0
    for cpu, gpu in zip(cpu_rows, gpu_rows):
        assert float(gpu["nll_sum"]) == pytest.approx(float(cpu["nll_sum"]), rel=1e-4)
