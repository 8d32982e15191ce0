"""Merge-and-score engine: the parameter averages of a batch of mixtures, scored in one process.

The file-based path scores a mixture in two processes: `merge` writes an averaged
checkpoint, `evaluate` reads it back and samples and windows every evaluation domain
again. Per mixture that is two interpreter starts, a checkpoint written and read, and
the same documents tokenized anew; at paper scale (all 8,128 pairs of 128 base units)
that overhead, and the 16,000 jobs it takes, dominate the study. The engine does the
same arithmetic without the disk:

- it loads every unit model its batch of mixtures needs onto the device once;
- for each mixture it forms the weighted average there, with `merge.merge_weights` (the
  same weights) and `merge.weighted_sum` (the same float32 accumulation, terms in the
  same order), after `merge.check_compatible` refused what `merge` refuses;
- it copies the average into one reusable model instance;
- it scores that model on windows sampled and cut once for the whole batch by
  `evaluate.prepare_domain`, so every mixture sees exactly the documents and windows
  `evaluate` would use;
- it writes the rows `evaluate` writes for a merged checkpoint (same columns and values;
  model_id METHOD/MIXTURE), atomically, and no merged checkpoint touches the disk.

A mixture is scored on every `ood` domain given and on the `id` domain of each of its
partitions (an id domain is named after its partition), as the workflow's file-based
evaluation of merged models did.

    python -m mergemix.engine --method micro --model a=work/models/unit/s/a/0 \\
        --model b=work/models/unit/s/b/0 --mixture a+b \\
        --domain web:ood:12288:work/tokens/ood/web/heldout \\
        --domain a:id:6144:work/tokens/s/a/heldout --domain b:id:6144:work/tokens/s/b/heldout \\
        --out results/ppl/merged/micro/b/0.csv
"""

from __future__ import annotations

import argparse
import csv
import io as stdio
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mergemix import io, model as mm
from mergemix.config import mixture_members
from mergemix.evaluate import (
    Domain,
    EvalError,
    PreparedDomain,
    check_caps,
    domain_row,
    model_shape,
    prepare_domain,
    rows_csv,
    score_windows,
)
from mergemix.merge import (
    METHODS,
    MergeError,
    check_compatible,
    check_shares,
    merge_weights,
    parse_pairs,
    partition_shares,
    require_weights,
    weighted_sum,
)
from mergemix.tokenize import TokenizeError

log = logging.getLogger(__name__)

TIMING_COLUMNS = ["method", "mixture", "n_checkpoints", "merge_seconds", "score_seconds"]


class EngineError(ValueError):
    """A batch that cannot be scored as given, named with the reason."""


@dataclass(frozen=True)
class MixtureJob:
    """One mixture of a batch: its id, its checkpoints by partition, the domains it is scored on."""

    mixture: str
    groups: dict[str, list[Path]]
    domains: list[Domain]


def plan_batch(mixtures: list[str], models: dict[str, list[Path]], domains: list[Domain]) -> list[MixtureJob]:
    """Resolve each mixture id to its partitions' checkpoints and evaluation domains.

    Domains are ordered as the workflow orders them for a merged model: every OOD set in
    the given order, then the held-out set of each partition in mixture order.
    """
    if not mixtures:
        raise EngineError("no --mixture given")
    ood = [d for d in domains if d.kind == "ood"]
    in_domain = {d.name: d for d in domains if d.kind == "id"}
    jobs = []
    for mixture in dict.fromkeys(mixtures):
        members = mixture_members(mixture)
        for partition in members:
            if partition not in models:
                raise EngineError(f"mixture '{mixture}': no --model given for partition '{partition}'")
            if partition not in in_domain:
                raise EngineError(
                    f"mixture '{mixture}': no in-domain set for partition '{partition}' "
                    f"(give --domain {partition}:id:MAX_TOKENS:SHARD_PREFIX)"
                )
        jobs.append(MixtureJob(mixture, {p: models[p] for p in members}, [*ood, *(in_domain[p] for p in members)]))
    return jobs


def pick_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one (as `evaluate` does), else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise EngineError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise EngineError(f"--device {name}: the engine runs on cpu or cuda[:N] only")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"--device {name}: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EngineError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


