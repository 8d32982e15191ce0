"""Time `snakemake -n` on a paper-scale study: 128 base units, all 8,128 pairs, 9 OOD sets.

Na et al. (2024) train one model per base unit and score every candidate mixture by a
parameter average; only a sample of mixtures also gets a seq model (the expensive
ground truth). At that scale the workflow must still plan in seconds: a study whose
DAG takes minutes to build cannot be rerun incrementally. This script writes such a
config (from the shipped config.yaml, so every other key stays valid) into a fresh
temporary folder, plans it from scratch with `snakemake -n` in a subprocess, and
prints the wall-clock time and the number of jobs per rule.

Every input is produced by a rule (the demo recipes download their text), so nothing
but the config file has to exist for planning.

    python benchmarks/plan_paper_scale.py             # 128 x 1 unit, k=2, 9 OOD sets, 100 seq models
    python benchmarks/plan_paper_scale.py --repeat 3  # plan three times
    python benchmarks/plan_paper_scale.py --seq-all   # a seq model for each of the 8,128 pairs
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_name  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def paper_config(partitions: int, units: int, k: int, ood: int, methods: list[str], seq_sample: int | None,
                 seq: bool = True) -> dict:
    """The shipped config, scaled up: `partitions` partitions of `units` base units each."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    source = config["sources"]["sotu"]
    # Names only matter as paths here: planning never opens the partition files.
    source["partitions"] = {f"p{i:03d}": units for i in range(partitions)}
    recipes = ["parliament", "pydoc"]
    config["eval"]["ood"] = {
        f"ood{i}": {"load": {"demo": recipes[i % 2]}, "text_column": "text"} for i in range(ood - 1)
    }
    config["eval"]["ood"]["shakespeare"] = {"load": {"seed_heldout": True}}
    config["decontaminate"]["against"] = list(config["eval"]["ood"])
    # Proxies for every k-subset; seq models (real training runs) for a sample only.
    config["mixtures"].update(k=k, sample=None, include=[], seq=seq, seq_sample=seq_sample)
    config["merge"]["methods"] = methods
    return config


def plan(workdir: Path, extra: list[str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "-n", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"snakemake -n failed:\n{done.stderr[-4000:]}")
    return elapsed, done.stdout + done.stderr


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table that `snakemake -n` prints."""
    table = output.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.fullmatch(r"(\S+)\s+(\d+)", line.strip())
        if not match:
            break
        counts[match[1]] = int(match[2])
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", type=int, default=128, help="partitions (default 128)")
    parser.add_argument("--units", type=int, default=1, help="base units per partition (default 1)")
    parser.add_argument("--k", type=int, default=2, help="partitions per mixture; all k-subsets are studied")
    parser.add_argument("--ood", type=int, default=9, help="out-of-domain sets (default 9)")
    parser.add_argument("--methods", nargs="+", default=["micro"], help="merge methods (default micro)")
    seq = parser.add_mutually_exclusive_group()
    seq.add_argument("--seq-sample", type=int, default=100,
                     help="mixtures.seq_sample: seq models for a seeded sample of this many mixtures (default 100)")
    seq.add_argument("--seq-all", action="store_true", help="a seq model for every mixture (mixtures.seq_sample: null)")
    seq.add_argument("--no-seq", action="store_true", help="proxies only (mixtures.seq: false)")
    parser.add_argument("--repeat", type=int, default=1, help="plan this many times, report each")
    parser.add_argument("--budget", type=float, default=None,
                        help="exit with status 1 when the fastest plan takes longer than this many seconds")
    parser.add_argument("--snakemake-args", nargs=argparse.REMAINDER, default=[],
                        help="further arguments for snakemake (after everything else)")
    args = parser.parse_args(argv)
    seq_sample = None if args.seq_all else args.seq_sample
    config = paper_config(args.partitions, args.units, args.k, args.ood, args.methods, seq_sample, not args.no_seq)
    with tempfile.TemporaryDirectory(prefix="mergemix-plan-") as tmp:
        workdir = Path(tmp)
        (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        times = []
        for _ in range(args.repeat):
            elapsed, output = plan(workdir, args.snakemake_args)
            times.append(elapsed)
        counts = job_counts(output)
    n_units = args.partitions * args.units
    seq = "none" if args.no_seq else ("all" if seq_sample is None else f"sample of {seq_sample}")
    print(f"study: {args.partitions} partitions x {args.units} unit(s) = {n_units} base units, k={args.k}, "
          f"{args.ood} OOD sets, methods {','.join(args.methods)}, seq models: {seq}")
    for rule, n in counts.items():
        print(f"  {rule:<24}{n:>8}")
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores")
    print("plan time (snakemake -n, wall clock): " + ", ".join(f"{t:.1f} s" for t in times))
    if args.budget is not None and min(times) > args.budget:
        print(f"slower than the budget of {args.budget:.0f} s")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
