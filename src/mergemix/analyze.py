"""Correlate proxy perplexities with ground-truth ("seq") perplexities.

Reproduces the analysis behind Table 2 of Na et al. (2024, arXiv 2410.15661):
for every candidate data mixture that has a model really trained on it (a
"seq" model), compare that model's perplexity with cheap proxies built from
per-partition models -- parameter averages ("merged" models, one per merge
method) and the per-partition ("ind") models' own perplexities -- and report,
per evaluation domain, Pearson r (and Spearman rho) across mixtures.

Input is ``results/perplexity.csv`` (one row per model x evaluation domain).
This module deliberately depends only on polars, numpy and scipy: the analysis
never needs the training stack.

Command line::

    python -m mergemix.analyze --perplexity results/perplexity.csv \
        --out-dir results [--proxies micro mean_ind ...]

writes ``proxy_scores.csv``, ``correlations.csv`` and
``tables/table2.{md,csv,tex}`` under ``--out-dir``; each file is replaced
(atomically) only when its bytes change.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from mergemix import io

log = logging.getLogger("mergemix.analyze")

# --------------------------------------------------------------------------
# constants

REQUIRED_COLUMNS: tuple[str, ...] = (
    "model_kind",
    "model_id",
    "mixture",
    "method",
    "domain",
    "domain_kind",
    "n_docs",
    "n_tokens",
    "n_bytes",
    "nll_sum",
    "ppl",
    "bpb",
)
STRING_COLUMNS = ("model_kind", "model_id", "mixture", "method", "domain", "domain_kind")
INT_COLUMNS = ("n_docs", "n_tokens", "n_bytes")
FLOAT_COLUMNS = ("nll_sum", "ppl", "bpb")

MODEL_KINDS = ("seed", "unit", "ind", "seq", "merged")
#: merge methods in the order their proxy columns appear in tables
MERGE_METHODS: tuple[str, ...] = ("micro", "macro", "weighted", "merged")
MEAN_IND = "mean_ind"
IND_ID = "ind_id"
IND_PROXIES: tuple[str, ...] = (MEAN_IND, IND_ID)

IN_DOMAIN = "in-domain"  # derived domain: union of a mixture's held-out sets
OOD_MEAN = "ood-mean"  # summary row of correlations.csv: mean r over OOD domains
OOD_MEAN_KIND = "mean"  # domain_kind of the summary rows
MIXTURE_SEP = "+"

SCORE_COLUMNS = ("mixture", "domain", "domain_kind", "seq_ppl", "proxy", "proxy_ppl")
CORR_COLUMNS = (
    "domain",
    "domain_kind",
    "proxy",
    "n_mixtures",
    "pearson_r",
    "pearson_p",
    "spearman_rho",
    "spearman_p",
)
MIN_MIXTURES = 3

_SCORE_SCHEMA = {
    "mixture": pl.Utf8,
    "domain": pl.Utf8,
    "domain_kind": pl.Utf8,
    "seq_ppl": pl.Float64,
    "proxy": pl.Utf8,
    "proxy_ppl": pl.Float64,
}
_CORR_SCHEMA = {
    "domain": pl.Utf8,
    "domain_kind": pl.Utf8,
    "proxy": pl.Utf8,
    "n_mixtures": pl.Int64,
    "pearson_r": pl.Float64,
    "pearson_p": pl.Float64,
    "spearman_rho": pl.Float64,
    "spearman_p": pl.Float64,
}


# --------------------------------------------------------------------------
# small helpers


def partitions_of(mixture: str) -> list[str]:
    """Partition names of a mixture id such as ``"1850s+1900s"``."""
    return [p for p in mixture.split(MIXTURE_SEP) if p]


def proxy_sort_key(proxy: str) -> tuple[int, int, str]:
    """Canonical proxy order: merge methods, other proxies, mean_ind, ind_id."""
    if proxy in MERGE_METHODS:
        return (0, MERGE_METHODS.index(proxy), proxy)
    if proxy in IND_PROXIES:
        return (2, IND_PROXIES.index(proxy), proxy)
    return (1, 0, proxy)


def domain_sort_key(domain: str) -> tuple[int, str]:
    """OOD domains alphabetically, then ``in-domain``, then ``ood-mean``."""
    if domain == IN_DOMAIN:
        return (1, domain)
    if domain == OOD_MEAN:
        return (2, domain)
    return (0, domain)


def domain_label(domain: str) -> str:
    """Display name of a domain in tables and figures."""
    return "OOD mean" if domain == OOD_MEAN else domain


def write_if_changed(path: str | os.PathLike, data: bytes | str) -> bool:
    """Atomically write ``data`` unless the file already holds it (see mergemix.io)."""
    return io.write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)


def _check_columns(columns: Iterable[str], required: Sequence[str], source: str) -> None:
    present = set(columns)
    missing = [c for c in required if c not in present]
    if missing:
        raise ValueError(f"{source} lacks required column(s): {', '.join(missing)}")


# --------------------------------------------------------------------------
# loading


def _normalise(df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Check columns and cast to the canonical schema (strings never null)."""
    _check_columns(df.columns, REQUIRED_COLUMNS, source)
    exprs = [pl.col(c).cast(pl.Utf8).fill_null("").str.strip_chars() for c in STRING_COLUMNS]
    exprs += [pl.col(c).cast(pl.Int64) for c in INT_COLUMNS]
    exprs += [pl.col(c).cast(pl.Float64) for c in FLOAT_COLUMNS]
    try:
        out = df.with_columns(exprs)
    except pl.exceptions.PolarsError as exc:  # e.g. non-numeric n_tokens
        raise ValueError(f"{source}: cannot parse numeric columns ({exc})") from exc
    reserved = out.filter(pl.col("domain").is_in([IN_DOMAIN, OOD_MEAN]))
    if reserved.height:
        raise ValueError(
            f"{source}: domain names {IN_DOMAIN!r} and {OOD_MEAN!r} are reserved for derived rows"
        )
    dup = out.filter(out.select("model_kind", "model_id", "method", "domain").is_duplicated())
    if dup.height:
        r = dup.row(0, named=True)
        raise ValueError(
            f"{source}: duplicate rows for model_kind={r['model_kind']!r} "
            f"model_id={r['model_id']!r} method={r['method']!r} domain={r['domain']!r}"
        )
    return out


