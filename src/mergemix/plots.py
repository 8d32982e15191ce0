"""Figures for the proxy analysis (Figure 3 of Na et al. 2024 and a summary bar chart).

Command line::

    python -m mergemix.plots --scores results/proxy_scores.csv \
        --correlations results/correlations.csv --out-dir results/figures [--proxy micro]

writes ``figure3.png``/``figure3.pdf`` (seq ppl against one proxy's ppl, one
panel per analysis domain, one point per mixture, least-squares line, Pearson
r in each panel title) and ``correlations.png``/``correlations.pdf`` (Pearson
r per domain, grouped by proxy).  Output bytes are deterministic (no dates in
the metadata) and a file is only replaced when its bytes change.

Figures are built with :class:`matplotlib.figure.Figure` and rendered by the
non-interactive Agg/PDF backends; pyplot (and its global state) is not used.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import polars as pl
from matplotlib.figure import Figure

from mergemix.analyze import (
    CORR_COLUMNS,
    MERGE_METHODS,
    SCORE_COLUMNS,
    correlations,
    domain_label,
    domain_sort_key,
    proxy_sort_key,
    write_if_changed,
)

log = logging.getLogger("mergemix.plots")

MAX_COLS = 4
#: default proxy for Figure 3, in order of preference
DEFAULT_PROXY_PREFERENCE: tuple[str, ...] = ("merged", "micro", "macro", "weighted")
_STYLE = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "pdf.fonttype": 42,
    "savefig.dpi": 150,
}
_PDF_META = {"CreationDate": None, "ModDate": None}
_PNG_META = {"Software": None}


# --------------------------------------------------------------------------
# reading


def _read_text_csv(path: str | os.PathLike, required: Sequence[str], floats: Sequence[str],
                   ints: Sequence[str] = ()) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    df = pl.read_csv(path, infer_schema=False)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks required column(s): {', '.join(missing)}")
    return df.with_columns(
        [pl.col(c).cast(pl.Float64) for c in floats] + [pl.col(c).cast(pl.Int64) for c in ints]
    )


def load_scores(path: str | os.PathLike) -> pl.DataFrame:
    """Read ``proxy_scores.csv`` (names stay strings)."""
    return _read_text_csv(path, SCORE_COLUMNS, floats=("seq_ppl", "proxy_ppl"))


def load_correlations(path: str | os.PathLike) -> pl.DataFrame:
    """Read ``correlations.csv`` (``NaN`` cells become float NaN)."""
    return _read_text_csv(
        path, CORR_COLUMNS,
        floats=("pearson_r", "pearson_p", "spearman_rho", "spearman_p"), ints=("n_mixtures",),
    )


# --------------------------------------------------------------------------
# figures


def default_proxy(scores: pl.DataFrame) -> str:
    """First merge method present (preferring ``merged``, then ``micro``), else the first proxy."""
    present = set(scores["proxy"].unique().to_list())
    if not present:
        raise ValueError("scores table has no proxy rows")
    for p in (*DEFAULT_PROXY_PREFERENCE, *MERGE_METHODS):
        if p in present:
            return p
    first = sorted(present, key=proxy_sort_key)[0]
    log.warning("no merged-model proxy in the scores; Figure 3 uses %s", first)
    return first


def _r_lookup(corr: pl.DataFrame) -> dict[tuple[str, str], float]:
    return {
        (d, p): (float("nan") if r is None else float(r))
        for d, p, r in corr.select("domain", "proxy", "pearson_r").iter_rows()
    }


def _r_text(r: float) -> str:
    return f"r = {r:.3f}" if math.isfinite(r) else "r = n/a"


def figure3(scores: pl.DataFrame, corr: pl.DataFrame | None = None,
            proxy: str | None = None) -> Figure:
    """Seq ppl (y) against ``proxy`` ppl (x), one panel per analysis domain."""
    if proxy is None:
        proxy = default_proxy(scores)
    sel = scores.filter(pl.col("proxy") == proxy)
    if sel.height == 0:
        raise ValueError(f"proxy {proxy!r} not in scores (have: "
                         f"{', '.join(sorted(set(scores['proxy'].to_list()), key=proxy_sort_key))})")
    if corr is None:
        corr = correlations(scores)
    rs = _r_lookup(corr)
    domains = sorted(set(sel["domain"].to_list()), key=domain_sort_key)
    n = len(domains)
    ncols = min(MAX_COLS, n)
    nrows = math.ceil(n / ncols)
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(3.0 * ncols, 2.8 * nrows), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i, d in enumerate(domains):
            ax = axes[i // ncols][i % ncols]
            part = sel.filter(pl.col("domain") == d).sort("mixture")
            x = part["proxy_ppl"].to_numpy().astype(float)
            y = part["seq_ppl"].to_numpy().astype(float)
            ok = np.isfinite(x) & np.isfinite(y)
            x, y = x[ok], y[ok]
            ax.scatter(x, y, s=18, color="C0", alpha=0.85, edgecolors="none", zorder=3)
            if len(x) >= 2 and np.ptp(x) > 0:
                slope, icpt = np.polyfit(x, y, 1)
                xs = np.array([x.min(), x.max()])
                ax.plot(xs, slope * xs + icpt, color="C3", lw=1.2, zorder=2)
            ax.set_title(f"{domain_label(d)}\n{_r_text(rs.get((d, proxy), float('nan')))}")
            ax.set_xlabel(f"{proxy} ppl")
            if i % ncols == 0:
                ax.set_ylabel("seq ppl")
            ax.grid(True, lw=0.3, alpha=0.5)
        for j in range(n, nrows * ncols):
            axes[j // ncols][j % ncols].set_visible(False)
    return fig


def correlation_bars(corr: pl.DataFrame) -> Figure:
    """Grouped bar chart of Pearson r: domains on x, one bar per proxy."""
    domains = sorted(set(corr["domain"].to_list()), key=domain_sort_key)
    proxies = sorted(set(corr["proxy"].to_list()), key=proxy_sort_key)
    rs = _r_lookup(corr)
    width = 0.8 / max(1, len(proxies))
    idx = np.arange(len(domains))
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(max(4.0, 0.9 * len(domains) * max(1, len(proxies)) * 0.5 + 2), 3.2),
                     layout="constrained")
        ax = fig.subplots()
        for k, p in enumerate(proxies):
            vals = np.array([rs.get((d, p), float("nan")) for d in domains], dtype=float)
            ax.bar(idx - 0.4 + width * (k + 0.5), vals, width,
                   label=p, color=f"C{k % 10}")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(idx, [domain_label(d) for d in domains], rotation=30, ha="right")
        ax.set_ylabel("Pearson r (seq ppl vs. proxy ppl)")
        finite = [v for v in rs.values() if math.isfinite(v)]
        lo = min([0.0, *finite])
        ax.set_ylim(lo - 0.05 if lo < 0 else 0.0, 1.05)
        fig.legend(ncols=min(len(proxies), 6), loc="outside upper center", frameon=False)
        ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    return fig


# --------------------------------------------------------------------------
# output


def figure_bytes(fig: Figure, fmt: str) -> bytes:
    """Render ``fig`` deterministically (no dates / version strings in metadata)."""
    buf = io.BytesIO()
    meta = _PDF_META if fmt == "pdf" else _PNG_META if fmt == "png" else None
    with matplotlib.rc_context(_STYLE):
        fig.savefig(buf, format=fmt, metadata=meta)
    return buf.getvalue()


def save_figure(fig: Figure, stem: str | os.PathLike, formats: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Write ``stem.png``/``stem.pdf``, each only if its bytes changed; return those rewritten."""
    stem = Path(stem)
    changed = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        if write_if_changed(path, figure_bytes(fig, fmt)):
            changed.append(path)
            log.info("wrote %s", path)
        else:
            log.info("unchanged %s", path)
    return changed


def make_figures(scores: pl.DataFrame, corr: pl.DataFrame, out_dir: str | os.PathLike,
                 proxy: str | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    changed = save_figure(figure3(scores, corr, proxy), out_dir / "figure3")
    changed += save_figure(correlation_bars(corr), out_dir / "correlations")
    return changed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mergemix.plots",
        description="Figure 3 (seq ppl vs. proxy ppl) and a Pearson-r summary chart.",
    )
    ap.add_argument("--scores", required=True, help="proxy_scores.csv from mergemix.analyze")
    ap.add_argument("--correlations", required=True, help="correlations.csv from mergemix.analyze")
    ap.add_argument("--out-dir", required=True, help="directory for figure3.* and correlations.*")
    ap.add_argument("--proxy", default=None,
                    help="proxy on Figure 3's x axis (default: merged, else micro, else the first merge method)")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    matplotlib.use("Agg")  # headless; figures are plain Figure objects anyway
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergemix").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        scores = load_scores(args.scores)
        corr = load_correlations(args.correlations)
        make_figures(scores, corr, args.out_dir, proxy=args.proxy)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
