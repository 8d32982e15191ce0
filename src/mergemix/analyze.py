"""Score proxy perplexities against ground-truth ("seq") perplexities.

Reproduces the analysis behind Tables 2-4 of Na et al. (2024, arXiv 2410.15661):
for every candidate data mixture that has a model really trained on it (a
"seq" model), compare that model's perplexity with cheap proxies built from
per-partition models -- parameter averages ("merged" models, one proxy per
merge method: ``micro``, ``macro``, ``weighted``, ``merged``) and the
per-partition ("ind") models' own perplexities (``mean_ind``, ``ind_id``) --
and report, per evaluation domain and averaged over the OOD domains:

- Pearson r and Spearman rho across mixtures (Table 2: Pearson r);
- pairwise decision accuracy: the share of mixture pairs the proxy orders as
  the seq models do (pairs tied in seq perplexity are left out; a pair only
  the proxy ties counts 0.5) -- Table 4;
- whether the proxy's best mixture (lowest proxy perplexity) is the true best
  (lowest seq perplexity), and its true rank (1 = best; the paper's A.5
  reports a median true rank of 2 of 22) -- with the means above, Table 3.

Input is ``results/perplexity.csv`` (one row per model x evaluation domain).
This module deliberately depends only on polars, numpy and scipy: the analysis
never needs the training stack.

Command line::

    python -m mergemix.analyze --perplexity results/perplexity.csv \
        --out-dir results [--proxies micro mean_ind ...]

writes ``proxy_scores.csv``, ``correlations.csv`` and
``tables/table{2,3,4}.{md,csv,tex}`` under ``--out-dir``; each file is
replaced (atomically) only when its bytes change.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats

from mergemix import io
from mergemix.config import IN_DOMAIN, OOD_MEAN

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

#: merge methods in the order their proxy columns appear in tables
MERGE_METHODS: tuple[str, ...] = ("micro", "macro", "weighted", "merged")
MEAN_IND = "mean_ind"
IND_ID = "ind_id"
IND_PROXIES: tuple[str, ...] = (MEAN_IND, IND_ID)

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
    "n_pairs",
    "pairwise_acc",
    "proxy_best",
    "true_best",
    "top1",
    "true_rank",
    "median_true_rank",
)
#: fewest mixtures for a correlation (two points always lie on a line)
MIN_MIXTURES = 3
#: fewest mixtures for pairwise accuracy, top-1 and true rank (one pair)
MIN_RANK_MIXTURES = 2

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
    "n_pairs": pl.Int64,
    "pairwise_acc": pl.Float64,
    "proxy_best": pl.Utf8,
    "true_best": pl.Utf8,
    "top1": pl.Float64,
    "true_rank": pl.Float64,
    "median_true_rank": pl.Float64,
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

_PPL_COLUMNS = ["model_kind", "model_id", "mixture", "method", "domain", "domain_kind", "ppl"]


def proxy_values(df: pl.DataFrame, mixtures: Sequence[str] | None = None,
                 proxies: Sequence[str] | None = None) -> pl.DataFrame:
    """Long table of proxy perplexities: one row per mixture x domain x proxy.

    Columns: mixture, domain, proxy, proxy_ppl.  Needs no seq model, so it
    ranks candidate mixtures that were never trained on (:mod:`mergemix.rank`).
    ``mixtures``: the mixtures to score (None: every mixture with a merged or
    seq model).  Domains are the OOD domains plus ``in-domain``.  Proxies: one
    per merge method present, ``mean_ind`` (mean over the mixture's partitions
    of the ind models' ppl on the domain) and ``ind_id`` (mean over partitions
    of each ind model's ppl on its own held-out set; the same for every
    domain).  A proxy value that cannot be formed (missing model or row) is
    left out, with a warning.  ``proxies`` restricts the output to those names.
    ``df`` is a table :func:`_normalise` has checked.
    """
    if mixtures is None:
        mixtures = _mixtures_to_evaluate(df)
    in_dom = in_domain_rows(df)
    ood = df.filter(pl.col("domain_kind") == "ood")
    cols = _PPL_COLUMNS

    pieces: list[pl.DataFrame] = []

    # merged models: one proxy per method
    merged = pl.concat(
        [ood.filter(pl.col("model_kind") == "merged").select(cols),
         in_dom.filter(pl.col("model_kind") == "merged").select(cols)],
        how="vertical",
    ).filter(pl.col("mixture").is_in(list(mixtures)))
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
    for m in mixtures:
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
    return long


def proxy_table(df: pl.DataFrame, proxies: Sequence[str] | None = None) -> pl.DataFrame:
    """Long table of seq ppl vs. proxy ppl: one row per mixture x domain x proxy.

    Columns: mixture, domain, domain_kind, seq_ppl, proxy, proxy_ppl.  Only
    mixtures with a seq model appear; the proxies are :func:`proxy_values`'.
    """
    df = _normalise(df, "perplexity table")
    if df.filter(pl.col("model_kind") == "seq").height == 0:
        raise ValueError("perplexity table has no seq rows (model_kind == 'seq')")
    seq = seq_values(df)
    long = proxy_values(df, sorted(seq["mixture"].unique().to_list()), proxies)
    out = seq.join(long, on=["mixture", "domain"], how="inner").select(SCORE_COLUMNS)
    return _sort_scores(out.cast(_SCORE_SCHEMA))


def seq_values(df: pl.DataFrame) -> pl.DataFrame:
    """The ground truth: each seq mixture's ppl per OOD domain and ``in-domain``.

    Columns: mixture, domain, domain_kind, seq_ppl (the mean over replicates).
    ``df`` is a table :func:`_normalise` has checked.
    """
    cols = _PPL_COLUMNS
    in_dom = in_domain_rows(df)
    seq = pl.concat(
        [df.filter((pl.col("model_kind") == "seq") & (pl.col("domain_kind") == "ood")).select(cols),
         in_dom.filter(pl.col("model_kind") == "seq").select(cols)],
        how="vertical",
    )
    return _mean_over_replicates(seq, ["mixture", "domain", "domain_kind"], "seq").rename(
        {"ppl": "seq_ppl"}
    )


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


def worst_if_not_finite(ppl: np.ndarray) -> np.ndarray:
    """Perplexities with NaN and infinity as +inf: a model that diverged ranks last."""
    return np.where(np.isfinite(ppl), ppl, np.inf)


def pairwise_accuracy(proxy: Sequence[float], truth: Sequence[float]) -> tuple[float, int]:
    """Share of mixture pairs that ``proxy`` orders the way ``truth`` does, and the pair count.

    This is the decision a data ablation makes ("is mixture a better than b?").
    A pair whose true (seq) perplexities are equal has no right answer and is
    left out of the count.  A pair the proxy ties (but the truth does not)
    counts 0.5: the proxy cannot decide it, and a coin toss is right half the
    time.  Equality is exact; a proxy value that is not finite ranks last.
    Fewer than two values, or no countable pair, give ``(nan, 0)``.
    """
    x = worst_if_not_finite(np.asarray(proxy, dtype=float))
    y = np.asarray(truth, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"proxy has {x.size} values but truth has {y.size}")
    if x.size < MIN_RANK_MIXTURES:
        return float("nan"), 0
    i, j = np.triu_indices(x.size, k=1)
    dy = np.sign(y[i] - y[j])
    with np.errstate(invalid="ignore"):  # inf - inf: two failed proxies, which tie
        dx = np.where(x[i] == x[j], 0.0, np.sign(x[i] - x[j]))
    keep = dy != 0
    if not keep.any():
        return float("nan"), 0
    score = np.where(dx[keep] == 0, 0.5, (dx[keep] == dy[keep]).astype(float))
    return float(score.mean()), int(keep.sum())


def pick_ranks(proxy: Sequence[float], truth: Sequence[float]) -> np.ndarray:
    """The true rank of every mixture the proxy ranks first (several when the proxy ties).

    A mixture's true rank is 1 + the number of mixtures with strictly lower seq
    perplexity, so 1 means a truly best mixture (paper, appendix A.5).
    """
    x = worst_if_not_finite(np.asarray(proxy, dtype=float))
    y = np.asarray(truth, dtype=float)
    if x.shape != y.shape or not x.size:
        raise ValueError("pick_ranks needs one proxy and one true value per mixture, at least one")
    return np.array([1 + int(np.sum(y < y[k])) for k in np.flatnonzero(x == x.min())])


def proxy_pick(mixtures: Sequence[str], proxy: Sequence[float],
               truth: Sequence[float]) -> tuple[str, str, float]:
    """The proxy's best mixture, the true best, and the true rank of the proxy's pick.

    Lower perplexity is better.  The proxy's pick is the mixture with the lowest
    proxy perplexity; the true best has the lowest seq perplexity (for display,
    ties in either go to the mixture id that sorts first).  The true rank of the
    pick (see :func:`pick_ranks`) is the mean over the mixtures tied at the
    proxy's minimum: a proxy that cannot choose between them gets their average,
    whatever they are called.
    """
    names = list(mixtures)
    x = np.asarray(proxy, dtype=float)
    y = np.asarray(truth, dtype=float)
    if not (len(names) == x.size == y.size) or not names:
        raise ValueError("proxy_pick needs one proxy and one true value per mixture, at least one")
    x, y = worst_if_not_finite(x), worst_if_not_finite(y)  # NaN would make min() order-dependent
    pick = min(range(len(names)), key=lambda k: (x[k], names[k]))
    best = min(range(len(names)), key=lambda k: (y[k], names[k]))
    return names[pick], names[best], float(pick_ranks(x, y).mean())


def _rank_stats(names: list[str], x: np.ndarray, y: np.ndarray, label: str) -> dict:
    nan = float("nan")
    out = {"n_pairs": 0, "pairwise_acc": nan, "proxy_best": "", "true_best": "",
           "top1": nan, "true_rank": nan, "median_true_rank": nan}
    if len(names) < MIN_RANK_MIXTURES:
        log.warning("%s: only %d mixture(s) (< %d); no pairwise accuracy or ranks",
                    label, len(names), MIN_RANK_MIXTURES)
        return out
    acc, n_pairs = pairwise_accuracy(x, y)
    pick, best, _ = proxy_pick(names, x, y)
    ranks = pick_ranks(x, y)  # several when the proxy ties at the top: averaged
    out.update(n_pairs=n_pairs, pairwise_acc=acc, proxy_best=pick, true_best=best,
               top1=float(np.mean(ranks == 1)), true_rank=float(ranks.mean()), median_true_rank=float(ranks.mean()))
    return out


def _finite(values: Iterable[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _summary_row(domain: str, proxy: str, sel: list[dict]) -> dict:
    """Statistics of ``sel`` (one proxy's rows over several domains) averaged over domains.

    Means of Pearson r, Spearman rho, pairwise accuracy and top-1 (so top-1
    becomes the share of domains whose proxy pick is the true best) and of the
    true rank; ``median_true_rank`` is the median true rank over the domains.
    Each uses the domains where it is finite; n_mixtures and n_pairs are the
    smallest over the domains with a finite Pearson r (resp. pairwise accuracy).
    """
    def mean(key: str) -> float:
        vals = _finite(r[key] for r in sel)
        return float(np.mean(vals)) if vals else float("nan")

    ranks = _finite(r["true_rank"] for r in sel)
    ns = [r["n_mixtures"] for r in sel if math.isfinite(r["pearson_r"])]
    pairs = [r["n_pairs"] for r in sel if math.isfinite(r["pairwise_acc"])]
    return {
        "domain": domain, "domain_kind": OOD_MEAN_KIND, "proxy": proxy,
        "n_mixtures": min(ns) if ns else 0,
        "pearson_r": mean("pearson_r"), "pearson_p": float("nan"),
        "spearman_rho": mean("spearman_rho"), "spearman_p": float("nan"),
        "n_pairs": min(pairs) if pairs else 0,
        "pairwise_acc": mean("pairwise_acc"),
        "proxy_best": "", "true_best": "",
        "top1": mean("top1"), "true_rank": mean("true_rank"),
        "median_true_rank": float(np.median(ranks)) if ranks else float("nan"),
    }


def correlations(scores: pl.DataFrame) -> pl.DataFrame:
    """Every statistic of how well each proxy tracks the seq models, per domain and proxy.

    For each (domain, proxy), over the mixtures with a finite ``seq_ppl`` (a
    mixture whose seq model has no finite perplexity has no truth to compare with):

    - ``pearson_r``/``spearman_rho`` (with p-values) between raw seq and proxy
      perplexities, as in the paper, over the ``n_mixtures`` whose proxy perplexity
      is finite too; NaN below 3 mixtures or for a constant input;
    - ``pairwise_acc`` over ``n_pairs`` mixture pairs (see :func:`pairwise_accuracy`:
      pairs tied in seq ppl are left out, proxy-only ties count 0.5);
    - ``proxy_best`` (lowest proxy ppl), ``true_best`` (lowest seq ppl),
      ``top1`` (1.0 when the proxy's pick is a truly best mixture, else 0.0; when
      the proxy ties several mixtures at its minimum, the share of them that are)
      and ``true_rank``/``median_true_rank`` (the pick's rank by seq ppl, 1 = best,
      averaged over such a tie; see :func:`proxy_pick`); NaN (empty ids) below 2
      mixtures.  These decision statistics keep a mixture whose proxy perplexity
      is not finite (a merged model that diverged) and rank it last: that is the
      proxy's decision.

    Adds one ``ood-mean`` row per proxy (domain_kind ``"mean"``) averaging
    these over the OOD domains (see :func:`_summary_row`; ``median_true_rank``
    is there the median over OOD domains, the paper's A.5 summary); its p-values
    are NaN and its mixture ids empty.  The ``in-domain`` set has its own rows.
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
        has_truth = np.isfinite(y)
        x, y = worst_if_not_finite(x[has_truth]), y[has_truth]
        names = [m for m, keep in zip(r["mixture"], has_truth) if keep]
        label = f"domain {r['domain']} proxy {r['proxy']}"
        if not has_truth.all():
            log.warning("%s: left out, seq perplexity not finite (a seq model that diverged): %s", label,
                        ", ".join(m for m, keep in zip(r["mixture"], has_truth) if not keep))
        finite = np.isfinite(x)
        if not finite.all():
            log.warning("%s: %d mixture(s) with a non-finite proxy perplexity, ranked last and left out of r",
                        label, int((~finite).sum()))
        pr, pp, sr, sp = _corr(x[finite], y[finite], label)
        rows.append({
            "domain": r["domain"], "domain_kind": r["domain_kind"], "proxy": r["proxy"],
            "n_mixtures": int(finite.sum()), "pearson_r": pr, "pearson_p": pp,
            "spearman_rho": sr, "spearman_p": sp, **_rank_stats(names, x, y, label),
        })
    ood_rows = [r for r in rows if r["domain_kind"] == "ood"]
    for proxy in sorted({r["proxy"] for r in ood_rows}):
        sel = [r for r in ood_rows if r["proxy"] == proxy]
        finite = _finite(r["pearson_r"] for r in sel)
        if len(finite) < len(sel):
            log.warning("proxy %s: OOD mean uses %d of %d OOD domains (others NaN)",
                        proxy, len(finite), len(sel))
        rows.append(_summary_row(OOD_MEAN, proxy, sel))
    rows.sort(key=lambda r: (domain_sort_key(r["domain"]), proxy_sort_key(r["proxy"])))
    return pl.DataFrame(rows, schema=_CORR_SCHEMA)


# --------------------------------------------------------------------------
# tables


@dataclass(frozen=True)
class PaperTable:
    """A paper-shaped table: a one-line caption, labelled rows, named numeric columns.

    Rendered as markdown (:func:`table_markdown`), booktabs LaTeX
    (:func:`table_latex`) and a wide CSV (:func:`table_frame`) from the same
    cells, so the three never disagree.  ``formats`` per column: ``"f3"``
    (three decimals) or ``"rank"`` (integers plain, else one decimal).
    ``bold="row"`` bolds the highest shown value of each row; ``"column"``
    bolds each column's best, the highest or lowest as ``better`` says.  Ties
    at the shown precision are all bold; NaN shows as ``n/a`` (``--`` in LaTeX).
    """

    caption: str
    index: str
    index_label: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    labels: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    formats: tuple[str, ...]
    bold: str = "row"
    better: tuple[str, ...] = ()
    rule_before: frozenset[str] = frozenset()


def _fmt(v: float, fmt: str = "f3") -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if fmt == "rank":
        return f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}"
    return f"{v:.3f}"


def _best_mask(shown: list[str], better: str = "max") -> list[bool]:
    vals = [float(t) if t != "n/a" else None for t in shown]
    finite = [v for v in vals if v is not None]
    if not finite:
        return [False] * len(shown)
    best = max(finite) if better == "max" else min(finite)
    return [v is not None and v == best for v in vals]


def _shown_cells(t: PaperTable) -> list[list[tuple[str, bool, float]]]:
    """(text, bold, value) of every cell, after the table's bold rule."""
    shown = [[_fmt(v, f) for v, f in zip(row, t.formats)] for row in t.values]
    bold = [[False] * len(t.columns) for _ in t.rows]
    if t.bold == "row":
        for i, row in enumerate(shown):
            bold[i] = _best_mask(row)
    elif t.bold == "column":
        for j in range(len(t.columns)):
            mask = _best_mask([row[j] for row in shown], t.better[j] if t.better else "max")
            for i, b in enumerate(mask):
                bold[i][j] = b
    return [[(shown[i][j], bold[i][j], t.values[i][j]) for j in range(len(t.columns))]
            for i in range(len(t.rows))]


def table_markdown(t: PaperTable) -> str:
    """The caption line, a blank line, then a GitHub markdown table."""
    lines = [t.caption, ""]
    lines.append(f"| {t.index} | " + " | ".join(t.labels) + " |")
    lines.append("|:--|" + "|".join("--:" for _ in t.columns) + "|")
    for label, cells in zip(t.rows, _shown_cells(t)):
        text = [f"**{s}**" if b else s for s, b, _ in cells]
        lines.append(f"| {label} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
    "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def _tex(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in s)


def table_latex(t: PaperTable) -> str:
    """A booktabs LaTeX tabular (needs ``\\usepackage{booktabs}``), caption as a comment."""
    lines = [
        f"% {t.caption}",
        r"\begin{tabular}{l" + "r" * len(t.columns) + "}",
        r"\toprule",
        f"{t.index_label} & " + " & ".join(_tex(c) for c in t.labels) + r" \\",
        r"\midrule",
    ]
    for label, cells in zip(t.rows, _shown_cells(t)):
        if label in t.rule_before:
            lines.append(r"\midrule")
        text = [(rf"\textbf{{{s}}}" if b else s) if s != "n/a" else "--" for s, b, _ in cells]
        lines.append(_tex(label) + " & " + " & ".join(text) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def table_frame(t: PaperTable) -> pl.DataFrame:
    """The table as a wide frame: the index column, then one float column per column."""
    data: dict[str, list] = {t.index: list(t.rows)}
    for j, c in enumerate(t.columns):
        data[c] = [float(row[j]) for row in t.values]
    return pl.DataFrame(data, schema={t.index: pl.Utf8, **{c: pl.Float64 for c in t.columns}})


def _cells(corr: pl.DataFrame, stat: str) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    _check_columns(corr.columns, ("domain", "proxy", stat), "correlations table")
    domains = sorted(set(corr["domain"].to_list()), key=domain_sort_key)
    proxies = sorted(set(corr["proxy"].to_list()), key=proxy_sort_key)
    cell = {
        (d, p): (float("nan") if v is None else float(v))
        for d, p, v in corr.select("domain", "proxy", stat).iter_rows()
    }
    return domains, proxies, cell


def _n_text(corr: pl.DataFrame) -> str:
    sel = corr.filter(pl.col("domain") != OOD_MEAN) if "n_mixtures" in corr.columns else None
    if sel is None or sel.height == 0:
        return "n = ? mixtures"
    lo, hi = int(sel["n_mixtures"].min()), int(sel["n_mixtures"].max())
    return f"n = {hi} mixtures" if lo == hi else f"n = {lo}-{hi} mixtures (varies by cell)"


def _domain_by_proxy(corr: pl.DataFrame, stat: str, caption_text: str) -> PaperTable:
    domains, proxies, cell = _cells(corr, stat)
    return PaperTable(
        caption=caption_text, index="domain", index_label="Domain",
        rows=tuple(domain_label(d) for d in domains), columns=tuple(proxies), labels=tuple(proxies),
        values=tuple(tuple(cell.get((d, p), float("nan")) for p in proxies) for d in domains),
        formats=("f3",) * len(proxies), bold="row", rule_before=frozenset({domain_label(OOD_MEAN)}),
    )


def caption(corr: pl.DataFrame) -> str:
    """Table 2's caption line."""
    return (
        f"Table 2: Pearson r across mixtures ({_n_text(corr)}) between the seq model's "
        "perplexity and each proxy's perplexity, per evaluation domain; "
        "best (highest) r per row in bold."
    )


def table2(corr: pl.DataFrame) -> PaperTable:
    """The paper's Table 2: Pearson r, evaluation domains x proxies.

    Rows: OOD domains (sorted), ``in-domain``, ``OOD mean``; columns: merge
    methods present, then ``mean_ind``, ``ind_id``; the row maximum in bold.
    """
    return _domain_by_proxy(corr, "pearson_r", caption(corr))


def table4(corr: pl.DataFrame) -> PaperTable:
    """Table 4 as built here: pairwise decision accuracy, evaluation domains x proxies.

    Same layout as Table 2, with the share of mixture pairs each proxy orders
    as the seq models do (:func:`pairwise_accuracy`); the caption says this
    statistic was chosen here (the paper's own Table 4 was not at hand).
    """
    pairs = corr.filter(pl.col("domain") != OOD_MEAN)["n_pairs"] if "n_pairs" in corr.columns else None
    n = "n = ? pairs" if pairs is None or pairs.len() == 0 else (
        f"n = {pairs.max()} pairs" if pairs.min() == pairs.max() else f"n = {pairs.min()}-{pairs.max()} pairs")
    text = (
        "Table 4 (Table 2's layout, statistic chosen here): pairwise decision accuracy, the share of "
        f"mixture pairs ({n}) that the proxy orders as the seq models do, per evaluation domain "
        "(pairs tied in seq ppl left out, proxy ties count 0.5, chance is 0.5); "
        "best (highest) per row in bold."
    )
    return _domain_by_proxy(corr, "pairwise_acc", text)


#: Table 3's columns: (csv name, header, domain row read, statistic, format, better)
TABLE3_COLUMNS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("ood_pearson_r", "OOD r", OOD_MEAN, "pearson_r", "f3", "max"),
    ("ood_spearman_rho", "OOD rho", OOD_MEAN, "spearman_rho", "f3", "max"),
    ("ood_pairwise_acc", "OOD pair acc.", OOD_MEAN, "pairwise_acc", "f3", "max"),
    ("ood_top1", "OOD top-1", OOD_MEAN, "top1", "f3", "max"),
    ("ood_median_true_rank", "OOD median rank", OOD_MEAN, "median_true_rank", "rank", "min"),
    ("id_pearson_r", "ID r", IN_DOMAIN, "pearson_r", "f3", "max"),
    ("id_pairwise_acc", "ID pair acc.", IN_DOMAIN, "pairwise_acc", "f3", "max"),
    ("id_true_rank", "ID rank", IN_DOMAIN, "true_rank", "rank", "min"),
)


def table3(corr: pl.DataFrame) -> PaperTable:
    """Table 3 (paper sections 5.2-5.3 style): one summary row per proxy.

    Over the OOD domains: mean Pearson r, mean Spearman rho, mean pairwise
    accuracy, top-1 (the share of OOD domains where the proxy's lowest-ppl
    mixture is the seq models' best) and the median true rank of that pick;
    then Pearson r, pairwise accuracy and the pick's true rank on the
    in-domain set.  The best value of each column in bold.
    """
    _check_columns(corr.columns, ("domain", "proxy", *{c[3] for c in TABLE3_COLUMNS}), "correlations table")
    proxies = sorted(set(corr["proxy"].to_list()), key=proxy_sort_key)
    look = {(r["domain"], r["proxy"]): r for r in corr.iter_rows(named=True)}

    def value(domain: str, proxy: str, stat: str) -> float:
        v = look.get((domain, proxy), {}).get(stat)
        return float("nan") if v is None else float(v)

    n_ood = corr.filter(pl.col("domain_kind") == "ood")["domain"].n_unique() if "domain_kind" in corr.columns else 0
    text = (
        f"Table 3: how well each proxy ranks mixtures ({_n_text(corr)}): over the {n_ood} OOD domain(s), "
        "mean Pearson r, Spearman rho and pairwise decision accuracy, top-1 (share of OOD domains where the "
        "proxy's lowest-ppl mixture has the lowest seq ppl) and the median true rank of that mixture "
        "(1 = best); then r, pairwise accuracy and true rank in domain; best per column in bold."
    )
    return PaperTable(
        caption=text, index="proxy", index_label="Proxy", rows=tuple(proxies),
        columns=tuple(c[0] for c in TABLE3_COLUMNS), labels=tuple(c[1] for c in TABLE3_COLUMNS),
        values=tuple(tuple(value(c[2], p, c[3]) for c in TABLE3_COLUMNS) for p in proxies),
        formats=tuple(c[4] for c in TABLE3_COLUMNS), bold="column",
        better=tuple(c[5] for c in TABLE3_COLUMNS),
    )


#: the paper-shaped tables written under results/tables/, by file stem
TABLES = {"table2": table2, "table3": table3, "table4": table4}


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
    }
    for stem, build in TABLES.items():
        table = build(corr)
        outputs[tables / f"{stem}.md"] = table_markdown(table)
        outputs[tables / f"{stem}.csv"] = csv_text(table_frame(table))
        outputs[tables / f"{stem}.tex"] = table_latex(table)
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
        description="Score proxy perplexities against seq-model perplexities (Tables 2-4).",
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

    def work() -> None:
        df = load_perplexity(args.perplexity)
        if df.filter(pl.col("model_kind") == "seq").height == 0:
            raise ValueError(f"{args.perplexity} has no seq rows (model_kind == 'seq')")
        scores = proxy_table(df, proxies=_split_list(args.proxies))
        corr = correlations(scores)
        write_outputs(scores, corr, args.out_dir)

    return io.run_command(work, (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