def load_perplexity(path: str | os.PathLike) -> pl.DataFrame:
    """Read ``perplexity.csv``; every column is read as text, then cast.

    Reading as text first keeps names such as ``1900`` strings.  Raises
    ValueError naming the file and column when a required column is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        raw = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.NoDataError as exc:
        raise ValueError(f"{path}: empty file") from exc
    return _normalise(raw, str(path))


# --------------------------------------------------------------------------
# model selection


def ind_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Rows of every partition's ind model, relabelled ``model_kind="ind"``.

    A partition made of a single unit has no ind row: its unit model
    (``model_id == "<partition>/0"``) stands in, provided that partition has
    exactly one unit model and no ind row.
    """
    ind = df.filter(pl.col("model_kind") == "ind")
    have_ind = set(ind["mixture"].unique().to_list())
    units = df.filter(pl.col("model_kind") == "unit")
    extra = []
    if units.height:
        per_part = (
            units.group_by("mixture")
            .agg(pl.col("model_id").unique().alias("ids"))
            .sort("mixture")
        )
        for part, ids in per_part.iter_rows():
            if part in have_ind or len(ids) != 1:
                continue
            (uid,) = ids
            if uid.rsplit("/", 1)[-1] != "0":
                log.warning("partition %s: single unit model %r is not unit 0; ignored", part, uid)
                continue
            extra.append(units.filter(pl.col("model_id") == uid))
    out = pl.concat([ind, *extra], how="vertical") if extra else ind
    return out.with_columns(pl.lit("ind").alias("model_kind"))


def _mixtures_to_evaluate(df: pl.DataFrame) -> list[str]:
    kinds = df.filter(pl.col("model_kind").is_in(["seq", "merged"]))
    return sorted(kinds["mixture"].unique().to_list())


