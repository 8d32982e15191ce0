"""What a resume state costs each data-parallel rank in memory.

Under ZeRO the fp32 weights and AdamW's moments of a parameter are spread over the
ranks, and saving a resume state gathers them: a collective that every rank takes part
in. This script measures how much anonymous memory (RssAnon) each rank of a two-rank
run holds at its peak, with and without periodic resume states, in fresh processes:

1. a seed (one process, two steps) of a GPT-NeoX of about 107M parameters (hidden 768,
   8 layers, vocabulary 32,768: the merge benchmark's model, 408 MiB in float32), so
   the runs below load its moments as every unit and seq model does;
2. a seq model from it on 2 ranks through the DeepSpeed launcher (`--processes 2`,
   fp32, ZeRO stage 1), `--steps` steps, once with `checkpoint_every: 0` and once
   with a resume state every 2 steps.

Every rank's RssAnon is sampled every 20 ms (the ranks are found under the command as
the processes whose environment holds RANK). The difference between the two runs is
what the resume states cost each rank; it is printed in MiB and in model sizes.

    python benchmarks/checkpoint.py          # about 3 minutes on 2 cores
    python benchmarks/checkpoint.py --tiny   # seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OFFLINE, REPO, MiB, BenchError, machine_line, markdown_table, scratch  # noqa: E402
from train import prepare  # noqa: E402

MODELS = {
    "107M": {"hidden_size": 768, "num_layers": 8, "num_heads": 12, "intermediate_size": 3072, "context_length": 128,
             "vocab_size": 32768},
    "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "context_length": 32},
}
TRAIN = {"precision": "fp32", "zero_stage": 1, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0}
GOAL = 0.5  # a tensor at a time: the largest, the 32,768 x 768 embedding, is 0.23 of the 107M model
PHASE = {"batch_size": 4, "lr": 0.001, "min_lr": 0.001, "warmup_steps": 1}


def _rank_of(pid: int) -> int | None:
    """The RANK in a process's environment (None for the launcher, the runner, or a process gone)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = Path(f"/proc/{parent}/task").iterdir()
            children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
        except OSError:
            continue
        out += children
        todo += children
    return out


def _anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_ranks(cmd: list[str], out: Path) -> tuple[float, dict[int, int], set[str]]:
    """Run `cmd` to the end; its wall time, each rank's peak RssAnon (bytes) and the
    resume states seen in `out` while it ran (they are deleted at its end)."""
    peaks: dict[int, int] = {}
    ranks: dict[int, int] = {}  # pid -> rank
    states: set[str] = set()
    stop = threading.Event()

    def sample(root: int) -> None:
        while not stop.is_set():
            states.update(p.name for p in (out / ".resume").glob("step-*"))
            for pid in _descendants(root):
                if pid not in ranks:
                    rank = _rank_of(pid)
                    if rank is None:
                        continue
                    ranks[pid] = rank
                peaks[ranks[pid]] = max(peaks.get(ranks[pid], 0), _anon(pid))
            stop.wait(0.02)

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, **OFFLINE})
    sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise BenchError(f"training failed (exit {proc.returncode}): {' '.join(cmd)}\n{output[-3000:]}")
    return time.perf_counter() - start, peaks, states


def command(folder: Path, model: dict, kind: str, steps: int, every: int, out: Path, processes: int) -> list[str]:
    cmd = [sys.executable, "-m", "mergemix.train", "--kind", kind, "--tokenizer", str(folder / "tokenizer"),
           "--unit", f"{folder / 'train'}:0", "--unit-tokens", str(steps * PHASE["batch_size"] * model["context_length"] + 1),
           "--model-json", json.dumps(model), "--train-json", json.dumps({**TRAIN, "checkpoint_every": every}),
           "--phase-json", json.dumps(PHASE), "--threads", "1", "--processes", str(processes), "--out", str(out)]
    if kind != "seed":
        cmd += ["--init", str(folder / "seed")]
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="steps of each two-rank run")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, width-32 model: a smoke test")
    args = parser.parse_args(argv)
    name = "tiny" if args.tiny else "107M"
    model = MODELS[name]
    if args.steps < 3:
        parser.error("--steps must be at least 3 (a resume state every 2 steps, before the last)")

    print(machine_line())
    folder = scratch("checkpoint")
    try:
        prepare(folder, 512 if args.tiny else 4096)
        run_ranks(command(folder, model, "seed", 2, 0, folder / "seed", 1), folder / "seed")
        model_bytes = (folder / "seed" / "model.safetensors").stat().st_size  # float32 weights and a small header
        rows, peaks = [], {}
        for every in (0, 2):
            out = folder / f"seq-every-{every}"
            wall, peaks[every], states = run_ranks(command(folder, model, "seq", args.steps, every, out, 2), out)
            if bool(states) != bool(every):
                raise BenchError(f"checkpoint_every {every}: resume states seen {sorted(states)}")
            print(f"checkpoint_every {every}: {wall:.1f} s, peak RssAnon by rank: "
                  + ", ".join(f"{r}: {b / MiB:.0f} MiB" for r, b in sorted(peaks[every].items())))
            shutil.rmtree(out)
        if sorted(peaks[0]) != [0, 1] or sorted(peaks[2]) != [0, 1]:
            raise BenchError(f"expected ranks 0 and 1 to be sampled, saw {sorted(peaks[0])} and {sorted(peaks[2])}")
        for rank in (0, 1):
            cost = peaks[2][rank] - peaks[0][rank]
            rows.append({"rank": rank, "no states MiB": round(peaks[0][rank] / MiB),
                         "states every 2 steps MiB": round(peaks[2][rank] / MiB), "cost MiB": round(cost / MiB),
                         "cost / model": round(cost / model_bytes, 2)})
        print(f"\nmodel: {name}, {model_bytes / MiB:.0f} MiB of float32 weights; 2 ranks, fp32, ZeRO stage 1, "
              f"{args.steps} steps")
        print(markdown_table(rows, list(rows[0])))
        worst = max(row["cost / model"] for row in rows)
        print(f"ratio: the most a rank's peak grows with resume states / the model's size: {worst:.2f}")
        verdict = "PASS" if worst <= GOAL else "FAIL"
        print(f"goal {verdict}: resume states cost each rank at most {GOAL} of the model's size"
              + (" (the tiny model is smaller than the memory's noise)" if args.tiny else ""))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except BenchError as exc:
        raise SystemExit(f"checkpoint benchmark: {exc}")
