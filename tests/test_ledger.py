"""Tests for mergemix.ledger on hand-written benchmark TSVs and checkpoint sidecars.

Every expected number is worked out by hand from the literal seconds and token counts
written below, never by calling the code under test.
"""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from mergemix import ledger

HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"

# benchmark path under results/benchmarks -> wall seconds of each row (repeats give several rows)
BENCHMARKS = {
    "train/seed.tsv": [100.0],
    "train/unit/docs/a/0.tsv": [10.0],
    "train/unit/docs/b/0.tsv": [12.0],
    "train/unit/docs/c/0.tsv": [13.0, 15.0],  # benchmarked twice: mean 14
    "train/seq/a+b.tsv": [30.0],
    "train/seq/a+c.tsv": [34.0],
    "evaluate/seed.tsv": [1.0],
    "evaluate/unit/a/0.tsv": [2.0],
    "evaluate/seq/a+b.tsv": [5.0],
    "evaluate/seq/a+c.tsv": [7.0],
    "evaluate/merged/micro/b/0.tsv": [3.0],
    "evaluate/merged/micro/c/0.tsv": [5.0],
}
# checkpoint folder under work/models -> (tokens, data-parallel ranks)
SIDECARS = {
    "seed": (1000, 1),
    "unit/docs/a/0": (100, 1),
    "unit/docs/b/0": (100, 1),
    "unit/docs/c/0": (100, 1),
    "seq/a+b": (200, 2),
    "seq/a+c": (200, 1),
}


def write_study(root):
    bench = root / "results" / "benchmarks"
    for rel, seconds in BENCHMARKS.items():
        path = bench / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HEADER + "".join(f"{s:.2f}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t{s}\n" for s in seconds))
    models = root / "work" / "models"
    for rel, (tokens, ranks) in SIDECARS.items():
        path = models / rel / "mergemix.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": rel.split("/")[0], "tokens": tokens,
                                    "hardware": {"world_size": ranks}}))
    return bench, models


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def pick(rows, section, approach, item):
    (row,) = [r for r in rows if r["section"] == section and r["approach"] == approach
              and r["item"].startswith(item)]
    return row


def test_paths_map_to_stages_and_models():
    assert ledger.benchmark_stage("results/benchmarks/train/unit/docs/a/0.tsv") == ("unit_train", "docs/a/0")
    assert ledger.benchmark_stage("x/benchmarks/train/seq/a+b.tsv") == ("seq_train", "a+b")
    assert ledger.benchmark_stage("benchmarks/evaluate/merged/micro/b/0.tsv") == ("merged_eval", "micro/b/0")
    assert ledger.benchmark_stage("benchmarks/evaluate/ind/gamma.tsv") == ("ind_eval", "gamma")
    assert ledger.benchmark_stage("benchmarks/merge/macro/a+b.tsv") == ("merge_write", "macro/a+b")
    assert ledger.benchmark_stage("benchmarks/engine/micro/b/0.csv") is None
    assert ledger.benchmark_stage("benchmarks/train/other.tsv") is None
    assert ledger.sidecar_model("work/models/unit/docs/a/0/mergemix.json") == ("unit", "docs/a/0")
    assert ledger.sidecar_model("work/models/seed/mergemix.json") == ("seed", "seed")
    assert ledger.sidecar_model("work/models/merged/micro/a+b/mergemix.json") is None
    # sources, partitions or folders above the study named like the anchors
    assert ledger.sidecar_model("work/models/unit/models/seq/0/mergemix.json") == ("unit", "models/seq/0")
    assert ledger.sidecar_model("runs/models/study/work/models/seq/a+b/mergemix.json") == ("seq", "a+b")
    assert ledger.benchmark_stage("results/benchmarks/train/unit/src/benchmarks/0.tsv") == ("unit_train", "src/benchmarks/0")
    assert ledger.benchmark_stage("runs/benchmarks/x/results/benchmarks/train/seq/a+b.tsv") == ("seq_train", "a+b")