def in_domain_rows(df: pl.DataFrame) -> pl.DataFrame:
    """Derived ``in-domain`` rows: each model on the union of a mixture's held-out sets.

    For every mixture m that has a seq or merged model, and for
    - every seq/merged model of m, and
    - every ind model (see :func:`ind_rows`) of a partition of m,
    sum ``nll_sum``/``n_tokens``/``n_bytes``/``n_docs`` over the rows whose
    domain is a partition of m (domain_kind "id") and set
    ``ppl = exp(nll / tokens)``, ``bpb = nll / ln 2 / bytes``.

    Returns the perplexity columns plus ``eval_mixture`` (the mixture m whose
    union set was used; equal to ``mixture`` for seq/merged rows).  A model
    lacking one of m's held-out rows gets no in-domain row (warned).
    """
    df = _normalise(df, "perplexity table")
    mixtures = _mixtures_to_evaluate(df)
    parts = pl.DataFrame(
        {
            "eval_mixture": [m for m in mixtures for _ in partitions_of(m)],
            "domain": [p for m in mixtures for p in partitions_of(m)],
            "n_parts": [len(partitions_of(m)) for m in mixtures for _ in partitions_of(m)],
        },
        schema={"eval_mixture": pl.Utf8, "domain": pl.Utf8, "n_parts": pl.Int64},
    )
    id_rows = df.filter(pl.col("domain_kind") == "id")
    own = (
        id_rows.filter(pl.col("model_kind").is_in(["seq", "merged"]))
        .with_columns(pl.col("mixture").alias("eval_mixture"))
        .join(parts, on=["eval_mixture", "domain"], how="inner")
    )
    # ind model of partition p (its ``mixture`` is p): only mixtures containing p
    ind = (
        ind_rows(id_rows)
        .join(parts, on="domain", how="inner")
        .filter(pl.col("eval_mixture").str.split(MIXTURE_SEP).list.contains(pl.col("mixture")))
    )
    both = pl.concat([own, ind.select(own.columns)], how="vertical")
    keys = ["model_kind", "model_id", "mixture", "method", "eval_mixture"]
    agg = both.group_by(keys, maintain_order=True).agg(
        pl.col("domain").n_unique().alias("_n"),
        pl.col("n_parts").first(),
        pl.col("n_docs").sum(),
        pl.col("n_tokens").sum(),
        pl.col("n_bytes").sum(),
        pl.col("nll_sum").sum(),
    )
    incomplete = agg.filter(pl.col("_n") != pl.col("n_parts"))
    for r in incomplete.iter_rows(named=True):
        log.warning(
            "%s model %s lacks held-out rows for part of mixture %s (%d of %d); no in-domain value",
            r["model_kind"], r["model_id"], r["eval_mixture"], r["_n"], r["n_parts"],
        )
    out = (
        agg.filter(pl.col("_n") == pl.col("n_parts"))
        .with_columns(
            pl.lit(IN_DOMAIN).alias("domain"),
            pl.lit("id").alias("domain_kind"),
            (pl.col("nll_sum") / pl.col("n_tokens")).exp().alias("ppl"),
            (pl.col("nll_sum") / math.log(2) / pl.col("n_bytes")).alias("bpb"),
        )
        .select(
            "model_kind", "model_id", "mixture", "method", "eval_mixture",
            "domain", "domain_kind", "n_docs", "n_tokens", "n_bytes",
            "nll_sum", "ppl", "bpb",
        )
        .sort(["eval_mixture", "model_kind", "method", "model_id"])
    )
    return out


def _mean_over_replicates(frame: pl.DataFrame, keys: list[str], what: str) -> pl.DataFrame:
    """Average ppl over several models sharing ``keys`` (warned; normally one)."""
    counts = frame.group_by(keys).agg(pl.col("model_id").n_unique().alias("_n"))
    multi = counts.filter(pl.col("_n") > 1)
    if multi.height:
        log.warning(
            "%d %s group(s) have several models (e.g. %s); averaging their ppl",
            multi.height, what, multi.row(0, named=True),
        )
    return frame.group_by(keys).agg(pl.col("ppl").mean())


