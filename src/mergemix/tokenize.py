"""Tokenizer and token shards.

A shard is a flat numpy memmap of token ids (`{split}.bin`), an index of its documents
(`{split}.idx`: int64 rows of (first token, UTF-8 bytes)), and a JSON sidecar. Training
reads the train stream as packed windows; evaluation reads held-out documents one by
one, and needs their byte counts for bits per byte.

Documents are split into train and held-out *before* long ones are cut into segments,
so no document straddles the two splits.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import sys
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mergemix import io

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"


class TokenizeError(ValueError):
    """Bad tokenizer or partition input, phrased for the user."""


# --- tokenizer -------------------------------------------------------------------------


def train_bpe(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, out_dir: Path) -> None:
    """Train a byte-level BPE (GPT-2 style) on texts (or batches of them, read as they are
    needed) and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=None)
    _save_tokenizer(fast, out_dir)


def fetch_pretrained(name: str, out_dir: Path) -> None:
    """Copy a Hugging Face tokenizer (hub name or folder) into the workflow's folder."""
    from transformers import AutoTokenizer

    folder = Path(name)
    if folder.is_dir() and not any(folder.iterdir()):
        raise TokenizeError(f"tokenizer folder {name} (tokenizer.name / seed.pretrained) is empty: "
                            "name a saved Hugging Face tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise TokenizeError(f"cannot load tokenizer '{name}' (tokenizer.name / seed.pretrained): {exc}") from exc
    if not tok.is_fast:
        raise TokenizeError(f"tokenizer '{name}' has no fast (tokenizers) version: give a tokenizer with tokenizer.json")
    if tok.eos_token_id is None:
        raise TokenizeError(f"tokenizer '{name}' defines no end-of-text token: mergemix separates documents with it")
    _save_tokenizer(tok, out_dir)


def _save_tokenizer(tok, out_dir: Path) -> None:
    with io.StagingDir(out_dir) as stage:
        tok.save_pretrained(stage.path)
        stage.commit(last=("tokenizer.json",))


def load_tokenizer(path: str | Path):
    """Load the workflow's tokenizer folder (always a fast tokenizer with an EOS token)."""
    from transformers import PreTrainedTokenizerFast

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise TokenizeError(f"tokenizer file {file} is missing: run the tokenizer rule first")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def tokenizer_hash(path: str | Path) -> str:
    return io.sha256_file(Path(path) / "tokenizer.json")


# --- shards ------------------------------------------------------------------------------


def segments(text: str, max_chars: int) -> list[str]:
    """Cut a document into pieces of at most `max_chars`, preferring paragraph, then line, breaks."""
    if len(text) <= max_chars:
        return [text]
    out: list[str] = []
    current = ""
    for sep in ("\n\n", "\n", " "):
        if sep in text:
            break
    else:
        return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]
    for piece in text.split(sep):
        candidate = piece if not current else current + sep + piece
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            out.append(current)
        if len(piece) > max_chars:
            out.extend(segments(piece, max_chars))
            current = ""
        else:
            current = piece
    if current:
        out.append(current)
    return out


