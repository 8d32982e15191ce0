"""Perplexity and bits per byte of one checkpoint on evaluation domains.

Each document is scored on its own: an end-of-text token is put in front as context and
the document's tokens are cut into disjoint windows of the model's context length, so
every token is predicted exactly once and no document leaks into another's context.
Perplexity is exp(total NLL / total tokens) over the domain's documents. Bits per byte
(total NLL / ln 2 / total UTF-8 bytes) is reported beside it because, unlike perplexity,
it does not depend on the tokenizer. Documents per domain are sampled with a fixed
seed and capped in number and tokens, so every model sees exactly the same documents.
A "document" here is a segment of the token shards (config.yaml's `segment_chars`: long
texts are cut into segments when tokenized), each with its own end-of-text context.
"""

from __future__ import annotations

import argparse
import csv
import io as stdio
import logging
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mergemix import io, model as mm
from mergemix.tokenize import TokenizeError, open_tokens

log = logging.getLogger(__name__)

COLUMNS = ["model_kind", "model_id", "mixture", "method", "domain", "domain_kind",
           "n_docs", "n_tokens", "n_bytes", "nll_sum", "ppl", "bpb"]


class EvalError(ValueError):
    """An evaluation input that cannot be used, named with the reason."""


@dataclass(frozen=True)
class Domain:
    name: str
    kind: str  # id | ood
    max_tokens: int
    prefix: Path  # shard prefix: {prefix}.bin/.idx/.json

    @classmethod
    def parse(cls, spec: str) -> "Domain":
        try:
            name, kind, cap, prefix = spec.split(":", 3)
            domain = cls(name, kind, int(cap), Path(prefix))
        except ValueError as exc:
            raise EvalError(f"bad --domain {spec!r}: expected NAME:KIND:MAX_TOKENS:PREFIX") from exc
        if kind not in ("id", "ood"):
            raise EvalError(f"--domain {name}: kind must be id or ood, got {kind!r}")
        return domain


def sample_documents(index: np.ndarray, n_tokens: int, max_docs: int, max_tokens: int, seed: int) -> list[tuple[int, int, int]]:
    """Seeded choice of whole documents: (start, stop, bytes), stop excludes the trailing EOS.

    Documents are visited in a seeded order and taken while they fit the token budget
    (a document that does not fit is skipped, smaller ones after it may still fit);
    at least one document is always taken.
    """
    starts = index[:, 0]
    stops = np.append(starts[1:], n_tokens) - 1  # drop each document's trailing EOS
    order = np.random.default_rng(seed).permutation(len(index))
    chosen: list[tuple[int, int, int]] = []
    budget = max_tokens
    for i in order:
        length = int(stops[i] - starts[i])
        if length <= 0:
            continue
        if chosen and length > budget:
            continue
        chosen.append((int(starts[i]), int(stops[i]), int(index[i, 1])))
        budget -= length
        if len(chosen) >= max_docs or budget <= 0:
            break
    return sorted(chosen)