# --------------------------------------------------------------------------
# proxies


def proxy_table(df: pl.DataFrame, proxies: Sequence[str] | None = None) -> pl.DataFrame:
    """Long table of seq ppl vs. proxy ppl: one row per mixture x domain x proxy.

    Columns: mixture, domain, domain_kind, seq_ppl, proxy, proxy_ppl.  Only
    mixtures with a seq model appear; analysis domains are the OOD domains
    plus ``in-domain``.  Proxies: one per merge method present, ``mean_ind``
    (mean over the mixture's partitions of the ind models' ppl on the domain)
    and ``ind_id`` (mean over partitions of each ind model's ppl on its own
    held-out set; the same for every domain).  A proxy value that cannot be
    formed (missing model or row) is left out, with a warning.  ``proxies``
    restricts the output to those proxy names.
    """
    df = _normalise(df, "perplexity table")
    if df.filter(pl.col("model_kind") == "seq").height == 0:
        raise ValueError("perplexity table has no seq rows (model_kind == 'seq')")

    in_dom = in_domain_rows(df)
    ood = df.filter(pl.col("domain_kind") == "ood")
    cols = ["model_kind", "model_id", "mixture", "method", "domain", "domain_kind", "ppl"]

    # ground truth
    seq = pl.concat(
        [ood.filter(pl.col("model_kind") == "seq").select(cols),
         in_dom.filter(pl.col("model_kind") == "seq").select(cols)],
        how="vertical",
    )
    seq = _mean_over_replicates(seq, ["mixture", "domain", "domain_kind"], "seq").rename(
        {"ppl": "seq_ppl"}
    )
    seq_mixtures = sorted(seq["mixture"].unique().to_list())

    pieces: list[pl.DataFrame] = []

    # merged models: one proxy per method
    merged = pl.concat(
        [ood.filter(pl.col("model_kind") == "merged").select(cols),
         in_dom.filter(pl.col("model_kind") == "merged").select(cols)],
        how="vertical",
    )
    if merged.filter(pl.col("method") == "").height:
        log.warning("merged rows with an empty method are ignored")
        merged = merged.filter(pl.col("method") != "")
    merged = _mean_over_replicates(merged, ["mixture", "method", "domain"], "merged")
    pieces.append(
        merged.rename({"method": "proxy", "ppl": "proxy_ppl"}).select(
            "mixture", "domain", "proxy", "proxy_ppl"
        )
    )

    # ind models
    ind = ind_rows(df)
    ind_ood = _mean_over_replicates(
        ind.filter(pl.col("domain_kind") == "ood"), ["mixture", "domain"], "ind"
    ).rename({"mixture": "partition"})
    ind_own = _mean_over_replicates(
        ind.filter((pl.col("domain_kind") == "id") & (pl.col("domain") == pl.col("mixture"))),
        ["mixture"],
        "ind",
    ).rename({"mixture": "partition"})
    ind_in = _mean_over_replicates(
        in_dom.filter(pl.col("model_kind") == "ind"), ["mixture", "eval_mixture"], "ind"
    ).rename({"mixture": "partition"})

    ood_domains = sorted(ood["domain"].unique().to_list())
    mean_rows: list[dict] = []
    id_rows: list[dict] = []
    ood_lookup = {(p, d): v for p, d, v in ind_ood.select("partition", "domain", "ppl").iter_rows()}
    own_lookup = dict(ind_own.select("partition", "ppl").iter_rows())
    in_lookup = {(p, m): v for p, m, v in ind_in.select("partition", "eval_mixture", "ppl").iter_rows()}
    have_ind = set(ind["mixture"].unique().to_list())
    for m in seq_mixtures:
        parts = partitions_of(m)
        missing = [p for p in parts if p not in have_ind]
        if missing:
            log.warning("mixture %s: no ind model for partition(s) %s; no ind proxies", m, missing)
            continue
        for d in ood_domains:
            vals = [ood_lookup.get((p, d)) for p in parts]
            if all(v is not None for v in vals):
                mean_rows.append({"mixture": m, "domain": d, "proxy": MEAN_IND,
                                  "proxy_ppl": float(np.mean(vals))})
            else:
                log.warning("mixture %s domain %s: an ind model lacks this domain; no mean_ind", m, d)
        vals = [in_lookup.get((p, m)) for p in parts]
        if all(v is not None for v in vals):
            mean_rows.append({"mixture": m, "domain": IN_DOMAIN, "proxy": MEAN_IND,
                              "proxy_ppl": float(np.mean(vals))})
        vals = [own_lookup.get(p) for p in parts]
        if all(v is not None for v in vals):
            ind_id = float(np.mean(vals))
            for d in [*ood_domains, IN_DOMAIN]:
                id_rows.append({"mixture": m, "domain": d, "proxy": IND_ID, "proxy_ppl": ind_id})
        else:
            log.warning("mixture %s: an ind model lacks its own held-out row; no ind_id", m)
    proxy_schema = {"mixture": pl.Utf8, "domain": pl.Utf8, "proxy": pl.Utf8, "proxy_ppl": pl.Float64}
    pieces.append(pl.DataFrame(mean_rows + id_rows, schema=proxy_schema))

    long = pl.concat([p.cast(proxy_schema) for p in pieces], how="vertical")
    if proxies is not None:
        wanted = list(dict.fromkeys(proxies))
        present = set(long["proxy"].unique().to_list())
        for p in wanted:
            if p not in present:
                log.warning("requested proxy %r is not available", p)
        long = long.filter(pl.col("proxy").is_in(wanted))

    out = seq.join(long, on=["mixture", "domain"], how="inner").select(SCORE_COLUMNS)
    return _sort_scores(out.cast(_SCORE_SCHEMA))


