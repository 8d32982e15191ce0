"""The efficiency ledger: measured compute of modular training vs. training every mixture.

Na et al. (2024, section 5.5) compare the cost of their method -- train one model
per base unit once, then score any mixture by averaging its units' models -- with
the traditional ablation that trains a model on every candidate mixture (640 vs.
2,688 GPU-hours in their study). This module makes that comparison for a real
run, from what Snakemake measured, not from guesses:

- every training and evaluation rule's ``benchmark:`` TSV under
  ``results/benchmarks/`` (wall seconds, column ``s``; the mean over rows when a
  rule was benchmarked with repeats), and
- the checkpoint sidecars ``work/models/**/mergemix.json`` (``tokens`` trained,
  ``hardware.world_size`` for data-parallel jobs).

It writes ``efficiency.csv`` and ``efficiency.md`` with three sections:

``measured``
    seconds, rank-seconds (wall seconds x data-parallel ranks: GPU-seconds on
    GPUs) and tokens per stage: seed, unit, ind and seq training; seed, ind,
    merged and seq scoring; merged checkpoints written on request.
``studied``
    the ``--mixtures`` mixtures of the study: the modular cost (unit training
    plus merged-model scoring) against the seq cost (a seq model trained and
    scored per mixture). Where seq models were trained for a sample only
    (``mixtures.seq_sample``), the seq cost is the measured mean per seq model
    times the number of mixtures, marked ``projected``.
``all candidates``
    the same for every k-partition mixture of the study's n partitions,
    C(n, k), or C(n - f, k - f) when f partitions are in every mixture
    (``mixtures.fixed``, ``--fixed``): unit training does not grow; seq
    training and scoring, and merged-model scoring, grow with the number of
    mixtures (mean per mixture times the number of candidates).

The modular method scores one merged model per mixture. A study that scores
several merge methods (``merge.methods``) is charged the mean over them: the
``measured`` row holds every method's scoring, the per-mixture cost divides by
the number of methods found among the benchmark files.

The seed is shared by both approaches and appears in ``measured`` only. ind
models (partitions of several units trained alone) serve the ``mean_ind`` and
``ind_id`` baselines, and are listed apart, except where ``merged`` is among the
merge methods: that method averages one model per partition, the ind model of a
partition of several units and the unit model of a one-unit partition, where
``micro``, ``macro`` and ``weighted`` average the unit models. Modular training
is charged the mean over the methods of what each one's inputs cost.

The ratios of the caption divide rank-seconds (GPU-seconds on GPUs, the paper's
GPU-hours: a seq model trained on 4 GPUs costs 4x its wall time), then wall
seconds; on one process per job the two agree.

Command line::

    python -m mergemix.ledger results/benchmarks work/models \\
        --partitions 8 --k 2 --mixtures 12 [--fixed 0] --out-dir results/tables

Paths are benchmark TSVs, sidecars, or folders searched for both (the workflow
passes the study's files one by one, so files left over from an earlier study
are not counted). Files are replaced only when their bytes change.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

from mergemix import io

log = logging.getLogger("mergemix.ledger")

SIDECAR = "mergemix.json"
#: stage -> (what it is, which approach it counts for)
STAGES: dict[str, tuple[str, str]] = {
    "seed_train": ("seed pretraining", "shared"),
    "unit_train": ("unit models trained", "modular"),
    "ind_train": ("ind models trained (several-unit partitions)", "baseline"),
    "seq_train": ("seq models trained", "seq"),
    "seed_eval": ("seed scored", "shared"),
    "ind_eval": ("unit and ind models scored", "baseline"),
    "merged_eval": ("merged models scored (engine batches)", "modular"),
    "seq_eval": ("seq models scored", "seq"),
    "merge_write": ("merged checkpoints written on request", "extra"),
}
CSV_COLUMNS = ("section", "item", "approach", "basis", "mixtures", "jobs", "seconds", "rank_seconds", "tokens")


class LedgerError(ValueError):
    """A benchmark or sidecar file the ledger cannot read, named with the reason."""


# --------------------------------------------------------------------------
# reading


def _tails(path: Path, anchor: str) -> Iterator[list[str]]:
    """Path components after each ``anchor`` folder, the first occurrence first.

    The callers take the first tail that parses: a source or partition may be named
    ``models`` or ``benchmarks`` (``work/models/unit/models/seq/0``), and a study may
    live under a folder of that name (``runs/models/study/work/models/...``).
    """
    parts = path.parts
    for i, part in enumerate(parts):
        if part == anchor:
            yield list(parts[i + 1:])


def benchmark_stage(path: str | Path) -> tuple[str, str] | None:
    """(stage, model id) of a benchmark TSV from its path under ``benchmarks/``; see _stage."""
    return next(filter(None, map(_stage, _tails(Path(path), "benchmarks"))), None)


def _stage(tail: list[str]) -> tuple[str, str] | None:
    """(stage, model id) of a benchmark TSV from its path under ``benchmarks/``.

    The id matches the checkpoint folder under ``work/models/<kind>/`` (e.g.
    ``docs/alpha/0`` for a unit, ``alpha+beta`` for a seq model) so that a
    training benchmark finds its sidecar. None for a path outside the layout
    of rules/train.smk, rules/evaluate.smk and rules/merge.smk.
    """
    if not tail or not tail[-1].endswith(".tsv"):
        return None
    tail = [*tail[:-1], tail[-1][: -len(".tsv")]]
    head, rest = tail[0], tail[1:]
    if head == "train":
        if rest == ["seed"]:
            return "seed_train", "seed"
        if len(rest) >= 2 and rest[0] in ("unit", "ind", "seq"):
            return f"{rest[0]}_train", "/".join(rest[1:])
    elif head == "evaluate":
        if rest == ["seed"]:
            return "seed_eval", "seed"
        if len(rest) >= 2 and rest[0] in ("unit", "ind"):
            return "ind_eval", "/".join(rest[1:])
        if len(rest) >= 2 and rest[0] == "seq":
            return "seq_eval", "/".join(rest[1:])
        if len(rest) >= 3 and rest[0] == "merged":  # METHOD/ANCHOR/CHUNK
            return "merged_eval", "/".join(rest[1:])
    elif head == "merge" and len(rest) >= 2:
        return "merge_write", "/".join(rest)
    return None


def sidecar_model(path: str | Path) -> tuple[str, str] | None:
    """(kind, id) of a checkpoint sidecar from its path under ``models/``, or None."""
    for tail in _tails(Path(path), "models"):
        if len(tail) >= 2 and tail[-1] == SIDECAR and tail[0] in ("seed", "unit", "ind", "seq"):
            return tail[0], "/".join(tail[1:-1]) or tail[0]
    return None


def read_benchmark(path: str | Path) -> float:
    """Wall seconds of one Snakemake benchmark TSV (the mean over its rows)."""
    path = Path(path)
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise LedgerError(f"{path}: {io.describe_os_error(exc)}") from exc
    if not rows or "s" not in rows[0]:
        raise LedgerError(f"{path}: not a Snakemake benchmark file (no 's' column of wall seconds)")
    try:
        seconds = [float(r["s"]) for r in rows]
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"{path}: column 's' holds a value that is not a number of seconds") from exc
    if any(not math.isfinite(s) or s < 0 for s in seconds):
        raise LedgerError(f"{path}: column 's' holds a negative or non-finite number of seconds")
    return sum(seconds) / len(seconds)


def read_sidecar(path: str | Path) -> tuple[int, int]:
    """(tokens trained, data-parallel ranks) from a checkpoint sidecar."""
    path = Path(path)
    try:
        side = json.loads(path.read_text())
    except OSError as exc:
        raise LedgerError(f"{path}: {io.describe_os_error(exc)}") from exc
    except json.JSONDecodeError as exc:
        raise LedgerError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from exc
    tokens = side.get("tokens") if isinstance(side, dict) else None
    if not isinstance(tokens, int) or tokens < 0:
        raise LedgerError(f"{path}: no 'tokens' count (a non-negative integer) in the sidecar")
    ranks = (side.get("hardware") or {}).get("world_size", 1)
    return tokens, ranks if isinstance(ranks, int) and ranks > 0 else 1


def collect_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[Path]]:
    """Benchmark TSVs and sidecars among ``paths``; folders are searched recursively.

    A file named explicitly must be one or the other (LedgerError otherwise);
    inside a folder, files outside the layout are skipped.
    """
    benches: list[Path] = []
    sides: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            benches += sorted(q for q in p.rglob("*.tsv") if benchmark_stage(q))
            sides += sorted(q for q in p.rglob(SIDECAR) if sidecar_model(q))
        elif benchmark_stage(p):
            if not p.is_file():
                raise LedgerError(
                    f"{p}: the measurement is missing (deleted?): rerun the job that writes it "
                    "(snakemake --forcerun with its rule) to count it"
                )
            benches.append(p)
        elif sidecar_model(p):
            sides.append(p)
        elif not p.exists():
            raise LedgerError(f"{p}: no such file or folder")
        else:
            raise LedgerError(
                f"{p}: neither a benchmark (benchmarks/{{train,evaluate,merge}}/...tsv) "
                f"nor a checkpoint sidecar (models/{{seed,unit,ind,seq}}/.../{SIDECAR})"
            )
    return list(dict.fromkeys(benches)), list(dict.fromkeys(sides))


# --------------------------------------------------------------------------
# the ledger


@dataclass
class Stage:
    """The jobs of one stage, and their totals: wall seconds, rank-seconds and tokens trained."""

    #: one (model id, seconds, rank-seconds, tokens) per job
    runs: list[tuple[str, float, float, int]] = field(default_factory=list)

    @property
    def jobs(self) -> int:
        return len(self.runs)

    @property
    def ids(self) -> list[str]:
        return [run[0] for run in self.runs]

    @property
    def seconds(self) -> float:
        return sum(run[1] for run in self.runs)

    @property
    def rank_seconds(self) -> float:
        return sum(run[2] for run in self.runs)

    @property
    def tokens(self) -> int:
        return sum(run[3] for run in self.runs)

    def only(self, keep) -> Stage:
        """The jobs whose model id passes ``keep``."""
        return Stage([run for run in self.runs if keep(run[0])])


def measure(benchmarks: Sequence[Path], sidecars: Sequence[Path]) -> dict[str, Stage]:
    """Every stage's totals; a training job's tokens and ranks come from its sidecar."""
    models = {sidecar_model(p): read_sidecar(p) for p in sidecars}
    stages = {name: Stage() for name in STAGES}
    for path in benchmarks:
        stage, ident = benchmark_stage(path)
        seconds = read_benchmark(path)
        ranks, tokens = 1, 0
        if stage.endswith("_train"):
            kind = stage[: -len("_train")]
            found = models.get((kind, ident))
            if found is None:
                log.warning("%s: no sidecar %s/%s/%s; its tokens are not counted", path, kind, ident, SIDECAR)
            else:
                tokens, ranks = found
        stages[stage].runs.append((ident, seconds, seconds * ranks, tokens))
    return stages


def _seq_size(stages: dict[str, Stage]) -> int | None:
    sizes = Counter(len(m.split("+")) for m in stages["seq_train"].ids)
    return sizes.most_common(1)[0][0] if sizes else None


def _unit_partition(unit_id: str) -> str:
    """The partition of a unit model id, SOURCE/PARTITION/UNIT."""
    return unit_id.split("/")[-2]


def _partitions(stages: dict[str, Stage]) -> int:
    return len({u.rsplit("/", 1)[0] for u in stages["unit_train"].ids})


def _row(section: str, item: str, approach: str, basis: str, mixtures: float, jobs: float,
         seconds: float, rank_seconds: float, tokens: float) -> dict:
    return {"section": section, "item": item, "approach": approach, "basis": basis,
            "mixtures": mixtures, "jobs": jobs, "seconds": seconds, "rank_seconds": rank_seconds,
            "tokens": tokens}


def _total(train: tuple[float, float, float], score: tuple[float, float, float]) -> tuple[float, float, float]:
    """Seconds and rank-seconds add up; tokens are the training tokens."""
    return train[0] + score[0], train[1] + score[1], train[2]


def candidates(n: int, k: int | None, fixed: int = 0) -> int:
    """Candidate mixtures: k-subsets of n partitions that hold all ``fixed`` ones."""
    if k is None or not 0 <= fixed <= k <= n:
        return 0
    return math.comb(n - fixed, k - fixed)


def merge_methods(scored: Stage) -> list[str]:
    """The merge methods among the merged-scoring benchmarks (ids METHOD/ANCHOR/CHUNK)."""
    return sorted({ident.split("/")[0] for ident in scored.ids})


def ledger(stages: dict[str, Stage], partitions: int | None = None, k: int | None = None,
           mixtures: int | None = None, fixed: int = 0) -> list[dict]:
    """The rows of efficiency.csv (see the module docstring).

    ``partitions`` (n), ``k`` and ``fixed`` (partitions in every mixture) give
    the C(n - fixed, k - fixed) candidate mixtures;
    ``mixtures`` is how many mixtures the study scores. Left out, they are
    read from the files: n from the unit models' partitions, k as the most
    common size of the seq models' mixtures, ``mixtures`` as their number.
    """
    nan = float("nan")
    n = partitions if partitions is not None else _partitions(stages)
    k = k if k is not None else _seq_size(stages)
    seq_t, seq_e = stages["seq_train"], stages["seq_eval"]
    m = mixtures if mixtures is not None else len(set(seq_t.ids))
    n_candidates = candidates(n, k, fixed)

    rows = []
    for name, (what, approach) in STAGES.items():
        st = stages[name]
        rows.append(_row("measured", what, approach, "measured", nan, st.jobs, st.seconds,
                         st.rank_seconds, st.tokens if name.endswith("_train") else nan))

    def mean(st: Stage, attr: str) -> float:
        return getattr(st, attr) / st.jobs if st.jobs else nan

    unit = stages["unit_train"]
    scored = stages["merged_eval"]
    # one merged model per mixture: with several merge methods, the mean over them
    methods = merge_methods(scored)
    n_methods = max(1, len(methods))
    if "merged" in methods:
        # that method's inputs: the ind model of a partition of several units, the unit
        # model of a one-unit partition; the other methods' inputs: every unit model
        ind = stages["ind_train"]
        several = set(ind.ids)
        merged = Stage(ind.runs + unit.only(lambda u: _unit_partition(u) not in several).runs)
        mod_train = tuple((getattr(merged, a) + (n_methods - 1) * getattr(unit, a)) / n_methods
                          for a in ("seconds", "rank_seconds", "tokens"))
        mod_jobs = ind.jobs + unit.jobs if n_methods > 1 else merged.jobs  # the jobs any method needs
        if n_methods > 1:
            unit_item = (f"training: unit models, and ind models for the merged method (mean of the {n_methods} "
                         "merge methods' inputs; do not grow with mixtures)")
        else:
            unit_item = "training: ind models, unit models of one-unit partitions (do not grow with mixtures)"
    else:
        unit_item = "training: unit models (do not grow with mixtures)"
        mod_train = (unit.seconds, unit.rank_seconds, unit.tokens)
        mod_jobs = unit.jobs
    per_mix = {a: (getattr(scored, a) / (m * n_methods) if m else nan) for a in ("seconds", "rank_seconds")}
    score_item = "scoring: merged models" + (f" (mean of {n_methods} merge methods)" if n_methods > 1 else "")
    for section, count in (("studied", m), ("all candidates", n_candidates)):
        # measured where the run did exactly this many (a study of every candidate)
        basis_seq = "measured" if seq_t.jobs == count else "projected"
        basis_mod = "measured" if count == m else "projected"
        mod_score = (per_mix["seconds"] * count, per_mix["rank_seconds"] * count, nan)
        if basis_seq == "measured":
            seq_train = (seq_t.seconds, seq_t.rank_seconds, seq_t.tokens)
        else:
            seq_train = (mean(seq_t, "seconds") * count, mean(seq_t, "rank_seconds") * count,
                         mean(seq_t, "tokens") * count)
        eval_basis = "measured" if seq_e.jobs == count else "projected"
        if eval_basis == "measured":
            seq_score = (seq_e.seconds, seq_e.rank_seconds, nan)
        else:
            seq_score = (mean(seq_e, "seconds") * count, mean(seq_e, "rank_seconds") * count, nan)
        rows += [
            _row(section, unit_item, "modular", "measured", count, mod_jobs, *mod_train),
            _row(section, score_item, "modular", basis_mod, count,
                 scored.jobs / n_methods if basis_mod == "measured" else nan, *mod_score),
            _row(section, "total", "modular", basis_mod, count, nan, *_total(mod_train, mod_score)),
            _row(section, "training: one seq model per mixture", "seq", basis_seq, count, count, *seq_train),
            _row(section, "scoring: seq models", "seq", eval_basis, count, count, *seq_score),
            _row(section, "total", "seq", "measured" if basis_seq == eval_basis == "measured" else "projected",
                 count, nan, *_total(seq_train, seq_score)),
        ]
    return rows


# --------------------------------------------------------------------------
# output


def _cell(v: float | int | None, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    return str(int(round(v))) if digits == 0 else f"{v:.{digits}f}"


def ledger_csv(rows: list[dict]) -> str:
    """efficiency.csv: integers for counts and tokens, seconds to 0.01 s, blanks for n/a."""
    out = StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    digits = {"mixtures": 0, "jobs": 0, "tokens": 0, "seconds": 2, "rank_seconds": 2}
    for r in rows:
        writer.writerow([_cell(r[c], digits[c]) if c in digits else r[c] for c in CSV_COLUMNS])
    return out.getvalue()


def _md_num(v: float, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a" if digits else ""
    return f"{v:,.{digits}f}"


def ratio(rows: list[dict], section: str, what: str = "total", column: str = "rank_seconds") -> float:
    """Seq over modular ``column`` (rank_seconds or seconds) in ``section`` for ``what``:
    "total" or "training"."""
    tot = {r["approach"]: r[column] for r in rows
           if r["section"] == section and r["item"].startswith(what)}
    mod, seq = tot.get("modular", float("nan")), tot.get("seq", float("nan"))
    return seq / mod if mod and math.isfinite(mod) and math.isfinite(seq) else float("nan")


def ratios(rows: list[dict], section: str) -> str:
    """The caption's seq/modular ratios of ``section``: rank-seconds (the paper's
    GPU-hours), then wall seconds where they differ (data-parallel jobs)."""
    def pair(column: str) -> str:
        return (f"training {_md_num(ratio(rows, section, 'training', column), 2)}, "
                f"with scoring {_md_num(ratio(rows, section, 'total', column), 2)}")

    text = f"seq/modular rank-seconds: {pair('rank_seconds')}"
    if pair("seconds") != pair("rank_seconds"):
        text += f"; wall seconds: {pair('seconds')}"
    return text


def ledger_markdown(rows: list[dict], partitions: int, k: int | None, fixed: int = 0) -> str:
    studied = next((r["mixtures"] for r in rows if r["section"] == "studied"), 0)
    cand = next((r["mixtures"] for r in rows if r["section"] == "all candidates"), 0)
    space = (f"C({partitions}, {k})" if not fixed else
             f"C({partitions} - {fixed}, {k} - {fixed}) (with {fixed} partition(s) in every mixture)")
    caption = (
        f"Efficiency (paper section 5.5): measured wall seconds (rank-seconds: x data-parallel ranks) and "
        f"tokens trained per stage, then the modular method (unit models trained once, merged models scored) "
        f"against one seq model trained and scored per mixture, for the {studied} studied mixtures "
        f"({ratios(rows, 'studied')}) and all {space} = {cand} candidate mixtures "
        f"({ratios(rows, 'all candidates')}); the seed is shared and counted in neither."
    )
    lines = [caption, "", "| section | item | approach | basis | jobs | seconds | hours | rank-seconds | tokens |",
             "|:--|:--|:--|:--|--:|--:|--:|--:|--:|"]
    for r in rows:
        lines.append("| " + " | ".join([
            r["section"], r["item"], r["approach"], r["basis"], _md_num(r["jobs"]),
            _md_num(r["seconds"], 1), _md_num(r["seconds"] / 3600, 3), _md_num(r["rank_seconds"], 1),
            _md_num(r["tokens"]),
        ]) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[dict], out_dir: str | Path, partitions: int, k: int | None,
                  fixed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    changed = []
    for path, text in ((out_dir / "efficiency.csv", ledger_csv(rows)),
                       (out_dir / "efficiency.md", ledger_markdown(rows, partitions, k, fixed))):
        if io.write_text(path, text):
            changed.append(path)
            log.info("wrote %s", path)
        else:
            log.info("unchanged %s", path)
    return changed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mergemix.ledger",
        description="Measured compute of modular training and merging vs. training every mixture.",
    )
    ap.add_argument("paths", nargs="+", help="benchmark TSVs, checkpoint sidecars (mergemix.json), or folders")
    ap.add_argument("--partitions", type=int, default=None, help="n: partitions of the study")
    ap.add_argument("--k", type=int, default=None, help="k: partitions per mixture")
    ap.add_argument("--mixtures", type=int, default=None, help="mixtures the study scores")
    ap.add_argument("--fixed", type=int, default=0, help="partitions in every mixture (mixtures.fixed)")
    ap.add_argument("--out-dir", required=True, help="folder for efficiency.csv and efficiency.md")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergemix").setLevel(logging.WARNING if args.quiet else logging.INFO)

    def work() -> None:
        for name in ("partitions", "k", "mixtures", "fixed"):
            if getattr(args, name) is not None and getattr(args, name) < 0:
                raise LedgerError(f"--{name} must be >= 0, got {getattr(args, name)}")
        benches, sides = collect_paths(args.paths)
        if not benches:
            raise LedgerError("no benchmark files among the given paths")
        stages = measure(benches, sides)
        n = args.partitions if args.partitions is not None else _partitions(stages)
        k = args.k if args.k is not None else _seq_size(stages)
        if args.fixed and (k is None or args.fixed > k):
            raise LedgerError(f"--fixed {args.fixed} needs --k of at least {args.fixed}, got {k}")
        rows = ledger(stages, n, k, args.mixtures, args.fixed)
        write_outputs(rows, args.out_dir, n, k, args.fixed)

    return io.run_command(work, (LedgerError,))


if __name__ == "__main__":
    sys.exit(main())