def document_windows(tokens: np.ndarray, eos: int, context: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Disjoint (inputs, targets) windows of one document, EOS prepended as context."""
    seq = np.concatenate([[eos], np.asarray(tokens, dtype=np.int64)])
    out = []
    for start in range(0, len(seq) - 1, context):
        chunk = seq[start : start + context + 1]
        out.append((chunk[:-1], chunk[1:]))
    return out


@torch.inference_mode()
def score_windows(model: torch.nn.Module, windows: list[tuple[np.ndarray, np.ndarray]], batch_size: int) -> float:
    """Summed NLL (nats) of all targets of the windows."""
    device = next(model.parameters()).device
    total = 0.0
    # Sort by length so padded batches waste little compute; the sum does not care.
    windows = sorted(windows, key=lambda w: len(w[0]), reverse=True)
    for b in range(0, len(windows), batch_size):
        batch = windows[b : b + batch_size]
        width = len(batch[0][0])
        # Short windows are padded on the right and the padding is never scored (-100).
        # Attention is causal, so a real token attends only to real tokens before it and
        # no attention mask is needed: without one SDPA takes its causal fast path
        # instead of applying a mask tensor.
        inputs = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (x, y) in enumerate(batch):
            inputs[row, : len(x)] = torch.from_numpy(x)
            targets[row, : len(y)] = torch.from_numpy(y)
        try:
            logits = model(input_ids=inputs.to(device), use_cache=False).logits.float()  # no key/value cache to fill
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
        except RuntimeError as exc:
            if not mm.out_of_memory(exc):
                raise
            fix = (f"lower --batch-size (eval.batch_size in the config; it is {batch_size}) and rerun" if len(batch) > 1
                   else "one window does not fit: use a device with more memory")
            raise EvalError(f"out of memory on {device} scoring {len(batch)} windows of {width} tokens at once: {fix}") from exc
    return total


def domain_seed(seed: int, name: str) -> int:
    """The same documents for every model: the seed depends only on the run seed and domain."""
    return seed ^ zlib.crc32(name.encode("utf-8"))


@dataclass(frozen=True)
class PreparedDomain:
    """A domain's sampled documents cut into scoring windows: built once, scored by any model."""

    domain: Domain
    windows: list[tuple[np.ndarray, np.ndarray]]
    n_docs: int
    n_tokens: int
    n_bytes: int


def prepare_domain(domain: Domain, context: int, vocab: int, max_docs: int, seed: int) -> PreparedDomain:
    """Sample a domain's documents and cut them into windows of `context` tokens.

    The result depends only on the shard, the caps, the seed and the context length, so
    every model (and the merge engine, which scores many models on one preparation) sees
    exactly the same documents and windows.
    """
    try:
        tokens, index, meta = open_tokens(domain.prefix)
    except FileNotFoundError as exc:
        raise EvalError(f"evaluation shard {domain.prefix}.bin/.idx/.json of domain '{domain.name}' is missing") from exc
    if len(index) == 0:
        raise EvalError(f"domain '{domain.name}' ({domain.prefix}) has no documents")
    if meta["vocab_size"] > vocab:
        raise EvalError(
            f"domain '{domain.name}' was tokenized with {meta['vocab_size']} tokens but the model has {vocab} embedding rows"
        )
    docs = sample_documents(index, tokens.size, max_docs, domain.max_tokens, domain_seed(seed, domain.name))
    n_tokens, n_bytes = sum(stop - start for start, stop, _ in docs), sum(b for _, _, b in docs)
    if n_tokens == 0 or n_bytes == 0:
        raise EvalError(
            f"domain '{domain.name}' ({domain.prefix}) has no text to score: its {len(index)} document(s) "
            "are empty; check the set's text column"
        )
    windows = [w for start, stop, _ in docs for w in document_windows(tokens[start:stop], meta["eos_id"], context)]
    return PreparedDomain(domain=domain, windows=windows, n_docs=len(docs), n_tokens=n_tokens, n_bytes=n_bytes)


def perplexity(nll_per_token: float) -> float:
    """exp of the mean loss; inf for a model so bad that it overflows (not an OverflowError)."""
    return math.inf if nll_per_token > 709.0 else math.exp(nll_per_token)


def domain_row(prepared: PreparedDomain, nll: float) -> dict:
    """The row of one model on one prepared domain, given the summed NLL of its windows."""
    row = {
        "domain": prepared.domain.name, "domain_kind": prepared.domain.kind, "n_docs": prepared.n_docs,
        "n_tokens": prepared.n_tokens, "n_bytes": prepared.n_bytes, "nll_sum": nll,
        "ppl": perplexity(nll / prepared.n_tokens), "bpb": nll / math.log(2) / prepared.n_bytes,
    }
    log.info("%s: %d docs, %d tokens, ppl %.3f, bpb %.4f", row["domain"], row["n_docs"], row["n_tokens"], row["ppl"], row["bpb"])
    return row


def model_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(context length, embedding rows): what windows and token ids must fit."""
    return model.config.max_position_embeddings, model.get_input_embeddings().weight.shape[0]


def evaluate(model: torch.nn.Module, domains: list[Domain], max_docs: int, batch_size: int, seed: int) -> list[dict]:
    """One row per domain with n_docs, n_tokens, n_bytes, nll_sum, ppl, bpb."""
    context, vocab = model_shape(model)
    rows = []
    for domain in domains:
        prepared = prepare_domain(domain, context, vocab, max_docs, seed)
        rows.append(domain_row(prepared, score_windows(model, prepared.windows, batch_size)))
    return rows


def check_caps(max_docs: int, batch_size: int) -> None:
    """--max-docs and --batch-size of evaluate and engine: at least one each."""
    if max_docs < 1 or batch_size < 1:
        raise EvalError(f"--max-docs {max_docs} and --batch-size {batch_size} must both be at least 1")


def rows_csv(rows: list[dict]) -> str:
    buf = stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergemix.evaluate", description=__doc__)
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--domain", action="append", default=[], help="NAME:KIND:MAX_TOKENS:SHARD_PREFIX (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="CSV of rows to write")
    parser.add_argument("--model-kind", required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--mixture", default="")
    parser.add_argument("--method", default="")
    parser.add_argument("--max-docs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=io.whole(0), default=0)
    parser.add_argument("--threads", type=io.whole(0), default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    def work() -> None:
        domains = [Domain.parse(d) for d in args.domain]
        if not domains:
            raise EvalError("no --domain given")
        check_caps(args.max_docs, args.batch_size)
        if io.is_inside(args.out, args.model):
            raise EvalError(f"--out {args.out} is inside the checkpoint {args.model} it scores: write the rows elsewhere")
        mm.check_gpus_usable()
        model = mm.load(args.model).eval()
        if torch.cuda.is_available():
            model = model.cuda()
        rows = evaluate(model, domains, args.max_docs, args.batch_size, args.seed)
        ident = {"model_kind": args.model_kind, "model_id": args.model_id, "mixture": args.mixture, "method": args.method}
        io.write_text(args.out, rows_csv([{**ident, **row} for row in rows]))

    return io.run_command(work, (EvalError, TokenizeError, mm.CheckpointError, mm.DeviceError))


if __name__ == "__main__":
    sys.exit(main())
