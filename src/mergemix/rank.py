"""Which mixture to train on: every candidate mixture ordered by its proxy perplexity.

This is the answer a study exists for. The proxy (by default the micro-merged
model, the paper's best) is scored for every candidate mixture, seq model or
not, so a study with ``mixtures.seq: false`` -- proxies only, the cheap
ablation the method promises -- still ends in a ranking.

A mixture's score is the geometric mean of its proxy perplexity over the
out-of-domain sets, exp(mean of log ppl): the perplexity of the mean
per-token loss if every set weighed the same. Lower is better; ties go to the
mixture id that sorts first. Where a mixture also has a seq model its seq
score is shown beside, as a check.

Command line::

    python -m mergemix.rank --perplexity results/perplexity.csv --proxy micro \\
        --out-csv results/ranking.csv --out-md results/tables/ranking.md

``ranking.csv`` has one row per mixture: rank, mixture, proxy, ood_score,
the proxy's perplexity on each OOD set and on the mixture's held-out text
(``ppl_<domain>``, ``ppl_in-domain``), seq_ood_score (empty without a seq model). ``ranking.md`` shows the first ``--top`` rows.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

import polars as pl

from mergemix import analyze
from mergemix.io import run_command

log = logging.getLogger("mergemix.rank")

PROXIES = (*analyze.MERGE_METHODS, analyze.MEAN_IND, analyze.IND_ID)


class RankError(ValueError):
    """A ranking that cannot be formed; the message names the proxy or file."""


def geometric_mean(values: Sequence[float]) -> float:
    """exp(mean(log v)): the perplexity of the mean loss over equally weighted sets."""
    return math.exp(math.fsum(math.log(v) for v in values) / len(values))


def ood_scores(long: pl.DataFrame, value: str, ood: Sequence[str]) -> dict[str, float]:
    """Each mixture's geometric mean of ``value`` over the OOD domains ``ood``.

    A mixture lacking one of the domains gets no score (warned). One whose value is not a
    positive finite number on some domain (a diverged or broken model: NaN, inf, 0)
    scores inf, so it ranks last instead of scrambling the order (warned).
    """
    by_mixture: dict[str, dict[str, float]] = {}
    for mixture, domain, v in long.select("mixture", "domain", value).iter_rows():
        by_mixture.setdefault(mixture, {})[domain] = v
    scores = {}
    for mixture, values in sorted(by_mixture.items()):
        missing = [d for d in ood if d not in values]
        if missing:
            log.warning("mixture %s lacks %s on %s; not ranked", mixture, value, ", ".join(missing))
            continue
        broken = [d for d in ood if not (values[d] is not None and 0 < values[d] < math.inf)]
        if broken:
            log.warning("mixture %s has %s %s on %s; ranked last", mixture, value,
                        values[broken[0]], ", ".join(broken))
            scores[mixture] = math.inf
            continue
        scores[mixture] = geometric_mean([values[d] for d in ood])
    return scores


def ranking(df: pl.DataFrame, proxy: str = "micro") -> pl.DataFrame:
    """Every mixture that has ``proxy`` on every OOD domain, best (lowest) score first."""
    if proxy not in PROXIES:
        raise RankError(f"unknown proxy {proxy!r}; choose one of {', '.join(PROXIES)}")
    df = analyze._normalise(df, "perplexity table")
    ood = sorted(df.filter(pl.col("domain_kind") == "ood")["domain"].unique().to_list())
    if not ood:
        raise RankError("the perplexity table has no out-of-domain rows (domain_kind == 'ood') to rank on")
    values = analyze.proxy_values(df, proxies=[proxy])
    if values.height == 0:
        have = sorted(set(df.filter(pl.col("model_kind") == "merged")["method"].to_list()))
        raise RankError(
            f"no mixture has proxy {proxy!r} (merged methods scored: {', '.join(have) or 'none'}); "
            f"set analysis.rank_by to one of those, mean_ind or ind_id"
        )
    score = ood_scores(values, "proxy_ppl", ood)
    truth: dict[str, float] = {}
    if df.filter(pl.col("model_kind") == "seq").height:
        truth = ood_scores(analyze.seq_values(df), "seq_ppl", ood)
    wide = {(m, d): v for m, d, v in values.select("mixture", "domain", "proxy_ppl").iter_rows()}
    domains = [*ood, analyze.IN_DOMAIN]
    rows = []
    for i, mixture in enumerate(sorted(score, key=lambda m: (score[m], m)), start=1):
        row = {"rank": i, "mixture": mixture, "proxy": proxy, "ood_score": score[mixture]}
        row.update({f"ppl_{d}": wide.get((mixture, d)) for d in domains})
        row["seq_ood_score"] = truth.get(mixture)
        rows.append(row)
    schema = {"rank": pl.Int64, "mixture": pl.Utf8, "proxy": pl.Utf8, "ood_score": pl.Float64,
              **{f"ppl_{d}": pl.Float64 for d in domains}, "seq_ood_score": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


def _cell(v: float | None) -> str:
    return "" if v is None or not math.isfinite(v) else f"{v:.2f}"


def markdown(table: pl.DataFrame, top: int) -> str:
    """The first ``top`` rows as a markdown table, with a sentence on what it shows."""
    if table.height == 0:
        return "No mixture could be ranked.\n"
    proxy = table["proxy"][0]
    domains = [c.removeprefix("ppl_") for c in table.columns if c.startswith("ppl_")]
    seq = table["seq_ood_score"].null_count() < table.height
    shown = table.head(top)
    lines = [
        f"Candidate mixtures ranked by {proxy} perplexity: the geometric mean over "
        f"{len(domains) - 1} out-of-domain set(s) (lower is better); "
        f"{'the first ' + str(shown.height) + ' of ' if shown.height < table.height else 'all '}"
        f"{table.height} mixtures (results/ranking.csv has all). {analyze.IN_DOMAIN}: the perplexity on the "
        "mixture's own held-out text, which differs from row to row (not part of the score)."
        + (" seq: the same score of the model trained on the mixture, where one was." if seq else ""),
        "",
    ]
    head = ["rank", "mixture", "OOD score", *domains, *(["seq"] if seq else [])]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["--:", ":--", *["--:"] * (len(head) - 2)]) + "|")
    for r in shown.iter_rows(named=True):
        cells = [str(r["rank"]), r["mixture"], _cell(r["ood_score"]), *(_cell(r[f"ppl_{d}"]) for d in domains)]
        if seq:
            cells.append(_cell(r["seq_ood_score"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mergemix.rank", description=__doc__.split("\n\n")[0])
    ap.add_argument("--perplexity", required=True, help="results/perplexity.csv")
    ap.add_argument("--proxy", default="micro", help=f"proxy to rank by: {', '.join(PROXIES)}")
    ap.add_argument("--out-csv", required=True, help="every ranked mixture")
    ap.add_argument("--out-md", required=True, help="the first --top of them as a markdown table")
    ap.add_argument("--top", type=int, default=25, help="rows in the markdown table (default 25)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def work() -> None:
        table = ranking(analyze.load_perplexity(args.perplexity), args.proxy)
        analyze.write_if_changed(args.out_csv, table.write_csv())
        analyze.write_if_changed(args.out_md, markdown(table, args.top))
        if table.height:
            best = table.row(0, named=True)
            log.info("ranked %d mixtures by %s; best: %s (OOD score %.3f)",
                     table.height, args.proxy, best["mixture"], best["ood_score"])

    return run_command(work, (ValueError,))


if __name__ == "__main__":
    sys.exit(main())