def test_ledger_by_hand(tmp_path):
    bench, models = write_study(tmp_path)
    files = [bench / rel for rel in BENCHMARKS] + [models / rel / "mergemix.json" for rel in SIDECARS]
    out = tmp_path / "tables"
    # a study of 4 partitions (C(4, 2) = 6 candidates) that scores 3 mixtures, 2 with seq models
    argv = [*map(str, files), "--partitions", "4", "--k", "2", "--mixtures", "3", "--out-dir", str(out), "-q"]
    assert ledger.main(argv) == 0
    rows = read_rows(out / "efficiency.csv")

    units = pick(rows, "measured", "modular", "unit models")
    assert (units["jobs"], units["seconds"], units["tokens"]) == ("3", "36.00", "300")  # 10 + 12 + 14
    seq = pick(rows, "measured", "seq", "seq models trained")
    # a+b ran on 2 ranks: 30 x 2 + 34 rank-seconds
    assert (seq["jobs"], seq["seconds"], seq["rank_seconds"], seq["tokens"]) == ("2", "64.00", "94.00", "400")
    assert pick(rows, "measured", "shared", "seed pretraining")["tokens"] == "1000"
    assert pick(rows, "measured", "modular", "merged models scored")["seconds"] == "8.00"
    assert pick(rows, "measured", "baseline", "unit and ind models scored")["seconds"] == "2.00"
    assert pick(rows, "measured", "seq", "seq models scored")["tokens"] == ""

    # studied: 3 mixtures, seq models for 2 -> the seq side is the mean per model x 3
    assert pick(rows, "studied", "modular", "total")["seconds"] == "44.00"  # 36 + 8
    s_train = pick(rows, "studied", "seq", "training")
    assert (s_train["basis"], s_train["seconds"], s_train["rank_seconds"], s_train["tokens"]) == (
        "projected", "96.00", "141.00", "600")  # 32 x 3, 47 x 3, 200 x 3
    assert pick(rows, "studied", "seq", "scoring")["seconds"] == "18.00"  # 6 x 3
    assert pick(rows, "studied", "seq", "total")["seconds"] == "114.00"

    # all 6 candidates: units do not grow; merged scoring 8/3 s per mixture x 6 = 16 s
    a_unit = pick(rows, "all candidates", "modular", "training")
    assert (a_unit["mixtures"], a_unit["seconds"], a_unit["tokens"]) == ("6", "36.00", "300")
    assert pick(rows, "all candidates", "modular", "scoring")["seconds"] == "16.00"
    assert pick(rows, "all candidates", "modular", "total")["seconds"] == "52.00"
    assert pick(rows, "all candidates", "seq", "training")["seconds"] == "192.00"
    assert pick(rows, "all candidates", "seq", "training")["tokens"] == "1200"
    assert pick(rows, "all candidates", "seq", "total")["seconds"] == "228.00"  # 192 + 6 x 6

    md = (out / "efficiency.md").read_text()
    caption = md.splitlines()[0]
    assert caption.startswith("Efficiency")
    # rank-seconds (a+b trained on 2 ranks): training 141 / 36, with scoring (141 + 18) / 44; all
    # candidates 282 / 36 and (282 + 36) / 52. Wall seconds: 96 / 36, 114 / 44; 192 / 36, 228 / 52
    for ratio in ("rank-seconds: training 3.92, with scoring 3.61; wall seconds: training 2.67, with scoring 2.59",
                  "C(4, 2) = 6",
                  "rank-seconds: training 7.83, with scoring 6.12; wall seconds: training 5.33, with scoring 4.38"):
        assert ratio in caption, ratio
    assert "| all candidates | total | seq | projected |  | 228.0 | 0.063 | " in md


def test_defaults_read_from_the_files(tmp_path):
    bench, models = write_study(tmp_path)
    stages = ledger.measure(*ledger.collect_paths([bench, models]))
    rows = ledger.ledger(stages)
    # 3 partitions among the units, seq mixtures of size 2, and 2 of them: C(3, 2) = 3
    studied = pick(rows, "studied", "seq", "training")
    assert studied["mixtures"] == 2 and studied["basis"] == "measured" and studied["seconds"] == 64.0
    allc = pick(rows, "all candidates", "seq", "training")
    assert allc["mixtures"] == 3 and allc["seconds"] == pytest.approx(96.0) and allc["basis"] == "projected"
    # a study that trained a seq model for every candidate: nothing is projected
    rows = ledger.ledger(stages, partitions=2, k=1, mixtures=2)
    assert {r["basis"] for r in rows if r["section"] == "all candidates"} == {"measured"}
    assert pick(rows, "all candidates", "seq", "total")["seconds"] == 64.0 + 12.0