def split_documents(n_docs: int, heldout_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded document-level split (train, held out): given two documents or more, each side
    gets at least one, whatever the fraction; a fraction of 1 holds every document out."""
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    if heldout_fraction >= 1.0:
        return [], sorted(order)
    n_heldout = min(n_docs - 1, max(1, round(heldout_fraction * n_docs)))
    return order[n_heldout:], sorted(order[:n_heldout])


def _encode(tok, texts: list[str]) -> list[list[int]]:
    return [enc.ids for enc in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]


READ_ROWS = 1024  # documents read from a partition file at a time
ENCODE_BATCH = 4096  # segments tokenized at a time
COPY_TOKENS = 1 << 24  # tokens gathered per write when a shard is put in order


def open_partition(partition_file: Path) -> pq.ParquetFile:
    """A partition file, refusing a missing or unreadable file and one without a text column."""
    if not partition_file.is_file():
        raise TokenizeError(f"partition file {partition_file} is missing")
    try:
        source = pq.ParquetFile(partition_file)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise TokenizeError(f"partition file {partition_file} is not a readable parquet file ({exc}): "
                            "delete it and rerun its partition rule") from exc
    if "text" not in source.schema_arrow.names:
        raise TokenizeError(f"partition file {partition_file} has no 'text' column: delete it and rerun its partition rule")
    return source


def read_texts(partition_file: Path, rows: int | None = None) -> Iterator[list[str]]:
    """A partition file's `text` column, `rows` documents at a time (READ_ROWS); the file
    is checked at the call, not at the first batch."""
    source = open_partition(partition_file)
    return (batch.column(0).to_pylist()
            for batch in source.iter_batches(batch_size=rows or READ_ROWS, columns=["text"]))


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`: one pread returns at most about 2 GiB on Linux."""
    parts = []
    while size:
        part = os.pread(fd, size, offset)
        if not part:
            raise OSError(f"token spool ended {size} bytes early at offset {offset}")
        parts.append(part)
        size, offset = size - len(part), offset + len(part)
    return b"".join(parts)


class _Spool:
    """One split's tokens and segment sizes, gathered in the partition file's order.

    A shard holds its documents in the order split_documents gives (shuffled for train,
    so that a unit is a sample of the whole partition), but the partition file is read
    front to back. Tokens therefore go first to an unnamed temporary file beside the
    shard, and `write` copies them into the shard in the split's order: memory holds one
    batch of text and three integers per document or segment, never the partition.
    """

    def __init__(self, out_prefix: Path, dtype: np.dtype) -> None:
        self.prefix = out_prefix
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        self.file = tempfile.TemporaryFile(dir=out_prefix.parent)  # no name: gone with the process
        self.dtype = dtype
        # int64 arrays (8 bytes an entry, where a list of ints takes about 36)
        self.doc_segments = array("q")  # per document met, in file order
        self.seg_tokens = array("q")  # per segment: its tokens and the EOS after it
        self.seg_bytes = array("q")  # per segment: its UTF-8 bytes

    def add(self, ids: list[list[int]], texts: list[str], eos: int) -> None:
        lengths = [len(x) + 1 for x in ids]
        flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=self.dtype, count=sum(lengths))
        self._spool(self.file.write, flat.tobytes())
        self.seg_tokens.extend(lengths)
        self.seg_bytes.extend(len(t.encode("utf-8")) for t in texts)

    def _spool(self, call, *args) -> None:
        try:
            call(*args)
        except OSError as exc:  # the temporary has no name: name the shard it is for
            raise OSError(exc.errno, exc.strerror, str(self.prefix.with_suffix(".bin"))) from exc

    def write(self, order: np.ndarray, meta: dict, vocab: int, eos: int) -> dict:
        """Write `{prefix}.bin/.idx/.json` with the documents in `order` (file positions of
        this split's documents, each once)."""
        self._spool(self.file.flush)
        out_prefix = self.prefix
        docs = np.asarray(self.doc_segments, dtype=np.int64)
        first_seg = np.concatenate([[0], np.cumsum(docs)])
        seg_tokens = np.asarray(self.seg_tokens, dtype=np.int64)
        seg_start = np.concatenate([[0], np.cumsum(seg_tokens)])
        # the shard's segments: each document's, in order
        counts = docs[order]
        before = np.cumsum(counts) - counts  # segments of the shard before each document's
        segs = np.repeat(first_seg[order] - before, counts) + np.arange(int(counts.sum()), dtype=np.int64)
        # read with pread, not a memory map: mapped pages would count as the job's memory
        fd, item = self.file.fileno(), self.dtype.itemsize
        with io.StreamedFile(out_prefix.with_suffix(".bin")) as out:
            pending, n_pending = [], 0
            for d in order:
                start, stop = seg_start[first_seg[d]], seg_start[first_seg[d + 1]]
                pending.append(_pread_all(fd, int(stop - start) * item, int(start) * item))
                n_pending += stop - start
                if n_pending >= COPY_TOKENS:
                    out.write(b"".join(pending))
                    pending, n_pending = [], 0
            if pending:
                out.write(b"".join(pending))
        lengths = seg_tokens[segs]
        n_bytes = np.asarray(self.seg_bytes, dtype=np.int64)[segs]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if segs.size else np.zeros(0, np.int64)
        rows = np.stack([starts, n_bytes], axis=1).astype(np.int64).tobytes() if segs.size else b""
        io.write_bytes(out_prefix.with_suffix(".idx"), rows)
        # The sidecar is written last and carries the hashes of the other two files, so it
        # changes exactly when they do: a rule may depend on it alone (evaluation jobs do,
        # which keeps a paper-scale DAG at one file per domain instead of three).
        sidecar = {
            **meta,
            "bin_sha256": out.sha256,
            "idx_sha256": hashlib.sha256(rows).hexdigest(),
            "dtype": np.dtype(self.dtype).name,
            "n_tokens": int(lengths.sum()),
            "n_docs": int(segs.size),
            "n_bytes": int(n_bytes.sum()),
            "vocab_size": vocab,
            "eos_id": int(eos),
        }
        io.write_json(out_prefix.with_suffix(".json"), sidecar)
        self.file.close()
        return sidecar


