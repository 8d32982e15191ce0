"""The peer benchmarks run end to end at a tiny size and print their ratio lines.

Speed is not asserted here (a timed test on a shared machine measures the machine):
the scripts print their goals. What is asserted is what must hold at any size: every
script finishes, prints its table and ratios, and the contenders agree (the merged
tensors, the perplexities, the loss curves).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def bench(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.startswith("machine: "), done.stdout[:500]
    assert "load average" in done.stdout.splitlines()[0]
    return done.stdout


def number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"no line matching {pattern!r} in:\n{text}"
    return float(found[1])


def test_merge_benchmark_tiny():
    out = bench("merge.py", "--tiny", "--peers", "naive", "--cache", "warm")
    assert "| warm | 3 | mergemix |" in out and "| warm | 3 | cat |" in out
    assert number(r"ratio \(warm, k=3\): mergemix / naive: wall time ([\d.]+)", out) > 0
    assert number(r"ratio \(warm, k=3\): mergemix read rate / cat's: ([\d.]+)", out) > 0
    # The same float32 average whichever way it is computed: equal up to summation order.
    assert number(r"max \|mergemix - naive\| over all merged tensors: ([\d.e+-]+)", out) < 1e-6
    assert re.search(r"^goal (PASS|FAIL): \(warm\) mergemix peak RSS <= two models' size", out, re.M)


def test_evaluate_benchmark_tiny():
    out = bench("evaluate.py", "--tiny", "--peers", "hf")
    assert number(r"ratio: mergemix / hf tokens per second: ([\d.]+)", out) > 0
    # Same documents, same windows: the perplexities agree, and the script says so.
    assert "goal PASS: mergemix perplexity equals the plain HF loop's to 1e-5 relative" in out


def test_train_benchmark_tiny():
    out = bench("train.py", "--tiny")
    assert number(r"ratio \(tiny\): mergemix / torch loop tokens per second: ([\d.]+)", out) > 0
    assert number(r"peak: ([\d.]+) GFLOP/s", out) > 0
    # Same initialisation, batches, optimizer and schedule: the same loss at every step.
    assert number(r"max \|loss difference\| between the two loops over all steps: ([\d.e+-]+)", out) < 1e-4


def test_engine_benchmark_tiny():
    out = bench("engine.py", "--tiny", "--partitions", "4", "--file-mixtures", "2")
    assert "| engine (one process) | 6 |" in out
    assert number(r"ratio: engine / file-based mixtures per hour: ([\d.]+)", out) > 0
    # The engine and merge + evaluate score the same averages on the same windows.
    assert "goal PASS: the engine's perplexities equal the file-based path's to 1e-5 relative" in out


def test_prepare_benchmark_tiny():
    out = bench("prepare.py", "--tiny")
    # the script itself refuses a run whose shards and peer disagree on the token count, or
    # whose decontamination keeps a copy of the planted document
    for step in ("partition", "tokenize", "decontaminate", "in-memory tokenize (peer)"):
        assert re.search(rf"^\| {re.escape(step)} \| 1 / 4 \| [\d,]+ / [\d,]+ \|", out, re.M), step
    assert math.isfinite(number(r"ratio: tokenize / in-memory peer growth per document: ([\d.-]+)", out))
    assert re.search(r"^goal (PASS|FAIL): tokenize peak anonymous memory grows by under 256 bytes a document", out, re.M)


def test_checkpoint_benchmark_tiny():
    """Two ranks, with and without resume states; the script itself refuses a run in which
    the states were not written, or the ranks were not found and sampled."""
    out = bench("checkpoint.py", "--tiny", "--steps", "3")
    for rank in (0, 1):
        assert re.search(rf"^\| {rank} \| \d+ \| \d+ \| -?\d+ \| -?[\d.]+ \|$", out, re.M), out
    assert math.isfinite(number(r"ratio: the most a rank's peak grows with resume states / the model's size: (-?[\d.]+)", out))


def test_train_benchmark_gpu_path_refuses_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA path runs instead of refusing")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--device", "cuda"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda needs a CUDA GPU"), done.stderr