def _sort_scores(scores: pl.DataFrame) -> pl.DataFrame:
    if scores.height == 0:
        return pl.DataFrame(schema=_SCORE_SCHEMA)
    keys = scores.select(
        pl.col("domain").map_elements(lambda d: domain_sort_key(d)[0], return_dtype=pl.Int64).alias("_d"),
        pl.col("proxy").map_elements(
            lambda p: proxy_sort_key(p)[0] * 100 + proxy_sort_key(p)[1], return_dtype=pl.Int64
        ).alias("_p"),
    )
    return (
        pl.concat([scores, keys], how="horizontal")
        .sort(["_d", "domain", "_p", "proxy", "mixture"])
        .drop("_d", "_p")
    )


# --------------------------------------------------------------------------
# statistics


def _corr(x: np.ndarray, y: np.ndarray, label: str) -> tuple[float, float, float, float]:
    nan = float("nan")
    if len(x) < MIN_MIXTURES:
        log.warning("%s: only %d mixture(s) (< %d); correlation is NaN", label, len(x), MIN_MIXTURES)
        return nan, nan, nan, nan
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        log.warning("%s: constant input; correlation is NaN", label)
        return nan, nan, nan, nan
    pr = stats.pearsonr(x, y)
    sr = stats.spearmanr(x, y)
    return float(pr.statistic), float(pr.pvalue), float(sr.statistic), float(sr.pvalue)


