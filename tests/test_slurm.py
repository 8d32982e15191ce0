"""The tiny workflow through a real Slurm cluster with profiles/slurm.

Needs a running cluster whose client commands work from here (scripts/test_slurm.sh
starts a one-node one on loopback, runs this file and stops it). Without one the tests
are skipped, unless MERGEMIX_REQUIRE_SLURM=1 (set by that script) makes that a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from tests.conftest import REPO, stdlib_docstrings
from tests.test_workflow import MODULES, tiny_config, write_data


def cluster_problem() -> str | None:
    """Why no Slurm job can run from here, or None when an idle or mixed node answers."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (scripts/test_slurm.sh starts a local cluster)"
    try:
        sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no Slurm controller answers"
    if sinfo.returncode != 0:
        last = (sinfo.stderr.strip().splitlines() or ["no output"])[-1]
        return f"no Slurm cluster answers (sinfo: {last})"
    if not {"idle", "mixed", "allocated"} & set(sinfo.stdout.split()):
        return f"no usable Slurm node (states: {sinfo.stdout.split()})"
    return None


PROBLEM = cluster_problem()
if PROBLEM and os.environ.get("MERGEMIX_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"MERGEMIX_REQUIRE_SLURM=1 but {PROBLEM}")
pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))]

SUBMITTED = re.compile(r"Job (\S+) has been submitted with SLURM jobid (\d+) \(log: (\S+)\)")
KINDS = {"ind": 1, "merged": 3, "seed": 1, "seq": 3, "unit": 2}


def node_cpus() -> int:
    """CPUs of the smallest node: no job of the test may ask for more."""
    out = subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True, check=True).stdout
    return min(int(c.rstrip("+")) for c in out.split())


def slurm_command(*args: str) -> list[str]:
    """snakemake with the shipped profile; the overrides fit a small cluster without accounting."""
    return [
        sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
        "--profile", str(REPO / "profiles" / "slurm"),
        "--cores", str(node_cpus()),  # no job (seed, group job) asks for more CPUs than a node has
        "--jobs", "8",  # keep the node busy: Slurm queues what does not fit
        "--slurm-status-command", "squeue",  # no slurmdbd here: sacct has nothing to say
        "--slurm-init-seconds-before-status-checks", "2",
        "--slurm-keep-successful-logs",  # the test reads them
        "--slurm-no-account",
        "--latency-wait", "10",
        *args,
    ]


def env() -> dict[str, str]:
    """Jobs inherit this environment (sbatch --export=ALL): the same python and package."""
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), str(REPO), out.get("PYTHONPATH")) if p)
    return out


def slurm_config(root: Path) -> dict:
    config = tiny_config(root)
    # Tiny models: small memory and time limits that fit any node; the seed keeps the
    # demo's 16 threads, which --cores caps at the node's CPUs.
    config["resources"] = {
        "seed": {"threads": 16, "mem_mb": 1500, "runtime": 15, "gpu": 0},
        "train": {"threads": 1, "mem_mb": 1500, "runtime": 15, "gpu": 0},
        "seq": {"threads": 1, "mem_mb": 1500, "runtime": 15, "gpu": 0},
        "evaluate": {"threads": 1, "mem_mb": 1000, "runtime": 10, "gpu": 0},
        "engine": {"threads": 1, "mem_mb": 1200, "runtime": 10, "gpu": 0},
        "light": {"threads": 1, "mem_mb": 800, "runtime": 5, "gpu": 0},
    }
    # One merge method: test_workflow covers the others; here every job costs a Slurm job.
    config["merge"]["methods"] = ["micro"]
    return config


def submissions(text: str) -> list[tuple[int, Path]]:
    """(Slurm job id, Slurm log) of every sbatch call snakemake reported."""
    return [(int(s), Path(log)) for _, s, log in SUBMITTED.findall(text)]


