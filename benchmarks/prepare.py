"""Data preparation: does a job's memory stay flat as its source grows?

The paper config's sources are gigabytes of text (its C4 seed corpus about 11 GB, each
S2ORC configuration about 1 GB), and a partition, tokenize or decontaminate job that
held its source in memory would need several times that. mergemix's three stages read
their input in batches (`corpus._READ_ROWS`, `tokenize.READ_ROWS`,
`decontaminate.READ_ROWS`) and write as they go, so their peak memory should hardly
move with the source's size. This script measures that.

It writes a JSON-lines source of real English (the docstrings of the running Python's
standard library, each document numbered, cycled to the size asked for) at two sizes,
the second four times the first, and runs each stage's command line as the workflow
runs it, in a fresh child process, on both:

- partition: `python -m mergemix.corpus partition` (through `datasets`, whose Arrow
  cache it builds first, as a first run on a cluster does);
- tokenize: `python -m mergemix.tokenize shards` (train and held-out shards);
- decontaminate: `python -m mergemix.decontaminate partition` against a filter of a
  few documents.

The peer is the same tokenization done the plain way, in memory: read the partition's
texts into a list, encode them in one `encode_batch` call and write the tokens. For each contender it prints the peak RSS and the
peak anonymous memory at both sizes, and the growth of the latter per MiB of text and
per document added. A stage that streams still keeps a few integers per document (its
split, its segments' sizes, its row): the goal is a growth under 256 bytes a document,
whatever the documents' length (the C4 seed source's 5.7M documents: under 1.4 GB).

    python benchmarks/prepare.py                # 64 and 256 MiB of text (a few minutes)
    python benchmarks/prepare.py --mb 16        # 16 and 64 MiB
    python benchmarks/prepare.py --tiny         # 1 and 4 MiB (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MODULES,
    OFFLINE,
    MiB,
    BenchError,
    driver_rss_line,
    goal,
    machine_line,
    markdown_table,
    run_child,
    scratch,
    stdlib_docstrings,
)

GROWTH_GOAL = 256  # bytes of peak anonymous memory per document added (C4's 5.7M: 1.4 GB)

PEER = """
import sys
from pathlib import Path

import numpy as np
import polars as pl
from transformers import PreTrainedTokenizerFast

tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])
texts = pl.read_parquet(sys.argv[1], columns=["text"])["text"].to_list()
ids = [e.ids + [tok.eos_token_id] for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
np.concatenate([np.asarray(x, dtype=np.uint16) for x in ids]).tofile(sys.argv[3])
"""


def write_source(path: Path, mib: float, pool: list[str]) -> tuple[int, int]:
    """A JSON-lines file of about `mib` MiB of text, documents cycled from `pool`; returns
    its text bytes and documents."""
    target, written, i = int(mib * MiB), 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < target:
            text = f"{i}.\n{pool[i % len(pool)]}"  # numbered on a line of its own: the rest is the pool's
            out.write(json.dumps({"text": text, "n": i}) + "\n")
            written += len(text.encode("utf-8"))
            i += 1
    return written, i


def run_size(folder: Path, label: str, mib: float, pool: list[str]) -> dict[str, tuple[float, ...]]:
    """Each contender's (text MiB, documents, wall s, peak RSS MiB, peak anonymous MiB) on a
    source of `mib` MiB."""
    py = sys.executable
    src = folder / f"{label}.jsonl"
    text_mib, n_docs = write_source(src, mib, pool)
    text_mib /= MiB
    env = {**OFFLINE, "HF_DATASETS_CACHE": str(folder / f"hf-{label}")}
    spec = {"source": "bench", "load": {"path": "json", "data_files": [str(src)], "split": "train"},
            "text_column": "text", "partition_by": [], "rename": {}, "partitions": [label], "seed": 0}
    part = folder / "parts" / f"{label}.parquet"
    steps = {
        "partition": [py, "-m", "mergemix.corpus", "partition", "--spec-json", json.dumps(spec),
                      "--out-dir", str(part.parent), "--no-summary"],
        "tokenize": [py, "-m", "mergemix.tokenize", "shards", "--input", str(part), "--tokenizer",
                     str(folder / "tokenizer"), "--out-dir", str(folder / "tokens" / label),
                     "--heldout-fraction", "0.01", "--segment-chars", "20000"],
        "decontaminate": [py, "-m", "mergemix.decontaminate", "partition", "--input", str(part), "--filter",
                          str(folder / "filter.json"), "--out", str(folder / "clean" / f"{label}.parquet"),
                          "--report", str(folder / "clean" / f"{label}.json")],
        "in-memory tokenize (peer)": [py, "-c", PEER, str(part), str(folder / "tokenizer"),
                                      str(folder / f"peer-{label}.bin")],
    }
    out = {}
    for name, cmd in steps.items():
        child = run_child(name, cmd, env=env, sample_anon=True)
        out[name] = (text_mib, n_docs, child.wall_s, child.peak_rss / MiB, child.peak_anon / MiB)
    report = json.loads((folder / "clean" / f"{label}.json").read_text())
    copies = report["documents_in"] // len(pool)  # the planted document is the pool's last
    if report["documents_removed"] < copies:
        raise BenchError(f"decontamination removed {report['documents_removed']} documents of {report['documents_in']}: "
                         f"fewer than the {copies} copies of the planted one")
    peer = (folder / f"peer-{label}.bin").stat().st_size
    shards = sum(json.loads((folder / "tokens" / label / f"{s}.json").read_text())["n_tokens"] for s in ("train", "heldout"))
    if peer != 2 * shards:
        raise BenchError(f"the peer wrote {peer // 2} tokens, mergemix's shards hold {shards}: they must agree")
    return out


def setup(folder: Path) -> None:
    """The documents (pool.json, the planted one last), a BPE trained on them, and a filter
    of the planted one (every copy of it must be removed)."""
    import polars as pl

    from mergemix.decontaminate import EvalSet, build_filter
    from mergemix.tokenize import train_bpe

    pool = [t for docs in stdlib_docstrings(MODULES).values() for t in docs]
    train_bpe(pool, 4096, folder / "tokenizer")
    planted = next(t for t in pool if any(len(line.split()) >= 13 for line in t.splitlines()))
    (folder / "eval").mkdir()
    pl.DataFrame({"text": [planted, "another evaluation document"]}).write_parquet(folder / "eval" / "set.parquet")
    build_filter([EvalSet("planted", folder / "eval" / "set.parquet", 1.0, 0)], 13, 1e-6, folder / "filter.json")
    (folder / "pool.json").write_text(json.dumps([p for p in pool if p != planted] + [planted]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=64.0, help="text of the smaller source in MiB; the larger is 4x")
    parser.add_argument("--tiny", action="store_true", help="1 and 4 MiB: the smoke test")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--setup", type=Path, help=argparse.SUPPRESS)  # the child that makes the inputs
    args = parser.parse_args(argv)
    if args.setup:
        setup(args.setup)
        return 0
    small = 1.0 if args.tiny else args.mb
    print(machine_line(), flush=True)
    folder = scratch("prepare")
    try:
        # the tokenizer and the filter are made in a child: this process stays small, and
        # every child's peak starts from at least its size
        run_child("setup", [sys.executable, __file__, "--setup", str(folder)], env=OFFLINE)
        pool = json.loads((folder / "pool.json").read_text())
        sizes = {"small": small, "large": 4 * small}
        results = {label: run_size(folder, label, mib, pool) for label, mib in sizes.items()}
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            print(f"kept {folder}")
    rows, per_doc = [], {}
    for name in results["small"]:
        (t1, n1, w1, r1, a1), (t2, n2, w2, r2, a2) = results["small"][name], results["large"][name]
        per_doc[name] = (a2 - a1) * MiB / (n2 - n1)
        rows.append({"step": name, "text MiB": f"{t1:.0f} / {t2:.0f}", "documents": f"{n1:,} / {n2:,}",
                     "wall s": f"{w1:.1f} / {w2:.1f}", "MiB/s (large)": t2 / w2,
                     "peak RSS MiB": f"{r1:.0f} / {r2:.0f}", "peak anonymous MiB": f"{a1:.0f} / {a2:.0f}",
                     "growth per text MiB": (a2 - a1) / (t2 - t1), "growth per document (bytes)": per_doc[name]})
    print(markdown_table(rows, list(rows[0])))
    print(driver_rss_line())
    print("peak RSS (ru_maxrss) counts the pages of files a process maps, which the kernel may drop at any time "
          "(partition maps the `datasets` Arrow cache); peak anonymous memory (RssAnon, sampled every 20 ms) is "
          "what the process cannot give back, and its growth is what the goal is on")
    peer = per_doc["in-memory tokenize (peer)"]
    print(f"ratio: tokenize / in-memory peer growth per document: {per_doc['tokenize'] / peer:.4f}")
    for name in ("partition", "tokenize", "decontaminate"):
        goal(f"{name} peak anonymous memory grows by under {GROWTH_GOAL} bytes a document, not with the text "
             f"({per_doc[name]:.0f})", per_doc[name] < GROWTH_GOAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
