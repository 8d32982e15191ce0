"""Figures of the proxy analysis, shaped like Figures 3 to 9 of Na et al. (2024).

Command line::

    python -m mergemix.plots --scores results/proxy_scores.csv \
        --correlations results/correlations.csv --out-dir results/figures \
        [--proxy micro] [--grid-proxies micro macro mean_ind ind_id]

writes, each as ``.png`` and ``.pdf``:

==================  =========================================================
file                content
==================  =========================================================
figure3             seq ppl (y) against one proxy's ppl (x, ``--proxy``), one
                    panel per analysis domain, one point per mixture, a
                    least-squares line and Pearson r in each panel title
                    (the paper's Figure 3)
figure4_{proxy}     the same grid for every proxy of ``--grid-proxies`` (default:
                    every proxy in the scores); a proxy without scores gets a
                    page saying so, so the file set never depends on the data
figure5             Pearson r per domain, one bar per proxy
figure6             Spearman rho per domain, one bar per proxy
figure7             pairwise decision accuracy per domain, one bar per proxy,
                    with the 0.5 chance line
figure8             proxy rank (x) against true seq rank (y) of every mixture,
                    one row of panels per proxy and one column per domain; the
                    proxy's pick (proxy rank 1) is marked with its true rank
figure9             true rank of each proxy's pick (1 = it picked the best
                    mixture) per domain, one bar per proxy; the legend gives the
                    median over OOD domains (the paper's appendix A.5 summary)
==================  =========================================================

Figure 3 is the paper's seq-vs-merged scatter grid; figures 4 to 9 take the
paper's remaining figure numbers for the kinds of plot this analysis draws
(more scatter grids, correlation summaries, decision accuracy and ranks), in
that order; they are not claimed to match the paper's panels one for one.
Everything is read from ``proxy_scores.csv`` and ``correlations.csv``, so the
figures are redrawn (``snakemake figures``) without touching a model.

Output bytes are deterministic (no dates in the metadata) and a file is only
replaced when its bytes change.  Figures are built with
:class:`matplotlib.figure.Figure` and rendered by the non-interactive Agg/PDF
backends; pyplot (and its global state) is not used.
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

from scipy import stats

from mergemix.analyze import (
    CORR_COLUMNS,
    IND_PROXIES,
    MERGE_METHODS,
    OOD_MEAN,
    SCORE_COLUMNS,
    correlations,
    domain_label,
    domain_sort_key,
    proxy_sort_key,
    write_if_changed,
)
from mergemix.io import run_command

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
    try:
        df = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.PolarsError as exc:  # empty, a row with extra fields, bytes not UTF-8
        raise ValueError(f"{path} is not a readable CSV ({str(exc).splitlines()[0]}): rerun the analysis") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path} lacks required column(s): {', '.join(missing)}")
    for c in (*floats, *ints):
        bad = df.filter(pl.col(c).is_not_null() & pl.col(c).cast(pl.Int64 if c in ints else pl.Float64, strict=False)
                        .is_null())[c]
        if len(bad):
            raise ValueError(f"{path}: column {c} holds {bad[0]!r}, not a number: rerun the analysis")
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
        floats=("pearson_r", "pearson_p", "spearman_rho", "spearman_p", "pairwise_acc",
                "top1", "true_rank", "median_true_rank"),
        ints=("n_mixtures", "n_pairs"),
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


def _lookup(corr: pl.DataFrame, stat: str) -> dict[tuple[str, str], float]:
    return {
        (d, p): (float("nan") if v is None else float(v))
        for d, p, v in corr.select("domain", "proxy", stat).iter_rows()
    }


def _r_lookup(corr: pl.DataFrame) -> dict[tuple[str, str], float]:
    return _lookup(corr, "pearson_r")


def _r_text(r: float) -> str:
    return f"r = {r:.3f}" if math.isfinite(r) else "r = n/a"


def _grid(n: int, width: float, height: float, ncols: int = MAX_COLS) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    flat = [axes[i // ncols][i % ncols] for i in range(nrows * ncols)]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _available(scores: pl.DataFrame) -> str:
    return ", ".join(sorted(set(scores["proxy"].to_list()), key=proxy_sort_key)) or "none"


def figure3(scores: pl.DataFrame, corr: pl.DataFrame | None = None,
            proxy: str | None = None) -> Figure:
    """Seq ppl (y) against ``proxy`` ppl (x), one panel per analysis domain (paper Figure 3)."""
    if proxy is None:
        proxy = default_proxy(scores)
    sel = scores.filter(pl.col("proxy") == proxy)
    if sel.height == 0:
        raise ValueError(f"proxy {proxy!r} not in scores (have: {_available(scores)})")
    if corr is None:
        corr = correlations(scores)
    rs = _r_lookup(corr)
    domains = sorted(set(sel["domain"].to_list()), key=domain_sort_key)
    with matplotlib.rc_context(_STYLE):
        fig, axes = _grid(len(domains), 3.0, 2.8)
        for i, (ax, d) in enumerate(zip(axes, domains)):
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
            if i % MAX_COLS == 0:
                ax.set_ylabel("seq ppl")
            ax.grid(True, lw=0.3, alpha=0.5)
        fig.suptitle(f"seq vs. {proxy} perplexity, one point per mixture")
    return fig


def note_figure(text: str) -> Figure:
    """A one-panel page carrying only ``text`` (a figure whose data is absent)."""
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(4.0, 1.6), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


def proxy_grid(scores: pl.DataFrame, corr: pl.DataFrame, proxy: str) -> Figure:
    """Figure 4 for one proxy: figure 3's grid, or a page saying the proxy has no scores."""
    if scores.filter(pl.col("proxy") == proxy).height == 0:
        log.warning("no scores for proxy %s; figure4_%s says so", proxy, proxy)
        return note_figure(f"No scores for proxy '{proxy}' (have: {_available(scores)}).")
    return figure3(scores, corr, proxy)


