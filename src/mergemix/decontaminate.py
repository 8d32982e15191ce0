"""Decontamination: drop training documents that share a paragraph with an evaluation set.

The paper decontaminates its training data as Dolma and Paloma do: every paragraph of
the evaluation documents goes into a Bloom filter, and a training document is removed
whole if any of its paragraphs of at least 13 tokens is in the filter. Short paragraphs
("Thank you.", "Enter HAMLET") are left out on both sides because they are generic, not
evidence of a leak.

Choices made here (docs/decontamination.md says why at more length):
- A paragraph is a line: text split on newlines, as Dolma's paragraph-level tools do.
- A token is a word of the normalised paragraph (NFKC, case-folded; a word is a run of
  letters, digits or underscores, with an inner apostrophe or period kept: "don't",
  "3.14"), close to the Unicode word segmentation (UAX #29) Paloma counts in. Words
  do not depend on the tokenizer, so changing the tokenizer never changes which
  documents are trained on, and the filter can be built before a tokenizer exists.
- Paragraphs are compared by that word sequence: case, punctuation and spacing do
  not hide a copy.

The Bloom filter is a numpy bit array sized from the number of distinct evaluation
paragraphs and a false-positive rate; its k bit positions per paragraph are k
independent 64-bit words of keyed blake2b digests (8 words a digest), stable across
runs and machines. (Filters before 2026-11-24 took them from one 128-bit digest by
double hashing, a + i b mod m, whose k positions fold onto a few bits when b shares a
factor with m, and whose position sets repeat at small m: 42 evaluation paragraphs at
1e-6 matched about 1 clean paragraph in 2,000. Such filters still load and are read
their own way; delete them to rebuild.) It has no false negatives: a copied paragraph
is always caught. A false positive drops a clean document, so the rate must stay well
below one over the number of paragraphs checked (the default 1e-6 costs 29 bits per evaluation paragraph).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from mergemix import io, tokenize
from mergemix.tokenize import split_documents

log = logging.getLogger(__name__)

WORD = re.compile(r"\w+(?:['’.]\w+)*")
HASH = "blake2b-512 independent words"
LEGACY_HASH = "blake2b-128 double hashing"  # filters built before 2026-11-24
EXAMPLES = 5  # removed documents quoted in a partition's report


class DecontaminateError(ValueError):
    """Bad decontamination input, phrased for the user."""


# --- paragraphs ------------------------------------------------------------------------


def words(paragraph: str) -> list[str]:
    """The tokens a paragraph is counted and compared in (see the module docstring)."""
    return WORD.findall(unicodedata.normalize("NFKC", paragraph).casefold())


def paragraph_keys(text: str, min_tokens: int) -> list[str]:
    """Normalised keys (words joined by one space) of a text's lines of >= min_tokens words."""
    keys = []
    for line in text.split("\n"):
        found = words(line)
        if len(found) >= min_tokens:
            keys.append(" ".join(found))
    return keys


# --- the Bloom filter ------------------------------------------------------------------


def _digests(keys: list[str]) -> np.ndarray:
    """(n, 2) uint64: the two halves of each key's 128-bit blake2b digest (LEGACY_HASH)."""
    raw = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=16).digest() for k in keys)
    return np.frombuffer(raw, dtype="<u8").reshape(-1, 2)