def test_several_merge_methods_are_charged_as_one_proxy(tmp_path):
    bench, models = write_study(tmp_path)
    # the same 2 batches scored again for macro (7 s, 9 s): micro took 3 + 5 s
    for rel, seconds in (("micro/b/0", 3.0), ("micro/c/0", 5.0), ("macro/b/0", 7.0), ("macro/c/0", 9.0)):
        path = bench / "evaluate/merged" / f"{rel}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HEADER + f"{seconds:.2f}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t{seconds}\n")
    stages = ledger.measure(*ledger.collect_paths([bench, models]))
    assert ledger.merge_methods(stages["merged_eval"]) == ["macro", "micro"]
    rows = ledger.ledger(stages, partitions=4, k=2, mixtures=3)
    # every method in the measured row; per mixture the mean method: 24 s / (3 mixtures x 2)
    assert pick(rows, "measured", "modular", "merged models scored")["seconds"] == 24.0
    scoring = pick(rows, "studied", "modular", "scoring")
    assert scoring["item"] == "scoring: merged models (mean of 2 merge methods)"
    assert scoring["seconds"] == pytest.approx(12.0) and scoring["jobs"] == 2
    assert pick(rows, "all candidates", "modular", "scoring")["seconds"] == pytest.approx(24.0)  # 4 s x 6


def test_the_merged_method_is_charged_the_ind_models_it_averages(tmp_path):
    bench, models = write_study(tmp_path)
    for rel, seconds in (("train/ind/d.tsv", 30.0), ("evaluate/merged/merged/b/0.tsv", 4.0)):
        path = bench / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HEADER + f"{seconds:.2f}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t{seconds}\n")
    (models / "ind/d").mkdir(parents=True)
    (models / "ind/d/mergemix.json").write_text(json.dumps({"kind": "ind", "tokens": 300}))
    stages = ledger.measure(*ledger.collect_paths([bench, models]))
    rows = ledger.ledger(stages, partitions=4, k=2, mixtures=3)
    # methods merged and micro: half the ind model's 30 s and 300 tokens on top of the units' 36 s, 300
    train = pick(rows, "studied", "modular", "training")
    assert "ind models for the merged method (mean of the 2 merge methods' inputs" in train["item"]
    assert (train["jobs"], train["seconds"], train["tokens"]) == (4, 51.0, 450.0)
    # scoring: (3 + 5 + 4) s / (3 mixtures x 2 methods) = 2 s a mixture
    assert pick(rows, "studied", "modular", "total")["seconds"] == pytest.approx(51.0 + 6.0)
    assert pick(rows, "all candidates", "modular", "training")["seconds"] == 51.0  # does not grow
    # without the merged method the ind model stays a baseline cost
    stages["merged_eval"] = ledger.measure([bench / "evaluate/merged/micro/b/0.tsv"], [])["merged_eval"]
    rows = ledger.ledger(stages, partitions=4, k=2, mixtures=3)
    assert pick(rows, "studied", "modular", "training")["seconds"] == 36.0


def test_each_merge_method_is_charged_its_own_inputs(tmp_path):
    """Partition d has two units and an ind model: micro averages a, b, c and d's two
    units; merged averages a, b, c and d's ind model."""
    bench, models = write_study(tmp_path)
    extra = {"train/unit/docs/d/0.tsv": (8.0, 100), "train/unit/docs/d/1.tsv": (8.0, 100),
             "train/ind/d.tsv": (30.0, 200), "evaluate/merged/merged/b/0.tsv": (4.0, None)}
    for rel, (seconds, tokens) in extra.items():
        path = bench / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(HEADER + f"{seconds:.2f}\t0:00:00\t1\t1\t1\t1\t0\t0\t0\t{seconds}\n")
        if tokens is not None:
            model = models / rel[len("train/"):-len(".tsv")] / "mergemix.json"
            model.parent.mkdir(parents=True)
            model.write_text(json.dumps({"kind": rel.split("/")[1], "tokens": tokens}))
    stages = ledger.measure(*ledger.collect_paths([bench, models]))
    rows = ledger.ledger(stages, partitions=4, k=2, mixtures=3)
    train = pick(rows, "studied", "modular", "training")
    # micro: units 10 + 12 + 14 + 8 + 8 = 52 s, 500 tokens; merged: a, b, c 36 s + ind 30 s = 66 s,
    # 300 + 200 = 500 tokens; the mean of the two: 59 s, 500 tokens; 6 training jobs in all
    assert (train["jobs"], train["seconds"], train["tokens"]) == (6, 59.0, 500.0)
    # merged alone: its inputs only, not d's unit models
    stages["merged_eval"] = ledger.measure([bench / "evaluate/merged/merged/b/0.tsv"], [])["merged_eval"]
    train = pick(ledger.ledger(stages, partitions=4, k=2, mixtures=3), "studied", "modular", "training")
    assert (train["jobs"], train["seconds"], train["tokens"]) == (4, 66.0, 500.0)
    assert train["item"].startswith("training: ind models, unit models of one-unit partitions")