def _dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32)


def write_shard(tok, texts: list[str], out_prefix: Path, meta: dict) -> dict:
    """Tokenize `texts` (each one segment, already cut) into `{prefix}.bin/.idx/.json`
    in their order."""
    spool = _Spool(out_prefix, _dtype(len(tok)))
    spool.doc_segments.extend([1] * len(texts))
    for lo in range(0, len(texts), ENCODE_BATCH):
        batch = texts[lo : lo + ENCODE_BATCH]
        spool.add(_encode(tok, batch), batch, tok.eos_token_id)
    return spool.write(np.arange(len(texts)), meta, len(tok), tok.eos_token_id)


def make_shards(
    partition_file: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    heldout_fraction: float,
    segment_chars: int,
    seed: int,
    splits: tuple[str, ...] = ("train", "heldout"),
) -> dict[str, dict]:
    """Split a partition's documents, segment them and write one shard per split.

    A shard is `{split}.bin/.idx/.json`; each segment ends with EOS. The partition file is
    read READ_ROWS documents at a time and tokenized ENCODE_BATCH segments at a time, so
    memory holds a batch, not the partition (as Python strings and token lists, a
    partition of 1B tokens would take tens of GB).
    """
    source = open_partition(partition_file)
    name = f"{partition_file.parent.name}/{partition_file.stem}"
    n_docs = source.metadata.num_rows
    if not n_docs:
        raise TokenizeError(f"partition {name} ({partition_file}) has no documents: fix its definition in config.yaml")
    if "train" in splits and n_docs < 2:
        raise TokenizeError(
            f"partition {name} has {n_docs} document; at least 2 are needed to hold one out: merge it with another"
        )
    tok = load_tokenizer(tokenizer_dir)
    eos, vocab = tok.eos_token_id, len(tok)
    dtype = _dtype(vocab)
    # each split's documents as file positions, in the split's order (int64 arrays: a
    # list of Python ints would hold 36 bytes a document through the whole job)
    train_ids, heldout_ids = split_documents(n_docs, heldout_fraction if "train" in splits else 1.0, seed)
    ids = {"train": np.asarray(train_ids, dtype=np.int64), "heldout": np.asarray(heldout_ids, dtype=np.int64)}
    del train_ids, heldout_ids
    heldout = np.zeros(n_docs, dtype=bool)
    heldout[ids["heldout"]] = True
    spools = {split: _Spool(out_dir / split, dtype) for split in splits}
    doc = 0
    for texts in read_texts(partition_file):
        pieces: dict[str, list[str]] = {split: [] for split in splits}
        for text in texts:
            split = "heldout" if heldout[doc] else "train"
            cut = segments(text, segment_chars)
            spools[split].doc_segments.append(len(cut))
            pieces[split] += cut
            doc += 1
        for split, todo in pieces.items():
            for lo in range(0, len(todo), ENCODE_BATCH):
                batch = todo[lo : lo + ENCODE_BATCH]
                spools[split].add(_encode(tok, batch), batch, eos)
    meta = {"partition": name, "tokenizer_sha256": tokenizer_hash(tokenizer_dir), "seed": seed}
    out: dict[str, dict] = {}
    for split in splits:
        mine = heldout if split == "heldout" else ~heldout
        order = (np.cumsum(mine) - 1)[ids[split]]  # file positions -> numbers among the split's documents
        out[split] = spools[split].write(order, {**meta, "split": split, "n_source_docs": len(order)}, vocab, eos)
        log.info("%s/%s: %d docs, %d tokens", name, split, len(order), out[split]["n_tokens"])
    return out