def _words(keys: list[str], n: int) -> np.ndarray:
    """(len(keys), n) uint64: independent hash words of each key, 8 per 512-bit blake2b
    digest, the digests told apart by their personalisation (round number)."""
    rounds = -(-n // 8)
    raw = b"".join(
        hashlib.blake2b(data, digest_size=64, person=r.to_bytes(2, "little")).digest()
        for data in (k.encode("utf-8") for k in keys)
        for r in range(rounds)
    )
    return np.frombuffer(raw, dtype="<u8").reshape(len(keys), rounds * 8)[:, :n]


@dataclass
class BloomFilter:
    """A set of strings with no false negatives and a bounded false-positive rate."""

    n_bits: int
    n_hashes: int
    bits: np.ndarray  # uint8, ceil(n_bits / 8); bit j is bit (j % 8) of byte j // 8
    hash: str = HASH  # how keys become positions: HASH, or LEGACY_HASH for an old filter

    @classmethod
    def sized(cls, n_items: int, false_positive_rate: float) -> BloomFilter:
        """The optimal filter for n_items: m = -n ln p / (ln 2)^2 bits, k = (m / n) ln 2."""
        if not 0 < false_positive_rate < 1:
            raise DecontaminateError(f"false-positive rate must be in (0, 1), got {false_positive_rate}")
        n = max(n_items, 1)
        n_bits = max(64, math.ceil(-n * math.log(false_positive_rate) / math.log(2) ** 2))
        n_hashes = max(1, round(n_bits / n * math.log(2)))
        return cls(n_bits, n_hashes, np.zeros((n_bits + 7) // 8, dtype=np.uint8))

    def positions(self, keys: list[str]) -> np.ndarray:
        """(len(keys), k) bit positions, each an independent hash word mod m (the bias of
        2^64 mod m is below m / 2^64: nothing for any real filter)."""
        m = np.uint64(self.n_bits)
        if self.hash == HASH:
            return _words(keys, self.n_hashes) % m
        # LEGACY_HASH: (a + i b) mod m, with b never 0.
        # a < m and i * b < k * m: the uint64 arithmetic cannot wrap for any real filter.
        assert self.n_bits * (self.n_hashes + 1) < 2**63
        digest = _digests(keys)
        a = digest[:, 0] % m
        b = digest[:, 1] % (m - np.uint64(1)) + np.uint64(1)
        i = np.arange(self.n_hashes, dtype=np.uint64)
        return (a[:, None] + i[None, :] * b[:, None]) % m

    def add(self, keys: list[str]) -> None:
        pos = self.positions(keys).ravel()
        np.bitwise_or.at(self.bits, pos >> np.uint64(3), (np.uint64(1) << (pos & np.uint64(7))).astype(np.uint8))

    def contains(self, keys: list[str]) -> np.ndarray:
        """Bool per key: True for every key added (and, rarely, for one that was not)."""
        if not keys:
            return np.zeros(0, dtype=bool)
        pos = self.positions(keys)
        hit = (self.bits[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return hit.all(axis=1).astype(bool)

    def false_positive_rate(self) -> float:
        """Chance that a key never added is reported present: (share of bits set)^k."""
        share = int(np.unpackbits(self.bits).sum()) / self.n_bits
        return share**self.n_hashes

    def save(self, sidecar_path: Path, meta: dict) -> dict:
        """Write the bits beside `sidecar_path` (same name, .bin), then the JSON sidecar
        (shape, sha256 of the bits): written last, it changes exactly when the bits do."""
        data = self.bits.tobytes()
        io.write_bytes(sidecar_path.with_suffix(".bin"), data)
        sidecar = {
            **meta,
            "n_bits": self.n_bits,
            "n_hashes": self.n_hashes,
            "hash": self.hash,
            "bits_sha256": hashlib.sha256(data).hexdigest(),
            "expected_false_positive_rate": self.false_positive_rate(),
        }
        io.write_json(sidecar_path, sidecar)
        return sidecar

    @classmethod
    def load(cls, sidecar_path: Path) -> tuple[BloomFilter, dict]:
        """The filter whose sidecar is `sidecar_path`, checked against the sha256 in it."""
        meta = io.read_json(sidecar_path)
        bits_path = sidecar_path.with_suffix(".bin")
        data = bits_path.read_bytes()
        if meta.get("hash") not in (HASH, LEGACY_HASH) or hashlib.sha256(data).hexdigest() != meta["bits_sha256"]:
            raise DecontaminateError(f"{bits_path} does not match its sidecar {sidecar_path}: delete both and rerun")
        return cls(meta["n_bits"], meta["n_hashes"], np.frombuffer(data, dtype=np.uint8).copy(), meta["hash"]), meta


# --- building the filter from the evaluation sets --------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set: the held-out documents of a partition file.

    `heldout_fraction` 1 takes every document (an OOD set's own file); below 1 it picks
    the documents `tokenize.split_documents` holds out with `seed`, which is how the
    seed corpus's held-out split becomes an OOD set (eval.ood.*.load.seed_heldout).
    """

    name: str
    path: Path
    heldout_fraction: float
    seed: int

    @classmethod
    def parse(cls, flag: str) -> EvalSet:
        """NAME:HELDOUT_FRACTION:SEED:PATH."""
        try:
            name, fraction, seed, path = flag.split(":", 3)
            return cls(name, Path(path), float(fraction), int(seed))
        except ValueError as exc:
            raise DecontaminateError(f"--eval {flag!r} is not NAME:HELDOUT_FRACTION:SEED:PATH") from exc

    def documents(self) -> list[str]:
        texts = read_texts(self.path)
        _, heldout = split_documents(len(texts), self.heldout_fraction, self.seed)
        return [texts[i] for i in heldout]


def open_partition(path: Path) -> pq.ParquetFile:
    """A partition file, refusing a missing or unreadable file and one without a text
    column (tokenization's checks, under this stage's error)."""
    try:
        return tokenize.open_partition(path)
    except tokenize.TokenizeError as exc:
        raise DecontaminateError(str(exc)) from None


def read_texts(path: Path) -> list[str]:
    return open_partition(path).read(columns=["text"]).column("text").to_pylist()


def build_filter(sets: list[EvalSet], min_tokens: int, false_positive_rate: float, out: Path) -> dict:
    """Put every paragraph of >= min_tokens words of the evaluation sets into one filter."""
    keys: set[str] = set()
    per_set = {}
    for es in sets:
        docs = es.documents()
        found = [k for d in docs for k in paragraph_keys(d, min_tokens)]
        per_set[es.name] = {"documents": len(docs), "paragraphs": len(found), "distinct": len(set(found))}
        if not found:
            log.warning("eval set %s has no paragraph of %d words or more: nothing is checked against it",
                        es.name, min_tokens)
        keys.update(found)
        log.info("%s: %d documents, %d paragraphs of >= %d words", es.name, len(docs), len(found), min_tokens)
    bloom = BloomFilter.sized(len(keys), false_positive_rate)
    bloom.add(sorted(keys))
    meta = {"sets": per_set, "n_items": len(keys), "min_paragraph_tokens": min_tokens,
            "false_positive_rate": false_positive_rate}
    return bloom.save(out, meta)


# --- decontaminating a partition -------------------------------------------------------


def contaminated(texts: list[str], bloom: BloomFilter, min_tokens: int) -> tuple[np.ndarray, dict, list[dict]]:
    """(bool per document: remove it, counts, examples).

    Examples are up to EXAMPLES removed documents, each as its row in `texts` and the
    normalised words of its first paragraph found in the filter.
    """
    owner, keys = [], []
    for i, text in enumerate(texts):
        found = paragraph_keys(text, min_tokens)
        owner.extend([i] * len(found))
        keys.extend(found)
    hits = bloom.contains(keys)
    remove = np.zeros(len(texts), dtype=bool)
    remove[np.asarray(owner, dtype=np.int64)[hits]] = True
    examples: dict[int, str] = {}
    for j in np.flatnonzero(hits):
        if len(examples) < EXAMPLES and owner[j] not in examples:
            examples[owner[j]] = keys[j][:160]
    counts = {"documents_in": len(texts), "documents_removed": int(remove.sum()),
              "documents_out": int(len(texts) - remove.sum()), "paragraphs_checked": len(keys),
              "paragraph_hits": int(hits.sum())}
    return remove, counts, [{"document": i, "paragraph": p} for i, p in examples.items()]


READ_ROWS = 1024  # partition documents checked at a time


def decontaminate_partition(partition_file: Path, filter_json: Path, out: Path, report: Path) -> dict:
    """Write the partition without its contaminated documents, and a report of the counts.

    The partition is read and written READ_ROWS documents at a time (io.ParquetRows), so
    memory holds a batch, not the partition."""
    bloom, meta = BloomFilter.load(filter_json)
    min_tokens = meta["min_paragraph_tokens"]
    source = open_partition(partition_file)
    name = f"{partition_file.parent.name}/{partition_file.stem}"
    counts: dict[str, int] = {}
    examples: list[dict] = []
    with io.StreamedFile(out) as stream, io.ParquetRows(stream, source.schema_arrow) as kept:
        first = 0  # the batch's first document in the partition
        for batch in source.iter_batches(batch_size=READ_ROWS):
            remove, found, hits = contaminated(batch.column("text").to_pylist(), bloom, min_tokens)
            for key, value in found.items():
                counts[key] = counts.get(key, 0) + value
            examples += [{**hit, "document": first + hit["document"]} for hit in hits][: EXAMPLES - len(examples)]
            kept.write(batch.filter(pa.array(~remove)))
            first += batch.num_rows
        sets = ", ".join(meta["sets"])
        if counts.get("documents_out", 0) == 0:
            raise DecontaminateError(
                f"decontamination removes all {counts.get('documents_in', 0)} documents of partition {name}: each"
                f" shares a paragraph of >= {min_tokens} words with an evaluation set ({sets}); drop the partition,"
                " remove the set from decontaminate.against, or raise decontaminate.min_paragraph_tokens")
        if counts["documents_out"] < 2 <= counts["documents_in"]:
            raise DecontaminateError(
                f"decontamination leaves 1 of the {counts['documents_in']} documents of partition {name} (the others"
                f" share a paragraph of >= {min_tokens} words with an evaluation set: {sets}), and a partition needs 2"
                " to hold one out; drop the partition, remove the set from decontaminate.against, or raise"
                " decontaminate.min_paragraph_tokens")
    summary = {"partition": name, **counts, "against": list(meta["sets"]), "min_paragraph_tokens": min_tokens,
               "filter_sha256": meta["bits_sha256"], "removed_examples": examples}
    io.write_json(report, summary)
    log.info("%s: removed %d of %d documents (%d of %d paragraphs hit)", name, counts["documents_removed"],
             counts["documents_in"], counts["paragraph_hits"], counts["paragraphs_checked"])
    return summary


# --- the table -------------------------------------------------------------------------

COLUMNS = ["source", "partition", "documents_in", "documents_removed", "documents_out",
           "paragraphs_checked", "paragraph_hits"]


def table(reports: list[Path], filter_json: Path) -> tuple[pl.DataFrame, str]:
    """One row per partition report, and the same as a markdown table with a caption."""
    rows = []
    for path in reports:
        rep = io.read_json(path)
        source, partition = rep["partition"].split("/", 1)
        rows.append({"source": source, "partition": partition, **{c: rep[c] for c in COLUMNS[2:]}})
    frame = pl.DataFrame(rows, schema={c: (pl.Utf8 if c in ("source", "partition") else pl.Int64) for c in COLUMNS})
    meta = io.read_json(filter_json)
    sets = ", ".join(f"{name} ({s['distinct']:,} paragraphs)" for name, s in meta["sets"].items())
    caption = (
        f"Decontamination: training documents removed per partition because one of their paragraphs"
        f" (lines of >= {meta['min_paragraph_tokens']} words) is also in an evaluation set: {sets}."
        f" Bloom filter of {meta['n_bits']:,} bits and {meta['n_hashes']} hashes, false-positive rate"
        f" {meta['expected_false_positive_rate']:.1e} per paragraph checked."
    )
    header = ["source", "partition", "docs in", "docs removed", "docs kept", "paragraphs checked", "paragraph hits"]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|:--|:--|" + "--:|" * 5]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.iter_rows()]
    return frame, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergemix.decontaminate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("filter", help="build the Bloom filter of the evaluation sets' paragraphs")
    f.add_argument("--eval", action="append", required=True, metavar="NAME:HELDOUT_FRACTION:SEED:PATH",
                   help="an evaluation set: the held-out documents of a partition file (fraction 1: all)")
    f.add_argument("--min-paragraph-tokens", type=int, required=True)
    f.add_argument("--false-positive-rate", type=float, required=True)
    f.add_argument("--out", type=Path, required=True, help="the filter's sidecar (.json); the bits go beside it (.bin)")
    p = sub.add_parser("partition", help="drop a partition's contaminated documents")
    p.add_argument("--input", type=Path, required=True)
    p.add_argument("--filter", type=Path, required=True, help="the filter's sidecar (.json), bits beside it")
    p.add_argument("--out", type=Path, required=True, help="the decontaminated partition (parquet)")
    p.add_argument("--report", type=Path, required=True, help="counts of the partition (json)")
    t = sub.add_parser("table", help="collect partition reports into one table (csv and md)")
    t.add_argument("--filter", type=Path, required=True, help="the filter's sidecar (.json)")
    t.add_argument("--out-csv", type=Path, required=True)
    t.add_argument("--out-md", type=Path, required=True)
    t.add_argument("reports", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def work() -> None:
        if args.cmd == "filter":
            sets = [EvalSet.parse(flag) for flag in args.eval]
            build_filter(sets, args.min_paragraph_tokens, args.false_positive_rate, args.out)
        elif args.cmd == "partition":
            decontaminate_partition(args.input, args.filter, args.out, args.report)
        else:
            frame, markdown = table(args.reports, args.filter)
            io.write_text(args.out_csv, frame.write_csv())
            io.write_text(args.out_md, markdown)

    return io.run_command(work, (DecontaminateError,))


if __name__ == "__main__":
    sys.exit(main())
