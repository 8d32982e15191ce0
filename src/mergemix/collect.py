"""Collect per-model perplexity CSVs into results/perplexity.csv (the design's columns)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import polars as pl

from mergemix import io

log = logging.getLogger(__name__)

COLUMNS = ["model_kind", "model_id", "mixture", "method", "domain", "domain_kind",
           "n_docs", "n_tokens", "n_bytes", "nll_sum", "ppl", "bpb"]
TEXT = {"model_kind", "model_id", "mixture", "method", "domain", "domain_kind"}


def collect(paths: list[Path]) -> pl.DataFrame:
    """Concatenate rows, checking every file has exactly the design's columns."""
    frames = []
    for path in paths:
        frame = pl.read_csv(path, schema_overrides={c: pl.Utf8 for c in TEXT})
        if frame.columns != COLUMNS:
            raise ValueError(f"{path} has columns {frame.columns}; expected {COLUMNS}: rerun its evaluation")
        frames.append(frame.with_columns(pl.col("method").fill_null("")))
    table = pl.concat(frames) if frames else pl.DataFrame(schema={c: pl.Utf8 for c in COLUMNS})
    return table.sort(["model_kind", "model_id", "domain"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergemix.collect", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("inputs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def work() -> None:
        table = collect(args.inputs)
        io.write_text(args.out, table.write_csv())
        log.info("%d rows from %d files -> %s", table.height, len(args.inputs), args.out)

    return io.run_command(work, (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