def test_fixed_partitions_shrink_the_candidates(tmp_path):
    bench, models = write_study(tmp_path)
    assert [ledger.candidates(5, 2, f) for f in (0, 1)] == [10, 4]
    assert ledger.candidates(5, 3, 2) == 3 and ledger.candidates(5, 2, 3) == 0
    out = tmp_path / "tables"
    argv = [str(bench), str(models), "--partitions", "5", "--k", "2", "--fixed", "1", "--mixtures", "4",
            "--out-dir", str(out), "-q"]
    assert ledger.main(argv) == 0
    rows = read_rows(out / "efficiency.csv")
    # one partition in every mixture: the 4 others pair with it, and the study scored all 4
    assert {r["mixtures"] for r in rows if r["section"] == "all candidates"} == {"4"}
    assert pick(rows, "all candidates", "modular", "scoring")["basis"] == "measured"
    assert "C(5 - 1, 2 - 1) (with 1 partition(s) in every mixture) = 4" in (out / "efficiency.md").read_text()


def test_fixed_larger_than_k_is_refused(tmp_path, capsys):
    bench, models = write_study(tmp_path)
    argv = [str(bench), str(models), "--k", "2", "--fixed", "3", "--out-dir", str(tmp_path / "t")]
    assert ledger.main(argv) != 0
    assert "--fixed 3" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_missing_sidecar_counts_time_not_tokens(tmp_path, caplog):
    bench, models = write_study(tmp_path)
    (models / "seq/a+c/mergemix.json").unlink()
    stages = ledger.measure(*ledger.collect_paths([bench, models]))
    assert stages["seq_train"].seconds == 64.0 and stages["seq_train"].tokens == 200
    assert "a+c" in caplog.text


def test_bad_files_are_named(tmp_path, capsys):
    bench, models = write_study(tmp_path)
    bad = bench / "train/seq/a+b.tsv"
    bad.write_text("seconds\n3\n")
    with pytest.raises(ledger.LedgerError, match=r"a\+b.tsv: not a Snakemake benchmark"):
        ledger.read_benchmark(bad)
    bad.write_text(HEADER + "NA\t0\t0\t0\t0\t0\t0\t0\t0\t0\n")
    with pytest.raises(ledger.LedgerError, match="not a number"):
        ledger.read_benchmark(bad)
    side = models / "seq/a+c/mergemix.json"
    side.write_text(json.dumps({"kind": "seq"}))
    with pytest.raises(ledger.LedgerError, match="no 'tokens' count"):
        ledger.read_sidecar(side)
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    assert ledger.main([str(stray), "--out-dir", str(tmp_path / "out")]) == 1
    assert "neither a benchmark" in capsys.readouterr().err
    assert ledger.main([str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "out")]) == 1
    assert "no such file" in capsys.readouterr().err
    gone = tmp_path / "deleted/results/benchmarks/train/seed.tsv"
    assert ledger.main([str(gone), "--out-dir", str(tmp_path / "out")]) == 1
    assert f"error: {gone}: the measurement is missing" in capsys.readouterr().err


def test_no_seq_models_leaves_the_seq_side_blank(tmp_path):
    bench, models = write_study(tmp_path)
    files = [p for p in bench.rglob("*.tsv") if "/seq/" not in p.as_posix()]
    rows = ledger.ledger(ledger.measure(files, []), partitions=3, k=2, mixtures=3)
    assert math.isnan(pick(rows, "studied", "seq", "training")["seconds"])
    assert "n/a" in ledger.ledger_markdown(rows, 3, 2).splitlines()[0]
    assert ",,," in ledger.ledger_csv(rows).splitlines()[-1]


def test_outputs_are_rewritten_only_on_change(tmp_path):
    bench, models = write_study(tmp_path)
    out = tmp_path / "tables"
    argv = [str(bench), str(models), "--out-dir", str(out), "-q"]
    assert ledger.main(argv) == 0
    for f in out.iterdir():
        os.utime(f, (1_000_000_000, 1_000_000_000))
    assert ledger.main(argv) == 0
    assert {f.stat().st_mtime for f in out.iterdir()} == {1_000_000_000}
    (bench / "train/seed.tsv").write_text(HEADER + "101.00\t0\t0\t0\t0\t0\t0\t0\t0\t0\n")
    assert ledger.main(argv) == 0
    assert (out / "efficiency.csv").stat().st_mtime != 1_000_000_000
