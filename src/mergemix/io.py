"""Small file helpers shared by every stage: atomic, content-stable writes and hashing.

Snakemake decides what to rerun from files; a half-written file or a rewrite with the
same bytes (new mtime) would make it rerun work or trust garbage. So every output is
written to a temporary name in its own folder and renamed into place, and only when its
bytes change.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Any


def job_threads() -> int | None:
    """The `threads` of the Snakemake job running this process (Snakemake exports them as
    OMP_NUM_THREADS), or None outside one."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`, or argparse's one-line
    error naming the flag (`argument --seed: -1 is below 0`)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies under it, links resolved."""
    folder = os.path.realpath(folder)
    return os.path.commonpath([folder, os.path.realpath(path)]) == folder


def fraction(text: str) -> float:
    """An argparse type: a number above 0 and at most 1 (`argument --heldout-fraction: 1.5 is not in (0, 1]`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def cores() -> int:
    """CPU threads this process should use: the job's threads, else every CPU it may run on."""
    return job_threads() or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def sha256_file(path: str | Path, window: int = 1 << 24) -> str:
    """Hex sha256 of a file, hashed straight from the page cache in 16 MiB mapped windows.

    Mapping instead of read() spares a copy of every byte (most of a large file's hashing
    time outside sha256 itself), and unmapping each window as it is done keeps resident
    memory at one window whatever the file's size. hashlib releases the GIL on large
    buffers, so several files hash on several cores.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for start in range(0, size, window):  # window is a multiple of the page size
            with mmap.mmap(fh.fileno(), min(window, size - start), offset=start, access=mmap.ACCESS_READ) as view:
                digest.update(view)
    return digest.hexdigest()


def clear_stale(target: Path) -> None:
    """Remove temporaries a killed writer left beside `target` (`.{name}.*.tmp`).

    Snakemake never runs two jobs writing the same output, so any such file or folder
    is debris of an earlier, interrupted attempt. The match is exact (tempfile's eight
    random characters): `.a.*.tmp` would also take `.a.b.xxxxxxxx.tmp`, the live staging
    folder of a job writing `a.b` beside it.
    """
    own = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    for stale in target.parent.glob(f".{target.name}.*.tmp"):
        if not own.fullmatch(stale.name):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it: done once, at import
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def usual_mode(path: str | Path) -> None:
    """Give a file the permissions the umask gives a new file (mkstemp, and safetensors'
    own temporary files, make it private: 0600), so a shared group can read the outputs."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_bytes(path: str | Path, data: bytes, only_if_changed: bool = True) -> bool:
    """Atomically write `data` to `path`; return False when the file already held it."""
    path = Path(path)
    if only_if_changed and path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        usual_mode(path)  # one an earlier version left private
        return False
    with StreamedFile(path, only_if_changed=False) as out:
        out.write(data)
    return True


def _close_quietly(fh) -> None:
    """Close a file whose writing already failed; a second error closing it adds nothing."""
    try:
        fh.close()
    except OSError:
        pass


def fsync_file(path: str | Path) -> None:
    """Flush a file that another library wrote (transformers' config.json) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StreamedFile:
    """An atomic write of data that arrives in pieces: `with StreamedFile(path) as out:
    out.write(chunk)` writes a temporary beside `path`, hashing as it goes, and on a
    clean exit flushes it to disk and renames it into place, unless `only_if_changed`
    and `path` already holds the same bytes (then it is left as it is). On an error the
    temporary goes and `path` is untouched. `sha256` is the hex digest after exit, and
    `replaced` whether `path` was written.
    """

    def __init__(self, path: str | Path, only_if_changed: bool = True) -> None:
        self.path = Path(path)
        self.only_if_changed = only_if_changed
        self.sha256 = ""
        self.replaced = False  # after exit: whether `path` was (re)written
        self._digest = hashlib.sha256()
        self._size = 0

    def __enter__(self) -> "StreamedFile":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        clear_stale(self.path)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._fh = os.fdopen(fd, "wb")
        return self

    def write(self, data: bytes) -> None:
        try:
            self._fh.write(data)
        except OSError as exc:  # a failed write() names no file
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self._digest.update(data)
        self._size += len(data)

    @property
    def closed(self) -> bool:  # the file protocol, for writers that check it (pyarrow's)
        return self._fh.closed

    def flush(self) -> None:
        self._fh.flush()

    def __exit__(self, exc_type, exc_value, tb) -> None:
        tmp = Path(self._tmp)
        try:
            if exc_type is not None:
                _close_quietly(self._fh)  # the body's error is the one to report
                return
            try:
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError:
                _close_quietly(self._fh)  # closed on a full disk too, so the temporary's space is freed
                raise
            self._fh.close()
            self.sha256 = self._digest.hexdigest()
            if (self.only_if_changed and self.path.is_file() and self.path.stat().st_size == self._size
                    and sha256_file(self.path) == self.sha256):
                usual_mode(self.path)
                return
            usual_mode(tmp)
            os.replace(tmp, self.path)
            self.replaced = True
        except OSError as exc:
            if exc.filename is None:  # a failed write() or fsync() names no file
                raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
            raise
        finally:
            tmp.unlink(missing_ok=True)


class ParquetRows:
    """Record batches written to a zstd parquet file as they come, in row groups of
    `group_rows` rows, or fewer once their first column (the text) passes `group_bytes`:
    memory holds a row group, not the table. `where` is a path or a writable file (a
    `StreamedFile`, for an atomic write); use it in a `with` block, whose end writes the
    rest and the footer. Each group is written as one chunk, so a table
    that fits one group gives the bytes `pyarrow.parquet.write_table` gives.
    """

    def __init__(self, where: Any, schema: Any, group_rows: int = 10_000, group_bytes: int = 256 << 20) -> None:
        import pyarrow.parquet as pq

        self.schema, self.group_rows, self.group_bytes = schema, group_rows, group_bytes
        self._writer = pq.ParquetWriter(where, schema, compression="zstd")
        self._pending: list[Any] = []

    def write(self, batch: Any) -> None:
        if batch.num_rows:
            self._pending.append(batch)
        if (sum(b.num_rows for b in self._pending) >= self.group_rows
                or sum(b.column(0).nbytes for b in self._pending) >= self.group_bytes):
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        import pyarrow as pa

        group = pa.Table.from_batches(self._pending, schema=self.schema)
        self._pending.clear()
        while group.num_rows and (final or group.num_rows >= self.group_rows
                                  or group.column(0).nbytes >= self.group_bytes):
            n = min(group.num_rows, self.group_rows)
            self._writer.write_table(group.slice(0, n).combine_chunks(), row_group_size=n)
            group = group.slice(n)
        self._pending.extend(group.to_batches())

    def __enter__(self) -> "ParquetRows":
        return self

    def __exit__(self, exc_type, exc_value, tb) -> None:
        if exc_type is None:  # what is pending, then the footer
            try:
                self._flush(final=True)
            except BaseException:
                self._abandon()
                raise
            self._writer.close()
            return
        self._abandon()

    def _abandon(self) -> None:
        """Close the writer now, on the way out of an error: left to the garbage collector,
        it would write its footer into a file already closed and print a traceback."""
        try:
            self._writer.close()
        except (OSError, ValueError):
            pass  # a full disk, or a schema that does not fit: the error on its way out says so


def write_text(path: str | Path, text: str, only_if_changed: bool = True) -> bool:
    return write_bytes(path, text.encode("utf-8"), only_if_changed)


def write_json(path: str | Path, obj: Any, only_if_changed: bool = True) -> bool:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", only_if_changed)


def describe_os_error(exc: OSError) -> str:
    """One line for a failed read or write: the file, the reason, what to do."""
    # Name the output the user knows, not its staging temporary (.NAME.xxxx.tmp).
    where = re.sub(r"(^|/)\.([^/]+)\.[^/.]+\.tmp(?=/|$)", r"\1\2", str(exc.filename)) if exc.filename else "a file"
    if exc.errno == errno.ENOSPC:
        return f"no space left on device while writing {where}: free space and rerun (nothing partial was kept)"
    return f"cannot access {where}: {exc.strerror or exc}"


def run_command(work: Callable[[], object], errors: tuple[type[Exception], ...]) -> int:
    """Every stage's command-line ending: run `work` and return the exit status.

    0 when it returns. 1, after one `error: ...` line on stderr, when it raises one of
    `errors` (the stage's own, each naming its culprit) or an OSError (a missing,
    unreadable or full-disk file, named by describe_os_error). Anything else is a bug
    and keeps its traceback.
    """
    try:
        work()
    except errors as exc:
        message = str(exc)
    except OSError as exc:
        message = describe_os_error(exc)
    else:
        return 0
    print("error: " + " ".join(message.split()), file=sys.stderr)  # one line, whatever a library wrote
    return 1


# Bytes per element of each safetensors dtype name.
ELEMENT_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def save_tensors_streamed(layout: dict[str, tuple[str, tuple[int, ...]]], tensors: Iterable[tuple[str, Any]],
                          path: str | Path, metadata: dict[str, str] | None = None, sync: bool = False) -> str:
    """Write a safetensors file one tensor at a time; returns the file's sha256.

    `save_file` needs every tensor in memory at once. Here the header is fixed first from
    `layout` (name -> (safetensors dtype, shape), in file order) and each tensor's bytes
    are written as `tensors` yields them, so a merge holds one output tensor, not a whole
    model, and training gathers one tensor of its state at a time. The hash is taken of
    the bytes as they go out, so the file is not read back. Tensors are numpy arrays
    holding the bytes of their safetensors dtype (bfloat16 as uint16 bit patterns).
    `sync` puts the file on disk before returning (a resume state must survive a crash
    of the node; a merged model, a temporary output, need not). Write failures are
    raised as OSError naming `path`.
    """
    import numpy as np

    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape) in layout.items():
        size = ELEMENT_SIZE[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes with spaces
    digest = hashlib.sha256()
    try:
        with open(path, "wb") as fh:
            for chunk in (len(blob).to_bytes(8, "little"), blob):
                fh.write(chunk)
                digest.update(chunk)
            for (name, tensor), (expected, (dtype, shape)) in zip(tensors, layout.items(), strict=True):
                if name != expected or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"tensor '{name}' {tuple(tensor.shape)} does not fit the header's '{expected}' {tuple(shape)}")
                data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
                if data.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                    raise ValueError(f"tensor '{name}' is not of dtype {dtype}")
                fh.write(data)
                digest.update(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    return digest.hexdigest()


@dataclass
class TensorStream:
    """The tensors of one safetensors file, announced before they are made.

    `layout` maps each name to (safetensors dtype, shape), in file order; `items` yields
    (name, numpy array) in that order, each made only when it is asked for. Training's
    states come this way: under ZeRO each tensor is a gather that every rank must make,
    so rank 0 `save`s the stream and the other ranks `drain` it, and no rank ever holds
    more than one tensor of it.
    """

    layout: dict[str, tuple[str, tuple[int, ...]]]
    items: Iterator[tuple[str, Any]]

    def save(self, path: str | Path, metadata: dict[str, str] | None = None, sync: bool = True) -> str:
        """Write the stream to `path` (on disk when this returns, unless not `sync`); its sha256."""
        return save_tensors_streamed(self.layout, self.items, path, metadata, sync=sync)

    def drain(self) -> None:
        """Make every tensor and drop it: a rank that does not write takes part in the gathers."""
        for _ in self.items:
            pass


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


SCRATCH_OWNER = ".owner"  # the file in a scratch folder its job holds a lock on
SCRATCH_LOCK = ".scratch.lock"  # held while a scratch folder is swept or made


@contextmanager
def scratch_dir(parent: str | Path, prefix: str) -> Iterator[Path]:
    """A temporary folder `parent/<prefix>XXXXXXXX`, removed on exit, that no killed job
    leaves behind for long: its job holds a lock on the file SCRATCH_OWNER in it while it
    lives, and making one first removes every `prefix` folder whose lock is free (SIGKILL
    skips the clean-up of a TemporaryDirectory; the kernel drops the lock with the
    process). Sweeping and making happen under one lock in `parent`, so no folder is ever
    seen between being made and being locked.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    with open(parent / SCRATCH_LOCK, "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for old in parent.glob(prefix + "*"):
            if old.is_symlink() or not old.is_dir():
                continue  # not a scratch folder
            try:
                with open(old / SCRATCH_OWNER) as owner:
                    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                continue  # a running job's, or another user's
            except FileNotFoundError:
                pass  # killed between making it and locking it
            remove_tree(old)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        owner = open(tmp / SCRATCH_OWNER, "w")
        fcntl.flock(owner, fcntl.LOCK_EX)
    try:
        yield tmp
    finally:
        remove_tree(tmp)
        owner.close()


def remove_tree(path: Path) -> None:
    """Remove a folder of ours, read-only folders in it included (a package unpacked with
    its own permissions has some); what cannot be removed is left."""
    def writable_and_again(func, name, _exc_info) -> None:
        try:
            os.chmod(os.path.dirname(name), 0o700)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, 0o700)
            func(name)
        except OSError:
            pass

    shutil.rmtree(path, onerror=writable_and_again)


class StagingDir:
    """A temporary folder beside `target` whose files are moved into `target` on success.

    Files land in `target` one by one with os.replace, in the order given to `commit`, so
    the file a workflow watches (e.g. model.safetensors) can be moved last. On failure
    the staging folder is deleted and `target` keeps whatever it held before.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        clear_stale(self.target)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent))

    def commit(self, last: tuple[str, ...] = ()) -> None:
        self.target.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in self.path.iterdir())
        order = [n for n in names if n not in last] + [n for n in last if n in names]
        for name in order:
            os.replace(self.path / name, self.target / name)
        self.path.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> "StagingDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.discard()