# --- reading shards --------------------------------------------------------------------


def open_tokens(prefix: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Memory-map a shard: (tokens, index rows of (start, bytes), sidecar)."""
    prefix = Path(prefix)
    sidecar = prefix.with_suffix(".json")
    try:
        meta = io.read_json(sidecar)
    except ValueError as exc:
        raise TokenizeError(f"{sidecar} is not valid JSON ({exc}): delete the shard {prefix}.* and rerun") from exc
    if not isinstance(meta, dict) or not {"dtype", "n_tokens", "tokenizer_sha256"} <= set(meta):
        raise TokenizeError(f"{sidecar} is not a token shard sidecar (it lacks dtype, n_tokens or tokenizer_sha256): "
                            f"delete the shard {prefix}.* and rerun")
    dtype = np.dtype(meta["dtype"])
    path = prefix.with_suffix(".bin")
    size = path.stat().st_size
    if size != meta["n_tokens"] * dtype.itemsize:
        raise TokenizeError(f"{path} holds {size} bytes but its sidecar says {meta['n_tokens']} tokens of {dtype} "
                            f"({meta['n_tokens'] * dtype.itemsize} bytes; truncated or corrupt): delete the shard {prefix}.* and rerun")
    _check_hash(path, meta.get("bin_sha256"), io.sha256_file(path), prefix)
    # numpy cannot map an empty file; a shard of empty documents is read as no tokens
    tokens = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    idx = prefix.with_suffix(".idx")
    rows = idx.read_bytes()
    if len(rows) % 16 or ("n_docs" in meta and len(rows) // 16 != meta["n_docs"]):
        raise TokenizeError(f"{idx} holds {len(rows) / 16:g} document rows but its sidecar says {meta.get('n_docs')}: "
                            "delete the shard and rerun")
    _check_hash(idx, meta.get("idx_sha256"), hashlib.sha256(rows).hexdigest(), prefix)
    return tokens, np.frombuffer(rows, dtype=np.int64).reshape(-1, 2), meta


def _check_hash(path: Path, recorded: str | None, actual: str, prefix: Path) -> None:
    """A shard file must hash to what its sidecar recorded when it was written: the
    workflow tracks the sidecar alone, so a changed .bin or .idx is caught here."""
    if recorded is not None and recorded != actual:
        raise TokenizeError(f"{path} has sha256 {actual[:12]}... but its sidecar recorded {recorded[:12]}... "
                            f"(changed or corrupt since it was written): delete the shard {prefix}.* and rerun")


def unit_ranges(n_tokens: int, unit_tokens: int, unit: int) -> list[tuple[int, int]]:
    """Half-open ranges of a partition's train stream that form base unit `unit`.

    Unit u is [u*U, (u+1)*U) of the stream read cyclically: units are disjoint while
    they fit, and a partition shorter than its units is repeated (upsampled) so that
    every unit has exactly U tokens.
    """
    if n_tokens <= 0:
        raise TokenizeError("cannot cut units from an empty token stream")
    ranges: list[tuple[int, int]] = []
    pos, end = unit * unit_tokens, (unit + 1) * unit_tokens
    while pos < end:
        start = pos % n_tokens
        take = min(end - pos, n_tokens - start)
        ranges.append((start, start + take))
        pos += take
    return ranges


# --- the data table ---------------------------------------------------------------------

DATA_COLUMNS = ["source", "partition", "units", "train_docs", "train_tokens", "heldout_docs", "heldout_tokens",
                "trained_tokens", "passes"]


def data_table(partitions: list[tuple[Path, int]], unit_tokens: int) -> tuple[str, str]:
    """What each partition holds and how its units use it, as (csv, markdown).

    `partitions` pairs a partition's shard folder (with train.json and heldout.json
    sidecars) with its number of units. `passes` is units x unit_tokens over the train
    split's tokens: above 1 the units repeat the split (upsampling, as in the paper),
    below 1 they leave part of it unused.
    """
    rows = []
    for folder, units in partitions:
        train, heldout = (io.read_json(Path(folder) / f"{split}.json") for split in ("train", "heldout"))
        source, partition = train["partition"].split("/", 1)
        trained = units * unit_tokens
        rows.append([source, partition, units, train["n_source_docs"], train["n_tokens"], heldout["n_source_docs"],
                     heldout["n_tokens"], trained, round(trained / max(train["n_tokens"], 1), 2)])
    csv_text = "\n".join(",".join(str(v) for v in row) for row in [DATA_COLUMNS, *rows]) + "\n"
    caption = (
        f"Data per partition: documents and tokens of its train and held-out splits (the held-out split is "
        f"its in-domain evaluation set), and the tokens its units train on ({unit_tokens:,} per unit). "
        f"passes = trained tokens / train tokens: above 1 the units repeat the train split (a partition "
        f"smaller than its units is upsampled, as in the paper); below 1 part of it is not used."
    )
    header = [c.replace("_", " ").replace("heldout", "held-out") for c in DATA_COLUMNS]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|:--|:--|" + "--:|" * 7]
    lines += ["| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in row) + " |" for row in rows]
    return csv_text, "\n".join(lines) + "\n"


def _partition_units(text: str) -> tuple[Path, int]:
    folder, _, units = text.rpartition(":")
    if not folder or not units.isdigit() or int(units) < 1:
        raise argparse.ArgumentTypeError(f"expected FOLDER:UNITS with UNITS a positive whole number, got {text!r}")
    return Path(folder), int(units)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergemix.tokenize", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="train a BPE on a partition file, or fetch a named tokenizer")
    t.add_argument("--input", type=Path, help="partition parquet to train on")
    t.add_argument("--name", help="Hugging Face tokenizer name or folder (instead of training)")
    t.add_argument("--vocab-size", type=io.whole(1), default=4096)
    t.add_argument("--out-dir", type=Path, required=True)
    s = sub.add_parser("shards", help="split, segment and tokenize one partition")
    s.add_argument("--input", type=Path, required=True)
    s.add_argument("--tokenizer", type=Path, required=True)
    s.add_argument("--out-dir", type=Path, required=True)
    s.add_argument("--heldout-fraction", type=io.fraction, required=True)
    s.add_argument("--segment-chars", type=io.whole(1), required=True)
    s.add_argument("--seed", type=io.whole(0), default=0)
    s.add_argument("--heldout-only", action="store_true", help="all documents are evaluation documents")
    d = sub.add_parser("table", help="the data table: each partition's splits and how its units use them")
    d.add_argument("partitions", nargs="+", type=_partition_units, metavar="FOLDER:UNITS",
                   help="a partition's shard folder (train.json, heldout.json) and its number of units")
    d.add_argument("--unit-tokens", type=io.whole(1), required=True)
    d.add_argument("--out-csv", type=Path, required=True)
    d.add_argument("--out-md", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def work() -> None:
        if args.cmd == "tokenizer":
            if args.name:
                fetch_pretrained(args.name, args.out_dir)
            else:
                train_bpe(read_texts(args.input), args.vocab_size, args.out_dir)
        elif args.cmd == "table":
            csv_text, markdown = data_table(args.partitions, args.unit_tokens)
            io.write_text(args.out_csv, csv_text)
            io.write_text(args.out_md, markdown)
        else:
            splits = ("heldout",) if args.heldout_only else ("train", "heldout")
            make_shards(args.input, args.tokenizer, args.out_dir, args.heldout_fraction, args.segment_chars, args.seed, splits)

    return io.run_command(work, (TokenizeError,))


if __name__ == "__main__":
    sys.exit(main())
