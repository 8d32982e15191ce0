"""Parameter averaging of checkpoints: micro, macro, merged and weighted merges.

Every method is a set of per-checkpoint weights (a pure function, `merge_weights`) fed
to one streaming average (`averaged`). The average reads tensor by tensor through
safetensors' lazy reader, accumulates in float32 and is written to disk tensor by
tensor, so memory stays near one model's size (or less) whatever the number of inputs.
It refuses checkpoints that did not grow from the same seed or whose architecture,
tensor names, shapes or dtypes differ, naming the tensor and both shapes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mergemix import io, model as mm

log = logging.getLogger(__name__)

METHODS = ("micro", "macro", "weighted", "merged")
# config.json keys that describe how a file was written, not the architecture.
_NON_ARCH_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}


class MergeError(ValueError):
    """Checkpoints that cannot be averaged, with the reason and the culprit named."""


def merge_weights(method: str, groups: dict[str, list[str]], tokens: dict[str, float] | None = None) -> dict[str, float]:
    """Per-checkpoint weights (summing to 1) for a mixture's partitions.

    groups: partition -> its checkpoints (unit models, or its one ind model).
    micro: uniform over all checkpoints; macro: uniform over partitions, then over each
    partition's checkpoints; weighted: partitions in proportion to `tokens`, their token
    counts or the user's weights (`partition_shares`); merged: uniform over the given
    (ind) checkpoints, one per partition.
    """
    if method not in METHODS:
        raise MergeError(f"unknown merge method '{method}': use one of {', '.join(METHODS)}")
    if not groups or any(not members for members in groups.values()):
        raise MergeError("every partition of a merge needs at least one checkpoint")
    if method in ("micro", "merged"):
        n = sum(len(m) for m in groups.values())
        return {ckpt: 1.0 / n for members in groups.values() for ckpt in members}
    if method == "macro":
        share = {p: 1.0 / len(groups) for p in groups}
    else:
        missing = [p for p in groups if not tokens or p not in tokens]
        if missing:
            raise MergeError(f"weighted merge needs the token count of partition '{missing[0]}' (or its --weight)")
        total = sum(tokens[p] for p in groups)
        share = {p: tokens[p] / total for p in groups}
    return {ckpt: share[p] / len(members) for p, members in groups.items() for ckpt in members}


def _architecture(path: Path) -> dict:
    config = io.read_json(path / "config.json")
    return {k: v for k, v in config.items() if k not in _NON_ARCH_KEYS}


def require_weights(paths: list[Path]) -> None:
    """Refuse checkpoint folders that hold no weights yet."""
    missing = [p for p in paths if not (p / mm.WEIGHTS).is_file()]
    if missing:
        raise MergeError(f"checkpoint {missing[0]} has no {mm.WEIGHTS}: train it first")


def check_compatible(paths: list[Path]) -> dict:
    """Refuse checkpoints of different seeds, architectures, tensor names or shapes."""
    from safetensors import safe_open

    if not paths:
        raise MergeError("nothing to merge: no checkpoints given")
    # Hashing every input is a full read of it; hashlib releases the GIL, so the files
    # are hashed on all cores at once. map() raises the first failure in input order.
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        list(pool.map(mm.verify, paths))
    first = paths[0]
    seed = mm.read_sidecar(first).get("seed_sha256")
    arch = _architecture(first)
    with safe_open(first / mm.WEIGHTS, framework="pt") as f:
        shapes = {k: _layout(f, k) for k in f.keys()}
    for path in paths[1:]:
        other_seed = mm.read_sidecar(path).get("seed_sha256")
        if other_seed != seed:
            raise MergeError(f"{path} grew from seed {str(other_seed)[:12]}, {first} from {str(seed)[:12]}: only models of one seed can be merged")
        other_arch = _architecture(path)
        if other_arch != arch:
            key = next(k for k in sorted(set(arch) | set(other_arch)) if arch.get(k) != other_arch.get(k))
            raise MergeError(f"{path} differs from {first} in config '{key}': {other_arch.get(key)!r} vs {arch.get(key)!r}")
        with safe_open(path / mm.WEIGHTS, framework="pt") as f:
            keys = set(f.keys())
            if keys != set(shapes):
                name = sorted(keys ^ set(shapes))[0]
                where = path if name in keys else first
                raise MergeError(f"tensor '{name}' exists only in {where}: checkpoints must have the same tensors")
            for name in sorted(keys):
                dtype, shape = _layout(f, name)
                if shape != shapes[name][1]:
                    raise MergeError(f"tensor '{name}' has shape {shape} in {path} but {shapes[name][1]} in {first}")
                if dtype != shapes[name][0]:
                    raise MergeError(f"tensor '{name}' is {dtype} in {path} but {shapes[name][0]} in {first}")
    return {"seed_sha256": seed, "config": io.read_json(first / "config.json"), "layout": shapes}


def _layout(handle, name: str) -> tuple[str, tuple[int, ...]]:
    """(safetensors dtype, shape) of one tensor, read from the header only."""
    piece = handle.get_slice(name)
    return piece.get_dtype(), tuple(piece.get_shape())


def weighted_sum(terms: Iterable[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Sum of weight x tensor, accumulated in float32, returned in the inputs' dtype.

    The one place the averaging arithmetic lives: the file-based merge and the in-memory
    engine both call it with terms in the same order, so they produce the same bits.
    Inputs are never modified (the first product is a new tensor).
    """
    acc: torch.Tensor | None = None
    dtype = None
    for tensor, weight in terms:
        dtype = tensor.dtype
        if acc is None:
            acc = tensor.to(torch.float32) * weight
        else:
            acc.add_(tensor.to(torch.float32), alpha=weight)  # in place: no temporary per term
    assert acc is not None, "weighted_sum of no tensors"
    return acc.to(dtype)


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of one checkpoint folder, the file opened for it alone.

    safetensors maps the whole file, and every page a mapping has touched counts as
    resident while it is open: k handles held open through a merge end up holding k
    whole models. Opening per tensor (a header parse, well under a millisecond) lets each
    tensor's pages go as soon as it has been added.
    """
    from safetensors import safe_open

    with safe_open(path / mm.WEIGHTS, framework="pt") as f:
        return f.get_tensor(name)


def averaged(weights: dict[Path, float], names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, weighted average) for each tensor name in turn: one tensor of one input at a time."""
    for name in names:
        yield name, weighted_sum((read_tensor(path, name), w) for path, w in weights.items())