class Engine:
    """Unit models resident on one device, one model instance to load averages into, cached windows."""

    def __init__(self, checkpoints: list[Path], device: torch.device, max_docs: int, seed: int) -> None:
        from safetensors.torch import load_file

        checkpoints = list(dict.fromkeys(checkpoints))
        require_weights(checkpoints)
        # One check over the whole batch: it also guarantees the one model instance
        # below fits every mixture's average.
        check_compatible(checkpoints)
        self.device = device
        self.max_docs = max_docs
        self.seed = seed
        start = time.perf_counter()
        self.states = {p: load_file(p / mm.WEIGHTS, device=str(device)) for p in checkpoints}
        self.model = mm.load(checkpoints[0]).to(device).eval()
        # state_dict() tensors share storage with the model's parameters and buffers:
        # copying an average into them loads it without allocating a second model.
        self.targets = self.model.state_dict()
        missing = sorted(set(self.targets) - set(self.states[checkpoints[0]]))
        if missing:
            raise EngineError(
                f"tensor '{missing[0]}' of the model is not in {checkpoints[0] / mm.WEIGHTS}: "
                "the engine can only score checkpoints that hold every tensor of their model"
            )
        self.context, self.vocab = model_shape(self.model)
        self._prepared: dict[Domain, PreparedDomain] = {}
        log.info("loaded %d checkpoints onto %s in %.1f s", len(checkpoints), device, time.perf_counter() - start)

    @torch.no_grad()
    def load_average(self, weights: dict[Path, float]) -> None:
        """Copy the weighted average of resident checkpoints into the model, tensor by tensor.

        An average of bfloat16 checkpoints is rounded to bfloat16 first, as a merged
        checkpoint stores it (merge.to_stored), so both paths score the same numbers.
        """
        for name, target in self.targets.items():
            terms = [(self.states[path][name], w) for path, w in weights.items()]
            average = weighted_sum((tensor.to(torch.float32), w) for tensor, w in terms)
            target.copy_(average.to(terms[0][0].dtype))

    def prepared(self, domain: Domain) -> PreparedDomain:
        """A domain's windows, sampled and cut on first use and kept for the whole batch."""
        if domain not in self._prepared:
            self._prepared[domain] = prepare_domain(domain, self.context, self.vocab, self.max_docs, self.seed)
        return self._prepared[domain]

    def score(self, domains: list[Domain], batch_size: int) -> list[dict]:
        """Rows of the model as it is loaded now, one per domain."""
        rows = []
        for domain in domains:
            prepared = self.prepared(domain)
            rows.append(domain_row(prepared, score_windows(self.model, prepared.windows, batch_size)))
        return rows


def run(
    method: str,
    jobs: list[MixtureJob],
    tokens: dict[str, float] | None,
    max_docs: int,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> tuple[list[dict], list[dict]]:
    """Rows of every mixture's merged model, and the merge and scoring seconds of each."""
    # Every mixture's weights first: a missing token count fails before any loading.
    weights = [merge_weights(method, {p: [str(c) for c in cs] for p, cs in job.groups.items()}, tokens) for job in jobs]
    checkpoints = [c for job in jobs for cs in job.groups.values() for c in cs]
    engine = Engine(checkpoints, device, max_docs, seed)
    by_name = {str(c): c for c in checkpoints}
    rows: list[dict] = []
    timings: list[dict] = []
    for job, weight in zip(tqdm(jobs, desc=f"{method} merges", unit="mixture", disable=None), weights):
        start = time.perf_counter()
        engine.load_average({by_name[k]: w for k, w in weight.items()})
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        merged = time.perf_counter()
        ident = {"model_kind": "merged", "model_id": f"{method}/{job.mixture}", "mixture": job.mixture, "method": method}
        rows.extend({**ident, **row} for row in engine.score(job.domains, batch_size))
        done = time.perf_counter()
        timings.append({
            "method": method, "mixture": job.mixture, "n_checkpoints": len(weight),
            "merge_seconds": merged - start, "score_seconds": done - merged,
        })
        log.info("%s/%s: merged %d checkpoints in %.2f s, scored in %.2f s",
                 method, job.mixture, len(weight), merged - start, done - merged)
    return rows, timings


def timings_csv(timings: list[dict]) -> str:
    buf = stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TIMING_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in timings:
        writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mergemix.engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--model", action="append", default=[], help="PARTITION=CHECKPOINT_DIR (repeatable)")
    parser.add_argument("--tokens", action="append", default=[], help="PARTITION=TOKENS or PARTITION=SHARD_SIDECAR.json (weighted merges)")
    parser.add_argument("--weight", action="append", default=[], help="PARTITION=WEIGHT: user weights instead of --tokens (weighted merges)")
    parser.add_argument("--mixture", action="append", default=[], help="mixture id, partitions joined by '+' (repeatable)")
    parser.add_argument("--domain", action="append", default=[], help="NAME:KIND:MAX_TOKENS:SHARD_PREFIX (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="CSV of rows to write")
    parser.add_argument("--timings", type=Path, help="CSV of per-mixture merge and scoring seconds")
    parser.add_argument("--max-docs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=io.whole(0), default=0)
    parser.add_argument("--threads", type=io.whole(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto (GPU when available), cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    def work() -> None:
        check_caps(args.max_docs, args.batch_size)
        mm.check_gpus_usable()
        device = pick_device(args.device)  # before any checkpoint is read
        models: dict[str, list[Path]] = {}
        for partition, path in parse_pairs(args.model, "--model"):
            models.setdefault(partition, []).append(Path(path))
        for out in filter(None, (args.out, args.timings)):
            inside = next((m for ms in models.values() for m in ms if io.is_inside(out, m)), None)
            if inside is not None:
                raise EngineError(f"{out} is inside the checkpoint {inside} this job scores: write it elsewhere")
        tokens = partition_shares(args.tokens, args.weight)
        check_shares(args.method, tokens)
        domains = [Domain.parse(d) for d in args.domain]
        jobs = plan_batch(args.mixture, models, domains)
        rows, timings = run(args.method, jobs, tokens, args.max_docs, args.batch_size, args.seed, device)
        io.write_text(args.out, rows_csv(rows))
        if args.timings:
            io.write_text(args.timings, timings_csv(timings))
        log.info("%d mixtures, %d rows -> %s", len(jobs), len(rows), args.out)

    return io.run_command(work, (EngineError, MergeError, EvalError, TokenizeError, mm.CheckpointError, mm.DeviceError))


if __name__ == "__main__":
    sys.exit(main())