def _bars(corr: pl.DataFrame, cell: dict[tuple[str, str], float], domains: list[str], ylabel: str,
          ylim: tuple[float, float], ref: float | None = None, ref_label: str = "",
          labels: dict[str, str] | None = None, legend: dict[str, str] | None = None) -> Figure:
    """Grouped bars: domains on x, one bar per proxy."""
    proxies = sorted(set(corr["proxy"].to_list()), key=proxy_sort_key)
    labels = labels or {}
    legend = legend or {}
    width = 0.8 / max(1, len(proxies))
    idx = np.arange(len(domains))
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(max(4.0, 0.45 * len(domains) * max(1, len(proxies)) + 2), 3.4),
                     layout="constrained")
        ax = fig.subplots()
        for k, p in enumerate(proxies):
            vals = np.array([cell.get((d, p), float("nan")) for d in domains], dtype=float)
            ax.bar(idx - 0.4 + width * (k + 0.5), vals, width, label=legend.get(p, p), color=f"C{k % 10}")
        if ref is not None:
            ax.axhline(ref, color="black", lw=0.8, ls="--", label=ref_label or None)
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(idx, [labels.get(d, domain_label(d)) for d in domains], rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_ylim(*ylim)
        fig.legend(ncols=min(len(proxies) + (ref is not None), 4), loc="outside upper center", frameon=False)
        ax.grid(True, axis="y", lw=0.3, alpha=0.5)
    return fig


def _domains(corr: pl.DataFrame) -> list[str]:
    return sorted(set(corr["domain"].to_list()), key=domain_sort_key)


def _corr_ylim(cell: dict[tuple[str, str], float]) -> tuple[float, float]:
    finite = [v for v in cell.values() if math.isfinite(v)]
    lo = min([0.0, *finite])
    return (lo - 0.05 if lo < 0 else 0.0, 1.05)


def correlation_bars(corr: pl.DataFrame, stat: str = "pearson_r") -> Figure:
    """Grouped bar chart of Pearson r (figure 5) or Spearman rho (figure 6, ``stat="spearman_rho"``)."""
    cell = _lookup(corr, stat)
    name = {"pearson_r": "Pearson r", "spearman_rho": "Spearman rho"}.get(stat, stat)
    return _bars(corr, cell, _domains(corr), f"{name} (seq ppl vs. proxy ppl)", _corr_ylim(cell))


def accuracy_bars(corr: pl.DataFrame) -> Figure:
    """Figure 7: pairwise decision accuracy per domain and proxy, chance at 0.5."""
    return _bars(corr, _lookup(corr, "pairwise_acc"), _domains(corr),
                 "pairwise accuracy (pairs ordered as by seq)", (0.0, 1.05), ref=0.5, ref_label="chance")


def pick_rank_bars(corr: pl.DataFrame) -> Figure:
    """Figure 9: true rank of each proxy's pick per domain; the OOD group is the median."""
    cell = _lookup(corr, "true_rank")
    medians = _lookup(corr, "median_true_rank")
    for (d, p), v in medians.items():
        if d == OOD_MEAN:
            cell[(d, p)] = v
    legend = {p: f"{p} (OOD median {_rank_text(v)})" for (d, p), v in medians.items() if d == OOD_MEAN}
    ranks = [v for v in cell.values() if v is not None and math.isfinite(v)]
    # n_mixtures counts those with a finite proxy ppl; a rank can range over all of them
    n = int(max([corr["n_mixtures"].max() or 1, *ranks])) if corr.height else 1
    return _bars(corr, cell, _domains(corr), "true rank of the proxy's pick (1 = best)",
                 (0.0, n + 0.5), ref=1.0, ref_label="picked the best",
                 labels={OOD_MEAN: "OOD median"}, legend=legend)


def _rank_text(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"


def rank_grid(scores: pl.DataFrame) -> Figure:
    """Figure 8: proxy rank (x) vs. true rank (y) of every mixture, proxies x domains.

    Ranks are 1 for the lowest perplexity (ties share the mean rank).  The
    proxy's pick (see :func:`mergemix.analyze.proxy_pick`) is drawn as a star
    and its true rank given in the panel title.
    """
    from mergemix.analyze import proxy_pick, worst_if_not_finite

    proxies = sorted(set(scores["proxy"].to_list()), key=proxy_sort_key)
    domains = sorted(set(scores["domain"].to_list()), key=domain_sort_key)
    if not proxies or not domains:
        return note_figure("No proxy scores to rank.")
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(2.3 * len(domains) + 0.4, 2.3 * len(proxies) + 0.4), layout="constrained")
        axes = fig.subplots(len(proxies), len(domains), squeeze=False)
        for i, p in enumerate(proxies):
            for j, d in enumerate(domains):
                ax = axes[i][j]
                part = scores.filter((pl.col("proxy") == p) & (pl.col("domain") == d)).sort("mixture")
                x = part["proxy_ppl"].to_numpy().astype(float)
                y = part["seq_ppl"].to_numpy().astype(float)
                ok = np.isfinite(y)  # as in the statistics: a failed proxy ranks last
                names = [m for m, keep in zip(part["mixture"].to_list(), ok) if keep]
                x, y = worst_if_not_finite(x[ok]), y[ok]
                title = domain_label(d) if i == 0 else ""
                if len(names) >= 1:
                    rx, ry = stats.rankdata(x), stats.rankdata(y)
                    n = len(names)
                    ax.plot([1, n], [1, n], color="0.6", lw=0.8, zorder=1)
                    ax.scatter(rx, ry, s=14, color="C0", edgecolors="none", zorder=2)
                    pick, _, true_rank = proxy_pick(names, x, y)
                    k = names.index(pick)
                    ax.scatter([rx[k]], [ry[k]], s=60, marker="*", color="C3", zorder=3)
                    title = f"{title}\npick's true rank {true_rank:g} of {n}".strip()
                    ax.set_xlim(0.5, n + 0.5)
                    ax.set_ylim(0.5, n + 0.5)
                else:
                    ax.text(0.5, 0.5, "no mixtures", ha="center", va="center", transform=ax.transAxes)
                ax.set_title(title)
                if j == 0:
                    ax.set_ylabel(f"{p}\ntrue (seq) rank")
                if i == len(proxies) - 1:
                    ax.set_xlabel("proxy rank")
                ax.grid(True, lw=0.3, alpha=0.5)
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
                 proxy: str | None = None, grid_proxies: Sequence[str] | None = None) -> list[Path]:
    """Write figures 3 to 9 (see the module docstring) under ``out_dir``; return the files rewritten."""
    out_dir = Path(out_dir)
    if grid_proxies is None:
        grid_proxies = sorted(set(scores["proxy"].to_list()), key=proxy_sort_key)
    changed = save_figure(figure3(scores, corr, proxy), out_dir / "figure3")
    for p in dict.fromkeys(grid_proxies):
        changed += save_figure(proxy_grid(scores, corr, p), out_dir / f"figure4_{p}")
    changed += save_figure(correlation_bars(corr, "pearson_r"), out_dir / "figure5")
    changed += save_figure(correlation_bars(corr, "spearman_rho"), out_dir / "figure6")
    changed += save_figure(accuracy_bars(corr), out_dir / "figure7")
    changed += save_figure(rank_grid(scores), out_dir / "figure8")
    changed += save_figure(pick_rank_bars(corr), out_dir / "figure9")
    return changed


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mergemix.plots",
        description="Figures 3-9: seq vs. proxy perplexity, correlation, accuracy and rank summaries.",
    )
    ap.add_argument("--scores", required=True, help="proxy_scores.csv from mergemix.analyze")
    ap.add_argument("--correlations", required=True, help="correlations.csv from mergemix.analyze")
    ap.add_argument("--out-dir", required=True, help="directory for figure3.* ... figure9.*")
    ap.add_argument("--proxy", default=None,
                    help="proxy on Figure 3's x axis (default: merged, else micro, else the first merge method)")
    ap.add_argument("--grid-proxies", nargs="+", default=None, metavar="PROXY",
                    help="proxies that get a figure4_PROXY grid (default: every proxy in the scores; "
                         f"known: {', '.join((*MERGE_METHODS, *IND_PROXIES))})")
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    matplotlib.use("Agg")  # headless; figures are plain Figure objects anyway
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergemix").setLevel(logging.WARNING if args.quiet else logging.INFO)
    grid = None
    if args.grid_proxies:
        grid = [v for item in args.grid_proxies for v in item.replace(",", " ").split() if v]

    def work() -> None:
        scores = load_scores(args.scores)
        corr = load_correlations(args.correlations)
        make_figures(scores, corr, args.out_dir, proxy=args.proxy, grid_proxies=grid)

    return run_command(work, (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