def check_tables(root: Path) -> None:
    table = pl.read_csv(root / "results/perplexity.csv", schema_overrides={"method": pl.Utf8, "model_id": pl.Utf8})
    kinds = table.group_by("model_kind").agg(pl.col("model_id").n_unique())
    assert dict(kinds.iter_rows()) == KINDS
    assert set(table.filter(pl.col("model_kind") == "seq")["mixture"]) == {"alpha+beta", "alpha+gamma", "beta+gamma"}
    assert table["ppl"].is_finite().all() and (table["ppl"] > 1).all()
    corr = pl.read_csv(root / "results/correlations.csv")
    assert {"micro", "mean_ind", "ind_id"} <= set(corr["proxy"])
    assert (root / "results/figures/figure3.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    write_data(root, stdlib_docstrings([m for ms in MODULES.values() for m in ms]))
    (root / "config.yaml").write_text(yaml.safe_dump(slurm_config(root)))
    start = time.monotonic()
    done = subprocess.run(slurm_command(), cwd=root, env=env(), capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    (root / "snakemake.out").write_text(log)
    assert done.returncode == 0, log[-6000:]
    print(f"workflow through Slurm: {time.monotonic() - start:.0f} s")
    return root, log


def test_workflow_runs_to_completion_through_slurm(slurm_run):
    root, log = slurm_run
    check_tables(root)
    jobs = submissions(log)
    # Every job went through sbatch (the `all` target has no command), each with its own
    # Slurm log: 12 data-preparation (the data table among them), 5 decontamination (the filter, 3 partitions, the
    # table), 9 training, 7 evaluation jobs, 2 engine batches (one per mixture anchor:
    # beta, gamma), the efficiency ledger, the ranking and 1 report group.
    logs = sorted((root / ".snakemake/slurm_logs").rglob("*.log"))
    assert sorted(p for _, p in jobs) == logs
    assert len(jobs) == len({j for j, _ in jobs}) == 12 + 5 + 9 + 7 + 2 + 1 + 1 + 1
    by_dir = {}
    for p in logs:
        by_dir.setdefault(p.relative_to(root / ".snakemake/slurm_logs").parts[0], []).append(p)
    counts = {k: len(v) for k, v in by_dir.items()}
    assert counts == {
        "rule_partition": 5, "rule_tokenizer": 1, "rule_shards": 4, "rule_shards_ood": 1, "rule_data_table": 1, "rule_eval_filter": 1,
        "rule_decontaminate": 3, "rule_decontamination_table": 1, "rule_seed": 1,
        "rule_unit": 4, "rule_ind": 1, "rule_seq": 3, "rule_evaluate_seed": 1, "rule_evaluate_unit": 2,
        "rule_evaluate_ind": 1, "rule_evaluate_seq": 3, "rule_score_merged": 2,
        "rule_efficiency": 1, "rule_rank": 1, "group_report_analyze_collect_figures": 1,
    }, counts
    # Each log is the job's own output, written on the node by its job step: the group
    # job ran its members (collect, analyze, figures) inside one allocation.
    group_log = by_dir["group_report_analyze_collect_figures"][0].read_text()
    for rule in ("collect", "analyze", "figures"):
        assert f"rule {rule}:" in group_log, group_log[-2000:]
    rank_log = by_dir["rule_rank"][0].read_text()
    assert "rule rank:" in rank_log and "Finished jobid" in rank_log, rank_log[-2000:]
    seed_log = by_dir["rule_seed"][0].read_text()
    assert "rule seed:" in seed_log and "Finished jobid" in seed_log, seed_log[-2000:]
    # The group job asks for the largest memory of its members and the sum of their
    # runtimes (3 x 5 min); Slurm's own record of it (still held, MinJobAge) says so.
    group = max(j for j, p in jobs if "group_report" in str(p))
    record = subprocess.run(["scontrol", "-o", "show", "job", str(group)], capture_output=True, text=True)
    assert record.returncode == 0, record.stderr
    assert "JobState=COMPLETED" in record.stdout and "TimeLimit=00:15:00" in record.stdout, record.stdout
    assert re.search(r"MinMemoryNode=800M\b", record.stdout) and "NumCPUs=1 " in record.stdout, record.stdout
    # The seed's threads (16 in config, capped by --cores to the node's CPUs) became the
    # CPUs of its Slurm job.
    cpus = min(16, node_cpus())
    assert re.search(rf"rule seed:.*?threads: {cpus}\b.*?cpus_per_task={cpus}\b", log, re.S), log[:4000]


def running_job(comment: str, timeout: float) -> str:
    """Slurm job id of the job in state RUNNING with this comment (the plugin's rule_<rule>_wildcards_<values>)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i|%k"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            jobid, _, job_comment = line.partition("|")
            if job_comment == comment:
                return jobid
        time.sleep(0.2)
    raise AssertionError(f"no running job {comment} within {timeout:.0f} s")


def wait_for_write(path: Path, after: float, timeout: float) -> None:
    """Until `path` was (re)written after time `after`: the job's command has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime > after:
            return
        time.sleep(0.2)
    raise AssertionError(f"{path} not written within {timeout:.0f} s")


def test_killed_training_job_is_retried_and_the_workflow_completes(slurm_run, tmp_path):
    done_root, _ = slurm_run
    root = tmp_path / "rerun"
    # A copy of the finished study (timestamps kept). Retraining one seq model reruns it,
    # its evaluation and the report through Slurm; its training job is killed mid-run.
    shutil.copytree(done_root, root, symlinks=True, ignore=shutil.ignore_patterns("slurm_logs"))
    mixture = "alpha+gamma"  # three units: the longest seq training
    model = root / "work/models/seq" / mixture / "model.safetensors"
    before = (root / "results/perplexity.csv").stat().st_mtime
    started = time.time()
    out = open(tmp_path / "snakemake.out", "w+")
    proc = subprocess.Popen(slurm_command("--forcerun", str(model.relative_to(root))), cwd=root, env=env(),
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        jobid = running_job(f"rule_seq_wildcards_{mixture}", timeout=120)
        # Kill once the training command itself runs (it truncates its log on start).
        wait_for_write(root / "logs/train/seq" / f"{mixture}.log", after=started, timeout=120)
        killed_at = time.time()
        cancel = subprocess.run(["scancel", jobid], capture_output=True, text=True)
        assert cancel.returncode == 0, cancel.stderr
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
    out.seek(0)
    log = out.read()
    assert proc.returncode == 0, log[-6000:]

    # Two Slurm jobs for that training: the cancelled one, then snakemake's retry.
    attempts = sorted((root / ".snakemake/slurm_logs/rule_seq" / mixture).glob("*.log"), key=lambda p: int(p.stem))
    assert [p.stem for p in attempts][:1] == [jobid] and len(attempts) == 2, attempts
    first = attempts[0].read_text()
    assert f"JOB {jobid} ON" in first and "CANCELLED" in first, first[-2000:]  # slurmstepd's own line
    assert "Trying to restart job" in log, log[-6000:]
    # The retry asked Slurm for twice the memory (a job killed for memory gets more).
    memory = {}
    for attempt in attempts:
        record = subprocess.run(["scontrol", "-o", "show", "job", attempt.stem], capture_output=True, text=True)
        assert record.returncode == 0, record.stderr
        memory[attempt.stem] = re.search(r"MinMemoryNode=(\w+)", record.stdout).group(1)
    assert list(memory.values()) == ["1500M", "3000M"], memory
    # The retry trained the model again after the kill, and the tables were rebuilt from it.
    assert model.stat().st_mtime > killed_at
    assert (root / "results/perplexity.csv").stat().st_mtime > before
    check_tables(root)
