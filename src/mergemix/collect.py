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
NUMBERS = {"n_docs": pl.Int64, "n_tokens": pl.Int64, "n_bytes": pl.Int64,
           "nll_sum": pl.Float64, "ppl": pl.Float64, "bpb": pl.Float64}


def collect(paths: list[Path]) -> pl.DataFrame:
    """Concatenate rows, checking every file has exactly the design's columns and numbers.

    Every column is read as text and passed through as the evaluation wrote it: a type
    guessed per file would differ between files (a diverged model's `nan` reads as text,
    a float that prints without a decimal point as an integer) and the files would not
    stack. Each number is still checked to parse, so a damaged file is named here.
    """
    frames = []
    for path in paths:
        try:
            frame = pl.read_csv(path, infer_schema=False)
        except pl.exceptions.NoDataError as exc:
            raise ValueError(f"{path} is empty: rerun its evaluation") from exc
        except pl.exceptions.PolarsError as exc:  # a row with extra fields, a stray quote, bytes not UTF-8
            raise ValueError(f"{path} is not a readable CSV ({str(exc).splitlines()[0]}): rerun its evaluation") from exc
        if frame.columns != COLUMNS:
            raise ValueError(f"{path} has columns {frame.columns}; expected {COLUMNS}: rerun its evaluation")
        for column, dtype in NUMBERS.items():
            bad = frame.filter(pl.col(column).cast(dtype, strict=False).is_null())[column]
            if len(bad):
                raise ValueError(f"{path}: column {column} holds {bad[0] or ''!r}, not a number: rerun its evaluation")
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
