"""Parameter averaging of checkpoints: micro, macro, merged and weighted merges.

Every method is a set of per-checkpoint weights (a pure function, `merge_weights`) fed
to one streaming average (`averaged`). The average reads every input's tensors block by
block with numpy (no torch: the import alone would cost more than a small merge),
accumulates in float32 and is written to disk tensor by tensor, so memory stays near
one tensor's size whatever the number of inputs. Every
input is hashed against its sidecar on the other cores while the average is formed, and
nothing is committed unless all of them match. It refuses checkpoints that did not grow
from the same seed or whose architecture, tensor names, shapes or dtypes differ, naming
the tensor and both shapes.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mergemix import io, model as mm

log = logging.getLogger(__name__)

METHODS = ("micro", "macro", "weighted", "merged")
# config.json keys that describe how a file was written, not the architecture.
_NON_ARCH_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
# Elements of every input summed at a time: the sums of a block stay in the core's cache.
BLOCK = 1 << 16
# How each floating-point safetensors dtype is mapped into numpy (bfloat16 as its bits).
_STORED = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


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
    listed = [ckpt for members in groups.values() for ckpt in members]
    twice = next((ckpt for ckpt in listed if listed.count(ckpt) > 1), None)
    if twice is not None:
        raise MergeError(f"checkpoint {twice} is given twice: each checkpoint enters an average once")
    if method in ("micro", "merged"):
        n = sum(len(m) for m in groups.values())
        return {ckpt: 1.0 / n for members in groups.values() for ckpt in members}
    if method == "macro":
        share = {p: 1.0 / len(groups) for p in groups}
    else:
        missing = [p for p in groups if not tokens or p not in tokens]
        if missing:
            raise MergeError(f"weighted merge needs the token count of partition '{missing[0]}' (or its --weight)")
        bad = next((p for p in groups if not 0 < tokens[p] < math.inf), None)
        if bad is not None:
            raise MergeError(f"weighted merge: partition '{bad}' has token count or weight {tokens[bad]}: "
                             "give each partition a positive, finite count or weight")
        total = sum(tokens[p] for p in groups)
        if not 0 < total < math.inf:
            raise MergeError(f"weighted merge: the token counts or weights of {', '.join(groups)} add up to {total}: "
                             "give each partition a positive, finite count or weight")
        share = {p: tokens[p] / total for p in groups}
    return {ckpt: share[p] / len(members) for p, members in groups.items() for ckpt in members}


def _architecture(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _NON_ARCH_KEYS}


def require_weights(paths: list[Path]) -> None:
    """Refuse checkpoint folders that hold no weights yet."""
    missing = [p for p in paths if not (p / mm.WEIGHTS).is_file()]
    if missing:
        raise MergeError(f"checkpoint {missing[0]} has no {mm.WEIGHTS}: train it first")


def verify_all(paths: list[Path], pool: ThreadPoolExecutor) -> list:
    """Start hashing every input against its sidecar; `.result()` of each raises a mismatch.

    Hashing is a full read of each file, and hashlib releases the GIL, so the files are
    hashed on the pool's threads while the caller goes on.
    """
    return [pool.submit(mm.verify, path) for path in paths]


def check_compatible(paths: list[Path], verify: bool = True) -> dict:
    """Refuse checkpoints of different seeds, architectures, tensor names, shapes or dtypes.

    Returns the seed, the first input's config.json, and each input's tensor layout
    (`model.read_layout`). verify=False leaves the sha256 checks to the caller
    (`merge` runs them alongside the average).
    """
    if not paths:
        raise MergeError("nothing to merge: no checkpoints given")
    if verify:
        with ThreadPoolExecutor(max_workers=min(len(paths), io.cores())) as pool:
            for check in verify_all(paths, pool):
                check.result()  # the first failure in input order
    first = paths[0]
    seed = mm.read_sidecar(first).get("seed_sha256")
    if not seed:
        raise MergeError(f"{first / mm.SIDECAR} names no seed_sha256: without it the models cannot be checked to share "
                         "a seed; merge checkpoints written by mergemix")
    config = mm.read_config(first)
    arch = _architecture(config)
    layouts = {first: mm.read_layout(first)}
    shapes = {name: (dtype, shape) for name, (dtype, shape, *_) in layouts[first].items()}
    for name, (dtype, _) in shapes.items():
        if dtype not in _STORED:
            raise MergeError(f"tensor '{name}' of {first} is {dtype}: only floating-point tensors can be averaged")
    for path in paths[1:]:
        other_seed = mm.read_sidecar(path).get("seed_sha256")
        if other_seed != seed:
            raise MergeError(f"{path} grew from seed {str(other_seed)[:12]}, {first} from {str(seed)[:12]}: only models of one seed can be merged")
        other_arch = _architecture(mm.read_config(path))
        if other_arch != arch:
            key = next(k for k in sorted(set(arch) | set(other_arch)) if arch.get(k) != other_arch.get(k))
            raise MergeError(f"{path} differs from {first} in config '{key}': {other_arch.get(key)!r} vs {arch.get(key)!r}")
        layouts[path] = mm.read_layout(path)
        keys = set(layouts[path])
        if keys != set(shapes):
            name = sorted(keys ^ set(shapes))[0]
            where = path if name in keys else first
            raise MergeError(f"tensor '{name}' exists only in {where}: checkpoints must have the same tensors")
        for name in sorted(keys):
            dtype, shape, *_ = layouts[path][name]
            if shape != shapes[name][1]:
                raise MergeError(f"tensor '{name}' has shape {shape} in {path} but {shapes[name][1]} in {first}")
            if dtype != shapes[name][0]:
                raise MergeError(f"tensor '{name}' is {dtype} in {path} but {shapes[name][0]} in {first}")
    return {"seed_sha256": seed, "config": config, "layout": shapes, "layouts": layouts}


def weighted_sum(terms: Iterable[tuple[Any, float]]) -> Any:
    """Sum of weight x tensor over float32 tensors, in the order given (the engine's average).

    Each product `x * w` is rounded to float32 and then added, as `accumulate` does in
    numpy for the file-based merge, so the engine and a merged checkpoint hold the same
    bits (tests/test_engine.py checks it). A fused `add_(x, alpha=w)` would round once
    and differ. Inputs are never modified: the first product is a new tensor.
    """
    acc = None
    for tensor, weight in terms:
        if acc is None:
            acc = tensor * weight
        else:
            acc += tensor * weight
    assert acc is not None, "weighted_sum of no tensors"
    return acc


def accumulate(terms: Iterable[tuple[np.ndarray, float]], acc: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """weighted_sum's arithmetic in numpy, into two caller-owned float32 buffers.

    acc and scratch are flat buffers of at least the terms' size. `averaged` calls this
    on blocks of BLOCK elements, so both stay in the core's cache while all k inputs are
    added: a whole tensor at a time sends acc and scratch through memory once per input,
    twice the time. Returns the view of acc that holds the sum.
    """
    out = None
    for tensor, weight in terms:
        if out is None:
            out = np.multiply(tensor, weight, out=acc[: tensor.size].reshape(tensor.shape))
        else:
            out += np.multiply(tensor, weight, out=scratch[: tensor.size].reshape(tensor.shape))
    assert out is not None, "accumulate of no tensors"
    return out


def read_block(fd: int, raw: np.ndarray, span: tuple[str, tuple[int, ...], int, int], lo: int, hi: int, file: Path) -> np.ndarray:
    """Elements lo:hi of one tensor of an open checkpoint as float32, read into the byte buffer raw.

    pread into a small buffer reused for every block: the bytes go from the page cache
    into the core's cache and are added there, and nothing of the file stays resident
    in this process (a mapping would count every page it touched as its memory).
    """
    dtype, _, first, _ = span
    stored = np.dtype(_STORED[dtype])
    start, want = first + lo * stored.itemsize, (hi - lo) * stored.itemsize
    view, got = memoryview(raw)[:want], 0
    while got < want:
        n = os.preadv(fd, [view[got:]], start + got)
        if n == 0:
            raise MergeError(f"{file} ended at byte {start + got}, before its header's end: "
                             "it was truncated while being merged; rerun")
        got += n
    block = raw[:want].view(stored)
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block.astype(np.float32, copy=False)


def to_stored(acc: np.ndarray, dtype: str) -> np.ndarray:
    """A float32 average back in its checkpoint's dtype (bfloat16 rounded to nearest even, as torch does).

    bfloat16 is rounded BLOCK elements at a time, so its temporaries stay small beside
    the output (half the accumulator's size) whatever the tensor's size.
    """
    if dtype != "BF16":
        return acc.astype(_STORED[dtype], copy=False)
    flat = acc.reshape(-1)
    out = np.empty(flat.size, dtype=np.uint16)
    for lo in range(0, flat.size, BLOCK):
        bits = flat[lo : lo + BLOCK].view(np.uint32)
        rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
        rounded[np.isnan(flat[lo : lo + BLOCK])] = 0x7FC0
        out[lo : lo + BLOCK] = rounded
    return out.reshape(acc.shape)


def averaged(weights: dict[Path, float], layouts: dict[Path, dict], names: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, weighted average in the stored dtype) for each tensor name in turn, summed block by block.

    Memory is one output tensor and one BLOCK of each input, whatever the number of
    inputs. Each yielded array lives in a buffer that the next tensor reuses: write or
    copy it before asking for the next.
    """
    names, paths = list(names), list(weights)
    first = layouts[paths[0]]
    size = max((math.prod(first[name][1]) for name in names), default=0)
    acc, scratch = np.empty(size, dtype=np.float32), np.empty(BLOCK, dtype=np.float32)
    raws = [np.empty(BLOCK * 8, dtype=np.uint8) for _ in paths]  # 8 bytes: the widest dtype, F64
    files = [path / mm.WEIGHTS for path in paths]
    fds: list[int] = []
    try:
        for file in files:
            fds.append(os.open(file, os.O_RDONLY))
        for name in names:
            dtype, shape = first[name][:2]
            out = acc[: math.prod(shape)]
            for lo in range(0, out.size, BLOCK):
                hi = min(lo + BLOCK, out.size)
                accumulate(((read_block(fd, raw, layouts[path][name], lo, hi, file), float(weights[path]))
                            for fd, raw, path, file in zip(fds, raws, paths, files)), out[lo:hi], scratch)
            yield name, to_stored(out.reshape(shape), dtype)
    finally:
        for fd in fds:
            os.close(fd)


def average(weights: dict[Path, float]) -> dict[str, np.ndarray]:
    """The whole weighted average in memory (the engine test's reference)."""
    layouts = {path: mm.read_layout(path) for path in weights}
    return {name: tensor.copy() for name, tensor in averaged(weights, layouts, layouts[next(iter(weights))])}


def merge(method: str, groups: dict[str, list[Path]], out: Path, tokens: dict[str, float] | None = None) -> dict:
    """Merge a mixture's checkpoints into a new checkpoint folder at `out`."""

    by_name = {str(p): p for members in groups.values() for p in members}
    paths = list(by_name.values())
    overwritten = [p for p in paths if os.path.realpath(p) == os.path.realpath(out)]
    if overwritten:
        raise MergeError(f"--out {out} is the input checkpoint {overwritten[0]}: a merge never replaces its inputs; "
                         "write it to another folder")
    require_weights(paths)
    info = check_compatible(paths, verify=False)  # headers only: a mismatch is refused before any data is read
    weights = merge_weights(method, {p: [str(m) for m in ms] for p, ms in groups.items()}, tokens)
    sidecar = {
        "kind": "merged",
        "method": method,
        "seed_sha256": info["seed_sha256"],
        "partitions": sorted(groups),
        "weights": weights,
        "tokens": tokens or {},
    }
    # The inputs are hashed on every core of the job while this thread averages and
    # writes: the hashing is most of the work, so it gets all of them and the average
    # fills the gaps.
    workers = min(len(paths), io.cores())
    with ThreadPoolExecutor(max_workers=workers) as pool, io.StagingDir(out) as stage:
        checks = verify_all(paths, pool)
        io.write_json(stage.path / mm.CONFIG, info["config"])
        # Streamed to disk as it is averaged: one output tensor in memory, not a model.
        layout = {name: info["layout"][name] for name in info["layouts"][paths[0]]}  # in the first file's order
        tensors = averaged({by_name[k]: w for k, w in weights.items()}, info["layouts"], layout)
        sidecar["weights_sha256"] = io.save_tensors_streamed(layout, tensors, stage.path / mm.WEIGHTS, {"format": "pt"})
        io.write_json(stage.path / mm.SIDECAR, sidecar)
        for check in checks:
            check.result()  # an input that fails its sha256 leaves nothing behind
        mm.drop_stale(out)  # a model this replaces leaves no optimizer state or metrics behind
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
    if value.isascii() and value.isdigit():  # not '²', which isdigit() takes and int() refuses
        return int(value)
    path = Path(value)
    if not path.is_file():
        raise MergeError(f"--tokens {value}: not an integer and no such shard sidecar file")
    try:
        meta = io.read_json(path)
    except ValueError as exc:
        raise MergeError(f"--tokens {value}: not valid JSON ({exc}); give a token shard's .json or a number") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("n_tokens"), int):
        raise MergeError(f"--tokens {value}: the sidecar has no integer n_tokens; give a token shard's .json or a number")
    return meta["n_tokens"]


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
    flag, pairs = ("--weight", parse_pairs(weights, "--weight")) if weights else ("--tokens", parse_pairs(tokens, "--tokens"))
    names = [p for p, _ in pairs]
    twice = next((p for p in names if names.count(p) > 1), None)
    if twice is not None:
        raise MergeError(f"{flag} gives partition '{twice}' twice: give each partition once")
    if weights:
        return {p: positive_weight(w) for p, w in pairs}
    return {p: token_count(n) for p, n in pairs}


def check_shares(method: str, shares: dict[str, float]) -> None:
    """--tokens and --weight are for weighted merges (those of partitions not merged are unused)."""
    if shares and method != "weighted":
        raise MergeError(f"--tokens and --weight apply to --method weighted only, not {method}: drop them")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergemix.merge", description=__doc__)
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--model", action="append", default=[], help="PARTITION=CHECKPOINT_DIR (repeatable)")
    parser.add_argument("--tokens", action="append", default=[], help="PARTITION=TOKENS or PARTITION=SHARD_SIDECAR.json (weighted merges)")
    parser.add_argument("--weight", action="append", default=[], help="PARTITION=WEIGHT: user weights instead of --tokens (weighted merges)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def work() -> None:
        groups: dict[str, list[Path]] = {}
        for partition, path in parse_pairs(args.model, "--model"):
            groups.setdefault(partition, []).append(Path(path))
        tokens = partition_shares(args.tokens, args.weight)
        check_shares(args.method, tokens)
        sidecar = merge(args.method, groups, args.out, tokens)
        log.info("merged %d checkpoints (%s) into %s", len(sidecar["weights"]), args.method, args.out)

    return io.run_command(work, (MergeError, mm.CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