def average(weights: dict[Path, float]) -> dict[str, torch.Tensor]:
    """The whole weighted average in memory (the engine test's reference)."""
    from safetensors import safe_open

    with safe_open(next(iter(weights)) / mm.WEIGHTS, framework="pt") as f:
        names = list(f.keys())
    return dict(averaged(weights, names))


def merge(method: str, groups: dict[str, list[Path]], out: Path, tokens: dict[str, float] | None = None) -> dict:
    """Merge a mixture's checkpoints into a new checkpoint folder at `out`."""

    by_name = {str(p): p for members in groups.values() for p in members}
    require_weights(list(by_name.values()))
    info = check_compatible(list(by_name.values()))
    weights = merge_weights(method, {p: [str(m) for m in ms] for p, ms in groups.items()}, tokens)
    sidecar = {
        "kind": "merged",
        "method": method,
        "seed_sha256": info["seed_sha256"],
        "partitions": sorted(groups),
        "weights": weights,
        "tokens": tokens or {},
    }
    with io.StagingDir(out) as stage:
        io.write_json(stage.path / "config.json", info["config"])
        # Streamed to disk as it is averaged: one output tensor in memory, not a model.
        layout = info["layout"]
        tensors = averaged({by_name[k]: w for k, w in weights.items()}, layout)
        sidecar["weights_sha256"] = io.save_tensors_streamed(layout, tensors, stage.path / mm.WEIGHTS, {"format": "pt"})
        io.write_json(stage.path / mm.SIDECAR, sidecar)
        stage.commit(last=(mm.SIDECAR, mm.WEIGHTS))
    return sidecar


def parse_pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise MergeError(f"bad {flag} {item!r}: expected PARTITION=VALUE")
        out.append((key, value))
    return out


def token_count(value: str) -> int:
    """An integer, or a token shard sidecar (train.json) whose n_tokens is read."""
    if value.isdigit():
        return int(value)
    path = Path(value)
    if not path.is_file():
        raise MergeError(f"--tokens {value}: not an integer and no such shard sidecar file")
    return int(io.read_json(path)["n_tokens"])


def positive_weight(value: str) -> float:
    """A user weight: a positive finite number."""
    try:
        weight = float(value)
    except ValueError:
        weight = float("nan")
    if not (0 < weight < float("inf")):
        raise MergeError(f"--weight {value}: expected a positive number")
    return weight


def partition_shares(tokens: list[str], weights: list[str]) -> dict[str, float]:
    """Relative size of each partition in a weighted merge, from --tokens or --weight flags.

    Token counts are the default (the workflow passes each partition's shard sidecar);
    user weights (config `merge.weights`) replace them. Mixing the two in one merge
    would weigh partitions on two scales, so it is refused.
    """
    if tokens and weights:
        raise MergeError("give either --tokens or --weight for a weighted merge, not both")
    if weights:
        return {p: positive_weight(w) for p, w in parse_pairs(weights, "--weight")}
    return {p: token_count(n) for p, n in parse_pairs(tokens, "--tokens")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergemix.merge", description=__doc__)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--model", action="append", default=[], help="PARTITION=CHECKPOINT_DIR (repeatable)")
    parser.add_argument("--tokens", action="append", default=[], help="PARTITION=TOKENS or PARTITION=SHARD_SIDECAR.json (weighted merges)")
    parser.add_argument("--weight", action="append", default=[], help="PARTITION=WEIGHT: user weights instead of --tokens (weighted merges)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        groups: dict[str, list[Path]] = {}
        for partition, path in parse_pairs(args.model, "--model"):
            groups.setdefault(partition, []).append(Path(path))
        tokens = partition_shares(args.tokens, args.weight)
        sidecar = merge(args.method, groups, args.out, tokens)
        log.info("merged %d checkpoints (%s) into %s", len(sidecar["weights"]), args.method, args.out)
    except (MergeError, mm.CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {io.describe_os_error(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
