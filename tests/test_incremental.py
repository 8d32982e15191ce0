"""Reruns do only what a change needs, proven with real Snakemake runs.

Each case copies the completed tiny study (tests/test_workflow.py), changes one thing,
checks the dry-run's job list, then runs it and checks from file times which models were
(re)trained. A test fails if a single extra model would be, or was, retrained.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import polars as pl
import pytest
import yaml

from tests.conftest import REPO
from tests.test_workflow import snakemake

pytestmark = pytest.mark.slow

TRAINING = {"seed", "unit", "ind", "seq"}


@pytest.fixture
def study(tiny_workflow, tmp_path):
    """A private copy of the completed study (file times kept, so nothing looks new)."""
    root = tmp_path / "study"
    shutil.copytree(tiny_workflow, root, symlinks=True)
    return root


def edit_config(root, change):
    config = yaml.safe_load((root / "config.yaml").read_text())
    change(config)
    (root / "config.yaml").write_text(yaml.safe_dump(config))


def plan(root, env=None) -> list[tuple[str, str]]:
    """(rule, first output) of every job `snakemake -n` would run."""
    done = snakemake(root, "-n", env=env)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    jobs, rule = [], None
    for line in printed.splitlines():
        found = re.match(r"^(?:local)?rule (\w+):$", line)
        if found:
            rule = found.group(1)
        elif rule and line.strip().startswith("output:"):
            jobs.append((rule, line.split(":", 1)[1].split(",")[0].strip()))
            rule = None
        elif rule and not line.strip():
            jobs.append((rule, ""))
            rule = None
    jobs = [job for job in jobs if job[0] != "all"]
    if not jobs:  # an empty list must mean an empty plan, not a plan this parser failed to read
        assert "Nothing to be done" in printed, printed[-3000:]
    return jobs


def planned_models(jobs) -> set[str]:
    """Model folders the plan would train, as work/models/<kind>/<id>."""
    return {os.path.dirname(out) for rule, out in jobs if rule in TRAINING}


def model_times(root) -> dict[str, float]:
    return {str(p.parent.relative_to(root)): p.stat().st_mtime_ns
            for p in (root / "work/models").rglob("model.safetensors")}


def run_and_retrained(root, env=None) -> set[str]:
    before = model_times(root)
    done = snakemake(root, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    after = model_times(root)
    return {m for m in after if before.get(m) != after[m]}


def test_new_partition_trains_only_itself_and_its_mixtures(study):
    from tests.conftest import stdlib_docstrings

    docs = stdlib_docstrings(["dataclasses"])["dataclasses"]
    with open(study / "data/extra.jsonl", "w") as fh:
        fh.writelines(json.dumps({"body": d}) + "\n" for d in docs)

    def add(config):
        config["sources"]["extra"] = {"load": {"path": "json", "data_files": ["data/extra.jsonl"], "split": "train"},
                                      "text_column": "body", "partition_by": [], "partitions": {"delta": 1},
                                      "heldout_fraction": 0.15}
    edit_config(study, add)

    new = {"work/models/unit/extra/delta/0", "work/models/seq/alpha+delta", "work/models/seq/beta+delta",
           "work/models/seq/delta+gamma"}
    jobs = plan(study)
    assert planned_models(jobs) == new
    rules = {rule for rule, _ in jobs}
    assert "tokenizer" not in rules and "seed" not in rules
    # seq models' evaluations and merged-model scoring batches: only of mixtures holding
    # the new partition (their batch is keyed by the member listed last in `sources`). Existing seed, unit and ind models are scored on its held-out set too (a
    # new mixture's mean_ind proxy needs them there); none of them retrains.
    seq = {out for rule, out in jobs if rule == "evaluate_seq"}
    assert seq == {f"results/ppl/seq/{m}.csv" for m in ("alpha+delta", "beta+delta", "delta+gamma")}
    batches = [out for rule, out in jobs if rule == "score_merged"]
    assert batches and all(out.split("/")[-2] == "delta" for out in batches), batches  # anchored on the new one
    assert {"collect", "analyze"} <= rules

    assert run_and_retrained(study) == new
    table = pl.read_csv(study / "results/perplexity.csv", schema_overrides={"method": pl.Utf8})
    assert "alpha+delta" in set(table.filter(pl.col("model_kind") == "merged")["mixture"])


def test_renaming_one_group_reruns_only_the_partitions_it_changes(study):
    def move(config):
        docs = config["sources"]["docs"]
        docs["rename"]["functools"] = "delta"  # out of gamma, into a new partition
        docs["partitions"].update(gamma=1, delta=1)
    edit_config(study, move)

    jobs = plan(study)
    assert {out for rule, out in jobs if rule == "partition"} == {"work/partitions/docs/gamma.parquet",
                                                                  "work/partitions/docs/delta.parquet"}
    trained = planned_models(jobs)
    assert {"work/models/unit/docs/alpha/0", "work/models/unit/docs/beta/0", "work/models/seq/alpha+beta"}.isdisjoint(trained)
    assert {"work/models/unit/docs/delta/0", "work/models/unit/docs/gamma/0", "work/models/seq/alpha+delta"} <= trained


def test_new_ood_set_runs_evaluations_and_analysis_only(study):
    from tests.conftest import stdlib_docstrings

    docs = stdlib_docstrings(["json/decoder", "csv"])
    pl.DataFrame({"body": [d for ds in docs.values() for d in ds]}).write_parquet(study / "data/ood2.parquet")
    edit_config(study, lambda c: c["eval"]["ood"].update(
        moredocs={"load": {"path": "parquet", "data_files": ["data/ood2.parquet"]}, "text_column": "body"}))

    jobs = plan(study)
    assert planned_models(jobs) == set()
    for rule, out in jobs:
        # the efficiency ledger reads the evaluations' benchmark files, so it reruns too
        assert rule.startswith("evaluate") or rule in ("score_merged", "partition", "shards_ood", "collect", "analyze",
                                                       "rank", "figures", "efficiency"), rule
        if rule in ("partition", "shards_ood"):
            assert "moredocs" in out, out

    assert run_and_retrained(study) == set()
    table = pl.read_csv(study / "results/perplexity.csv", schema_overrides={"method": pl.Utf8})
    scored = table.filter(pl.col("domain") == "moredocs")
    assert scored.height == table.select("model_kind", "model_id", "method").unique().height


def test_analysis_changes_rerun_analysis_only(study):
    edit_config(study, lambda c: c["analysis"].update(figure_proxy="macro"))
    assert [rule for rule, _ in plan(study)] == ["figures"]
    assert run_and_retrained(study) == set()
    edit_config(study, lambda c: c["analysis"].update(rank_by="mean_ind"))
    assert [rule for rule, _ in plan(study)] == ["rank"]
    assert run_and_retrained(study) == set()

    # new analysis code reruns analysis and figures only. Snakemake compares the content
    # of small inputs, so the test runs a copy of the package whose analyze.py it edits.
    pkg = study.parent / "pkg"
    shutil.copytree(REPO / "src" / "mergemix", pkg / "mergemix")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")]))
    # another copy of every analysis module, the ledger's included
    assert sorted(rule for rule, _ in plan(study, env)) == ["analyze", "efficiency", "figures", "rank"]
    assert run_and_retrained(study, env) == set()
    assert plan(study, env) == []
    with open(pkg / "mergemix" / "analyze.py", "a") as fh:
        fh.write("\n# edited\n")
    assert sorted(rule for rule, _ in plan(study, env)) == ["analyze", "figures", "rank"]


def test_deleting_results_retrains_nothing(study):
    """Benchmark files are products of the jobs they measure; the efficiency rule reads
    them without declaring them, so `rm -r results` reruns no training job."""
    shutil.rmtree(study / "results")
    jobs = plan(study)
    assert {"collect", "analyze", "efficiency"} <= {rule for rule, _ in jobs}
    assert not [job for job in jobs if job[0] in TRAINING]


def test_training_hyperparameter_retrains_the_models_it_shapes(study):
    """A continued-pretraining learning rate shapes every unit, ind and seq model, never the seed."""
    before = set(model_times(study))
    edit_config(study, lambda c: c["train"]["continued"].update(lr=5e-4, min_lr=5e-4))
    expected = {m for m in before if not m.endswith("/seed")}
    assert planned_models(plan(study)) == expected
    assert run_and_retrained(study) == expected
    sidecar = json.loads((study / "work/models/unit/docs/alpha/0/mergemix.json").read_text())
    assert sidecar["phase"]["lr"] == 5e-4

    # checkpoint_every only decides how often resume states are written: nothing reruns
    edit_config(study, lambda c: c["train"].update(checkpoint_every=7))
    assert plan(study) == []

    # nor do where the caches live and how many threads and processes a job gets
    def operational(config):
        config["cache_dir"] = "another-cache"
        for group in config["resources"].values():
            group["threads"] += 1
        config["resources"]["seq"]["processes"] = 2

    edit_config(study, operational)
    assert plan(study) == []