def correlations(scores: pl.DataFrame) -> pl.DataFrame:
    """Pearson r and Spearman rho across mixtures, per domain and proxy.

    Correlates ``seq_ppl`` with ``proxy_ppl`` (raw perplexities, as in the
    paper).  Fewer than 3 mixtures or a constant input give NaN (warned).
    Adds one ``ood-mean`` row per proxy (domain_kind ``"mean"``): the mean of
    Pearson r and of Spearman rho over the OOD domains whose value is finite;
    its p-values are NaN and its n_mixtures is the smallest over those domains.
    """
    _check_columns(scores.columns, SCORE_COLUMNS, "scores table")
    scores = scores.select(SCORE_COLUMNS).cast(_SCORE_SCHEMA)
    rows: list[dict] = []
    groups = scores.group_by(["domain", "domain_kind", "proxy"]).agg(
        pl.col("mixture"), pl.col("seq_ppl"), pl.col("proxy_ppl")
    )
    for r in groups.iter_rows(named=True):
        x = np.asarray(r["proxy_ppl"], dtype=float)
        y = np.asarray(r["seq_ppl"], dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        pr, pp, sr, sp = _corr(x, y, f"domain {r['domain']} proxy {r['proxy']}")
        rows.append({
            "domain": r["domain"], "domain_kind": r["domain_kind"], "proxy": r["proxy"],
            "n_mixtures": int(len(x)), "pearson_r": pr, "pearson_p": pp,
            "spearman_rho": sr, "spearman_p": sp,
        })
    ood_rows = [r for r in rows if r["domain_kind"] == "ood"]
    for proxy in sorted({r["proxy"] for r in ood_rows}):
        sel = [r for r in ood_rows if r["proxy"] == proxy]
        rs = [r["pearson_r"] for r in sel if math.isfinite(r["pearson_r"])]
        rhos = [r["spearman_rho"] for r in sel if math.isfinite(r["spearman_rho"])]
        if len(rs) < len(sel):
            log.warning("proxy %s: OOD mean uses %d of %d OOD domains (others NaN)",
                        proxy, len(rs), len(sel))
        ns = [r["n_mixtures"] for r in sel if math.isfinite(r["pearson_r"])]
        rows.append({
            "domain": OOD_MEAN, "domain_kind": OOD_MEAN_KIND, "proxy": proxy,
            "n_mixtures": min(ns) if ns else 0,
            "pearson_r": float(np.mean(rs)) if rs else float("nan"),
            "pearson_p": float("nan"),
            "spearman_rho": float(np.mean(rhos)) if rhos else float("nan"),
            "spearman_p": float("nan"),
        })
    rows.sort(key=lambda r: (domain_sort_key(r["domain"]), proxy_sort_key(r["proxy"])))
    return pl.DataFrame(rows, schema=_CORR_SCHEMA)


# --------------------------------------------------------------------------
# tables


def _table_layout(corr: pl.DataFrame) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    _check_columns(corr.columns, ("domain", "proxy", "pearson_r"), "correlations table")
    domains = sorted(set(corr["domain"].to_list()), key=domain_sort_key)
    proxies = sorted(set(corr["proxy"].to_list()), key=proxy_sort_key)
    cell = {
        (d, p): (float("nan") if r is None else float(r))
        for d, p, r in corr.select("domain", "proxy", "pearson_r").iter_rows()
    }
    return domains, proxies, cell


def _bold_mask(values: list[float]) -> list[bool]:
    """Highest r per row (ties at 3 decimals all bold; NaN never)."""
    shown = [round(v, 3) if math.isfinite(v) else None for v in values]
    finite = [v for v in shown if v is not None]
    if not finite:
        return [False] * len(values)
    best = max(finite)
    return [v is not None and v == best for v in shown]


def _fmt(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "n/a"


def _n_text(corr: pl.DataFrame) -> str:
    sel = corr.filter(pl.col("domain") != OOD_MEAN) if "n_mixtures" in corr.columns else None
    if sel is None or sel.height == 0:
        return "n = ? mixtures"
    lo, hi = int(sel["n_mixtures"].min()), int(sel["n_mixtures"].max())
    return f"n = {hi} mixtures" if lo == hi else f"n = {lo}-{hi} mixtures (varies by cell)"


def caption(corr: pl.DataFrame) -> str:
    return (
        f"Table 2: Pearson r across mixtures ({_n_text(corr)}) between the seq model's "
        "perplexity and each proxy's perplexity, per evaluation domain; "
        "best (highest) r per row in bold."
    )


def markdown_table(corr: pl.DataFrame) -> str:
    """Markdown version of the paper's Table 2 (caption line, then the table).

    Rows: OOD domains (sorted), ``in-domain``, ``OOD mean``; columns: merge
    methods present, then ``mean_ind``, ``ind_id``; cells: Pearson r to three
    decimals with the row maximum in bold.
    """
    domains, proxies, cell = _table_layout(corr)
    lines = [caption(corr), ""]
    lines.append("| domain | " + " | ".join(proxies) + " |")
    lines.append("|:--|" + "|".join("--:" for _ in proxies) + "|")
    for d in domains:
        vals = [cell.get((d, p), float("nan")) for p in proxies]
        bold = _bold_mask(vals)
        cells = [f"**{_fmt(v)}**" if b else _fmt(v) for v, b in zip(vals, bold)]
        lines.append(f"| {domain_label(d)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def wide_table(corr: pl.DataFrame) -> pl.DataFrame:
    """Table 2 as a wide frame: ``domain`` then one Pearson-r column per proxy."""
    domains, proxies, cell = _table_layout(corr)
    data: dict[str, list] = {"domain": [domain_label(d) for d in domains]}
    for p in proxies:
        data[p] = [cell.get((d, p), float("nan")) for d in domains]
    return pl.DataFrame(data, schema={"domain": pl.Utf8, **{p: pl.Float64 for p in proxies}})


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def _tex(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in s)


def latex_table(corr: pl.DataFrame) -> str:
    """Table 2 as a booktabs LaTeX tabular (needs ``\\usepackage{booktabs}``)."""
    domains, proxies, cell = _table_layout(corr)
    lines = [
        f"% {caption(corr)}",
        r"\begin{tabular}{l" + "r" * len(proxies) + "}",
        r"\toprule",
        "Domain & " + " & ".join(_tex(p) for p in proxies) + r" \\",
        r"\midrule",
    ]
    for d in domains:
        if d == OOD_MEAN:
            lines.append(r"\midrule")
        vals = [cell.get((d, p), float("nan")) for p in proxies]
        bold = _bold_mask(vals)
        cells = [
            (rf"\textbf{{{_fmt(v)}}}" if b else _fmt(v)) if math.isfinite(v) else "--"
            for v, b in zip(vals, bold)
        ]
        lines.append(_tex(domain_label(d)) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# command line


def csv_text(df: pl.DataFrame) -> str:
    return df.write_csv()


def write_outputs(scores: pl.DataFrame, corr: pl.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """Write every analysis output under ``out_dir``; return the files rewritten."""
    out_dir = Path(out_dir)
    tables = out_dir / "tables"
    outputs = {
        out_dir / "proxy_scores.csv": csv_text(scores),
        out_dir / "correlations.csv": csv_text(corr),
        tables / "table2.md": markdown_table(corr),
        tables / "table2.csv": csv_text(wide_table(corr)),
        tables / "table2.tex": latex_table(corr),
    }
    changed = []
    for path, text in outputs.items():
        if write_if_changed(path, text):
            changed.append(path)
            log.info("wrote %s", path)
        else:
            log.info("unchanged %s", path)
    return changed


def _split_list(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v for item in values for v in item.replace(",", " ").split() if v]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mergemix.analyze",
        description="Correlate proxy perplexities with seq-model perplexities (Table 2).",
    )
    ap.add_argument("--perplexity", required=True, help="perplexity.csv (one row per model x domain)")
    ap.add_argument("--out-dir", required=True, help="directory for proxy_scores.csv, correlations.csv, tables/")
    ap.add_argument(
        "--proxies", nargs="+", default=None, metavar="PROXY",
        help="restrict to these proxies (space or comma separated): "
        "merge methods (micro, macro, weighted, merged), mean_ind, ind_id",
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mergemix").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        df = load_perplexity(args.perplexity)
        if df.filter(pl.col("model_kind") == "seq").height == 0:
            raise ValueError(f"{args.perplexity} has no seq rows (model_kind == 'seq')")
        scores = proxy_table(df, proxies=_split_list(args.proxies))
        corr = correlations(scores)
        write_outputs(scores, corr, args.out_dir)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
