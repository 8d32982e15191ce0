"""Tests for mergemix.analyze and mergemix.plots on small hand-made inputs.

Every expected number below is computed by hand from the literal nll_sum /
n_tokens values in the fixture, never by calling the code under test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import polars as pl
import pytest

from mergemix import analyze
from mergemix.analyze import (
    correlations,
    in_domain_rows,
    load_perplexity,
    proxy_table,
)

e = math.exp
LN2 = math.log(2)

# held-out / OOD sizes (tokens); bytes are 4 per token
TOKENS = {"A": 10, "B": 20, "C": 40, "news": 50}

# model -> {domain: nll_sum}
#   partitions A, B (ind models) and C (a single unit, "C/0", no ind row);
#   A also has two unit models with decoy values that must never be used.
IND_A = {"A": 10, "B": 40, "C": 100, "news": 75}
IND_B = {"A": 20, "B": 30, "C": 100, "news": 100}
UNIT_C0 = {"A": 25, "B": 50, "C": 80, "news": 125}
DECOY = {"A": 1, "B": 1, "C": 1, "news": 1}
SEQ = {
    "A+B": {"A": 9, "B": 27, "news": 70},
    "A+C": {"A": 9, "C": 70, "news": 72},
    "B+C": {"B": 28, "C": 72, "news": 80},
}
MICRO = {
    "A+B": {"A": 9.5, "B": 28, "news": 72},
    "A+C": {"A": 9.5, "C": 75, "news": 74},
    "B+C": {"B": 29, "C": 76, "news": 82},
    "A+B+C": {"A": 9, "B": 9, "C": 9, "news": 9},  # no seq model: must not enter
}


def _rows(kind, model_id, mixture, method, nlls):
    out = []
    for dom, nll in nlls.items():
        tok = TOKENS[dom]
        out.append({
            "model_kind": kind, "model_id": model_id, "mixture": mixture, "method": method,
            "domain": dom, "domain_kind": "ood" if dom == "news" else "id",
            "n_docs": 2, "n_tokens": tok, "n_bytes": 4 * tok, "nll_sum": float(nll),
            "ppl": math.exp(nll / tok), "bpb": nll / LN2 / (4 * tok),
        })
    return out


def example_frame() -> pl.DataFrame:
    rows = []
    rows += _rows("seed", "seed", "seed", "", DECOY)
    rows += _rows("ind", "ind-A", "A", "", IND_A)
    rows += _rows("ind", "ind-B", "B", "", IND_B)
    rows += _rows("unit", "A/0", "A", "", DECOY)
    rows += _rows("unit", "A/1", "A", "", DECOY)
    rows += _rows("unit", "C/0", "C", "", UNIT_C0)
    for m, nlls in SEQ.items():
        rows += _rows("seq", f"seq-{m}", m, "", nlls)
    for m, nlls in MICRO.items():
        rows += _rows("merged", f"micro-{m}", m, "micro", nlls)
    return pl.DataFrame(rows)


def write_example(path) -> None:
    example_frame().write_csv(path)


# ---------------------------------------------------------------- in-domain


def test_in_domain_aggregation_by_hand():
    rows = in_domain_rows(example_frame())
    seq_ab = rows.filter((pl.col("model_kind") == "seq") & (pl.col("mixture") == "A+B"))
    assert seq_ab.height == 1
    r = seq_ab.row(0, named=True)
    # (9 + 27) nats over (10 + 20) tokens and 4 * 30 bytes
    assert r["domain"] == "in-domain" and r["domain_kind"] == "id"
    assert r["n_tokens"] == 30 and r["n_bytes"] == 120 and r["n_docs"] == 4
    assert r["nll_sum"] == pytest.approx(36.0)
    assert r["ppl"] == pytest.approx(e(36 / 30))
    assert r["bpb"] == pytest.approx(36 / LN2 / 120)
    # the ppl is NOT the mean of the per-partition ppls
    assert r["ppl"] != pytest.approx((e(9 / 10) + e(27 / 20)) / 2)

    # ind model of A evaluated on the union of A+C's held-out sets
    ind_a = rows.filter((pl.col("model_id") == "ind-A") & (pl.col("eval_mixture") == "A+C"))
    assert ind_a["ppl"].to_list() == [pytest.approx(e((10 + 100) / (10 + 40)))]
    # single-unit partition C: its unit model stands in as ind model
    unit_c = rows.filter((pl.col("model_id") == "C/0") & (pl.col("eval_mixture") == "B+C"))
    assert unit_c["ppl"].to_list() == [pytest.approx(e((50 + 80) / (20 + 40)))]
    assert unit_c["model_kind"].to_list() == ["ind"]
    # ind models get in-domain rows only for mixtures containing their partition
    ind = rows.filter(pl.col("model_kind") == "ind")
    assert sorted(zip(ind["model_id"], ind["eval_mixture"])) == sorted([
        ("C/0", "A+C"), ("C/0", "A+B+C"), ("C/0", "B+C"),
        ("ind-A", "A+B"), ("ind-A", "A+B+C"), ("ind-A", "A+C"),
        ("ind-B", "A+B"), ("ind-B", "A+B+C"), ("ind-B", "B+C"),
    ])
    # decoy units of A (which has an ind row) are never used
    assert rows.filter(pl.col("model_id").is_in(["A/0", "A/1"])).height == 0


def test_in_domain_skips_model_missing_a_partition():
    df = example_frame().filter(~((pl.col("model_id") == "seq-A+C") & (pl.col("domain") == "C")))
    rows = in_domain_rows(df)
    assert rows.filter(pl.col("model_id") == "seq-A+C").height == 0
    assert rows.filter(pl.col("model_id") == "seq-A+B").height == 1


# ---------------------------------------------------------------- proxies


def _score(scores, mixture, domain, proxy):
    sel = scores.filter(
        (pl.col("mixture") == mixture) & (pl.col("domain") == domain) & (pl.col("proxy") == proxy)
    )
    assert sel.height == 1, (mixture, domain, proxy, sel)
    return sel.row(0, named=True)


def test_proxy_table_by_hand():
    scores = proxy_table(example_frame())
    assert scores.columns == ["mixture", "domain", "domain_kind", "seq_ppl", "proxy", "proxy_ppl"]
    # 3 seq mixtures x (news, in-domain) x (micro, mean_ind, ind_id); A+B+C has no seq model
    assert scores.height == 18
    assert sorted(set(scores["mixture"])) == ["A+B", "A+C", "B+C"]
    assert sorted(set(scores["proxy"])) == ["ind_id", "mean_ind", "micro"]

    # ground truth
    assert _score(scores, "A+C", "news", "micro")["seq_ppl"] == pytest.approx(e(72 / 50))
    assert _score(scores, "B+C", "in-domain", "micro")["seq_ppl"] == pytest.approx(e((28 + 72) / 60))
    # merged proxy
    assert _score(scores, "A+C", "news", "micro")["proxy_ppl"] == pytest.approx(e(74 / 50))
    assert _score(scores, "A+C", "in-domain", "micro")["proxy_ppl"] == pytest.approx(e(84.5 / 50))

    # mean_ind on an OOD domain: mean of the partitions' ind ppl on it
    assert _score(scores, "A+B", "news", "mean_ind")["proxy_ppl"] == pytest.approx((e(75 / 50) + e(100 / 50)) / 2)
    assert _score(scores, "A+C", "news", "mean_ind")["proxy_ppl"] == pytest.approx((e(75 / 50) + e(125 / 50)) / 2)
    # mean_ind in-domain: each ind model on the mixture's union set
    assert _score(scores, "A+C", "in-domain", "mean_ind")["proxy_ppl"] == pytest.approx(
        (e(110 / 50) + e(105 / 50)) / 2
    )
    assert _score(scores, "B+C", "in-domain", "mean_ind")["proxy_ppl"] == pytest.approx(
        (e(130 / 60) + e(130 / 60)) / 2
    )
    # ind_id: each ind model on its own held-out set, same for every domain
    for d in ("news", "in-domain"):
        assert _score(scores, "A+B", d, "ind_id")["proxy_ppl"] == pytest.approx((e(1.0) + e(1.5)) / 2)
        assert _score(scores, "A+C", d, "ind_id")["proxy_ppl"] == pytest.approx((e(1.0) + e(2.0)) / 2)
        assert _score(scores, "B+C", d, "ind_id")["proxy_ppl"] == pytest.approx((e(1.5) + e(2.0)) / 2)
    assert set(scores.filter(pl.col("domain") == "news")["domain_kind"]) == {"ood"}
    assert set(scores.filter(pl.col("domain") == "in-domain")["domain_kind"]) == {"id"}


def test_single_unit_rule_needs_exactly_one_unit():
    # give C a second unit: the partition is no longer single-unit, so no ind model for C
    df = pl.concat([example_frame(), pl.DataFrame(_rows("unit", "C/1", "C", "", UNIT_C0))])
    scores = proxy_table(df)
    ind = scores.filter(pl.col("proxy").is_in(["mean_ind", "ind_id"]))
    assert sorted(set(ind["mixture"])) == ["A+B"]


def test_proxies_filter():
    scores = proxy_table(example_frame(), proxies=["ind_id"])
    assert set(scores["proxy"]) == {"ind_id"}
    assert scores.height == 6


def test_no_seq_rows_is_an_error():
    df = example_frame().filter(pl.col("model_kind") != "seq")
    with pytest.raises(ValueError, match="seq"):
        proxy_table(df)


# every merge method: the nll of its merged model on news, per mixture (hand-picked values)
OTHER_METHODS = {
    "macro": {"A+B": 71, "A+C": 73, "B+C": 81},
    "weighted": {"A+B": 70.5, "A+C": 76, "B+C": 79},
    "merged": {"A+B": 69, "A+C": 77, "B+C": 78},
}


def _with_other_methods() -> pl.DataFrame:
    rows = []
    for method, by_mixture in OTHER_METHODS.items():
        for m, nll in by_mixture.items():
            # held-out nlls 10 and 30 on each member, so the in-domain ppl is known too
            nlls = {"news": nll, **{p: (10 if p == "A" else 30) for p in m.split("+")}}
            rows += _rows("merged", f"{method}-{m}", m, method, nlls)
    return pl.concat([example_frame(), pl.DataFrame(rows)])


def test_every_merge_method_is_a_proxy():
    scores = proxy_table(_with_other_methods())
    assert sorted(set(scores["proxy"]), key=analyze.proxy_sort_key) == [
        "micro", "macro", "weighted", "merged", "mean_ind", "ind_id"]
    for method, by_mixture in OTHER_METHODS.items():
        for m, nll in by_mixture.items():
            assert _score(scores, m, "news", method)["proxy_ppl"] == pytest.approx(e(nll / 50))
    # in-domain of B+C: (30 + 30) nats over (20 + 40) tokens
    assert _score(scores, "B+C", "in-domain", "weighted")["proxy_ppl"] == pytest.approx(e(1.0))
    # A+C: (10 + 30) nats over (10 + 40) tokens
    assert _score(scores, "A+C", "in-domain", "merged")["proxy_ppl"] == pytest.approx(e(40 / 50))
    corr = correlations(scores)
    # merged nlls (69, 77, 78) vs seq nlls (70, 72, 80) on news: same order of A+B < A+C < B+C
    assert _corr(corr, "news", "merged")["pairwise_acc"] == 1.0
    assert _corr(corr, "news", "merged")["spearman_rho"] == pytest.approx(1.0)


def test_absent_proxies_are_skipped(caplog):
    scores = proxy_table(example_frame(), proxies=["weighted", "micro"])
    assert set(scores["proxy"]) == {"micro"}
    assert "weighted" in caplog.text
    corr = correlations(scores)
    assert set(corr["proxy"]) == {"micro"}
    for stem in ("table2", "table3", "table4"):
        md = analyze.table_markdown(analyze.TABLES[stem](corr))
        assert "weighted" not in md and "micro" in md


# ---------------------------------------------------------------- statistics


def _scores_frame(domain, seq, proxies, domain_kind="ood"):
    rows = []
    for name, vals in proxies.items():
        for i, (s, v) in enumerate(zip(seq, vals)):
            rows.append({"mixture": f"m{i}", "domain": domain, "domain_kind": domain_kind,
                         "seq_ppl": float(s), "proxy": name, "proxy_ppl": float(v)})
    return pl.DataFrame(rows)


def _corr(corr, domain, proxy):
    sel = corr.filter((pl.col("domain") == domain) & (pl.col("proxy") == proxy))
    assert sel.height == 1
    return sel.row(0, named=True)


def test_pearson_and_spearman():
    seq = [10.0, 12.0, 15.0, 20.0, 30.0]
    scores = _scores_frame("news", seq, {
        "micro": [2 * s + 1 for s in seq],          # exact linear -> r = 1
        "macro": [100 - s for s in seq],            # reversed -> r = -1
        "mean_ind": [s ** 3 for s in seq],          # monotone, non-linear -> rho = 1, r < 1
        "ind_id": [1.0, 3.0, 2.0, 4.0, 5.0],        # one swap -> rho = 1 - 6*2/(5*24) = 0.9
    })
    corr = correlations(scores)
    assert _corr(corr, "news", "micro")["pearson_r"] == pytest.approx(1.0)
    assert _corr(corr, "news", "micro")["n_mixtures"] == 5
    assert _corr(corr, "news", "macro")["pearson_r"] == pytest.approx(-1.0)
    assert _corr(corr, "news", "macro")["spearman_rho"] == pytest.approx(-1.0)
    cube = _corr(corr, "news", "mean_ind")
    assert cube["spearman_rho"] == pytest.approx(1.0)
    assert cube["pearson_r"] < 0.99
    assert _corr(corr, "news", "ind_id")["spearman_rho"] == pytest.approx(0.9)


def test_pearson_small_by_hand():
    # deviations (-1, 0, 1) and (-1, 1, 0): r = 1 / sqrt(2 * 2) = 0.5
    corr = correlations(_scores_frame("news", [1.0, 3.0, 2.0], {"micro": [1.0, 2.0, 3.0]}))
    assert _corr(corr, "news", "micro")["pearson_r"] == pytest.approx(0.5)


def test_too_few_mixtures_or_constant_gives_nan():
    scores = pl.concat([
        _scores_frame("news", [10.0, 12.0], {"micro": [1.0, 2.0]}),
        _scores_frame("web", [10.0, 12.0, 14.0], {"micro": [5.0, 5.0, 5.0]}),
    ])
    corr = correlations(scores)
    for d in ("news", "web"):
        r = _corr(corr, d, "micro")
        assert math.isnan(r["pearson_r"]) and math.isnan(r["spearman_rho"])
    assert _corr(corr, "news", "micro")["n_mixtures"] == 2
    assert math.isnan(_corr(corr, "ood-mean", "micro")["pearson_r"])


def test_ood_mean_row():
    scores = pl.concat([
        _scores_frame("news", [1.0, 2.0, 3.0], {"micro": [1.0, 2.0, 3.0]}),   # r = 1
        _scores_frame("web", [1.0, 3.0, 2.0], {"micro": [1.0, 2.0, 3.0]}),    # r = 0.5
        _scores_frame("in-domain", [1.0, 2.0, 3.0], {"micro": [3.0, 2.0, 1.0]}, "id"),  # r = -1, not OOD
    ])
    corr = correlations(scores)
    row = _corr(corr, "ood-mean", "micro")
    assert row["pearson_r"] == pytest.approx(0.75)
    assert corr["domain"].to_list() == ["news", "web", "in-domain", "ood-mean"]


# pairwise accuracy, top-1 and true rank


def test_perfectly_anti_ordered_proxy():
    seq = [10.0, 20.0, 30.0, 40.0, 50.0]
    corr = correlations(_scores_frame("news", seq, {"micro": [60 - s for s in seq]}))
    row = _corr(corr, "news", "micro")
    assert row["pearson_r"] == pytest.approx(-1.0)
    assert row["spearman_rho"] == pytest.approx(-1.0)
    assert row["pairwise_acc"] == 0.0 and row["n_pairs"] == 10
    # the proxy picks the truly worst mixture: m4, true rank 5 of 5
    assert (row["proxy_best"], row["true_best"]) == ("m4", "m0")
    assert row["top1"] == 0.0 and row["true_rank"] == 5.0 and row["median_true_rank"] == 5.0


def test_four_mixtures_by_hand():
    # seq ranks m0 < m1 < m2 < m3; the proxy swaps (m0, m1) and (m2, m3).
    # pairs: (0,1) wrong, (0,2) (0,3) (1,2) (1,3) right, (2,3) wrong -> 4 / 6.
    # Spearman: rank differences (1, -1, 1, -1) -> 1 - 6 * 4 / (4 * 15) = 0.6.
    # Pearson: deviations (-.5, -1.5, 1.5, .5) and (-15, -5, 5, 15): 30 / sqrt(5 * 500) = 0.6.
    # The proxy's pick is m1 (proxy 1.0), whose true rank is 2.
    corr = correlations(_scores_frame("news", [10.0, 20.0, 30.0, 40.0], {"micro": [2.0, 1.0, 4.0, 3.0]}))
    row = _corr(corr, "news", "micro")
    assert row["pairwise_acc"] == pytest.approx(4 / 6) and row["n_pairs"] == 6
    assert row["spearman_rho"] == pytest.approx(0.6)
    assert row["pearson_r"] == pytest.approx(0.6)
    assert (row["proxy_best"], row["true_best"]) == ("m1", "m0")
    assert row["top1"] == 0.0 and row["true_rank"] == 2.0


def test_pairwise_accuracy_ties():
    # (0,1): seq tie, left out; (0,2): right; (1,2): proxy tie, half a point -> 1.5 / 2
    assert analyze.pairwise_accuracy([5.0, 6.0, 6.0], [1.0, 1.0, 2.0]) == (0.75, 2)
    # every pair tied in the truth: nothing to decide
    acc, n = analyze.pairwise_accuracy([1.0, 2.0], [3.0, 3.0])
    assert math.isnan(acc) and n == 0
    # one mixture: no pair
    acc, n = analyze.pairwise_accuracy([1.0], [1.0])
    assert math.isnan(acc) and n == 0
    # two mixtures ordered alike: one right pair
    assert analyze.pairwise_accuracy([1.0, 2.0], [7.0, 9.0]) == (1.0, 1)
    with pytest.raises(ValueError, match="2 values but truth has 3"):
        analyze.pairwise_accuracy([1.0, 2.0], [1.0, 2.0, 3.0])


def test_proxy_pick_ties_and_true_rank():
    # the proxy ties b and c at its minimum: b (seq 2.0, beaten by a and d) has true rank 3,
    # c (seq 5.0, beaten by three) rank 4; the pick's true rank is their mean, and the id
    # shown is the one sorting first
    pick, best, rank = analyze.proxy_pick(["c", "b", "a", "d"], [0.5, 0.5, 9.0, 7.0], [5.0, 2.0, 1.0, 1.0])
    assert (pick, best, rank) == ("b", "a", 3.5)
    # a pick tied with the best in seq ppl shares rank 1
    assert analyze.proxy_pick(["x", "y"], [1.0, 2.0], [3.0, 3.0]) == ("x", "x", 1.0)
    # a NaN proxy (a diverged merge) is never the pick, whatever the order of the mixtures
    nan = float("nan")
    assert analyze.proxy_pick(["a", "b", "c"], [nan, 1.0, 2.0], [1.0, 2.0, 3.0]) == ("b", "a", 2.0)
    assert analyze.proxy_pick(["c", "b", "a"], [2.0, 1.0, nan], [3.0, 2.0, 1.0]) == ("b", "a", 2.0)


def test_a_proxy_tie_at_the_top_does_not_depend_on_mixture_names():
    # the proxy cannot choose between the true best (seq 10) and the worst (seq 30)
    seq, proxy = [30.0, 10.0, 20.0], [5.0, 5.0, 6.0]
    for names in (["a+b", "c+d", "e+f"], ["x+y", "c+d", "e+f"]):
        frame = _scores_frame("news", seq, {"micro": proxy}).with_columns(
            pl.col("mixture").replace(dict(zip(["m0", "m1", "m2"], names))))
        row = _corr(correlations(frame), "news", "micro")
        assert row["top1"] == 0.5 and row["true_rank"] == 2.0, names


def test_a_failed_proxy_ranks_last_in_the_decisions():
    # the micro merge of m0 diverged (inf); m0 is the true best. Pearson and Spearman
    # cannot use it; the decisions keep it, as the proxy's worst mixture.
    frame = _scores_frame("news", [10.0, 20.0, 30.0, 40.0], {"micro": [math.inf, 21.0, 31.0, 41.0]})
    row = _corr(correlations(frame), "news", "micro")
    assert row["n_mixtures"] == 3 and row["pearson_r"] == pytest.approx(1.0)
    # pairs: the three with m0 wrong, the other three right
    assert row["n_pairs"] == 6 and row["pairwise_acc"] == 0.5
    assert (row["proxy_best"], row["true_best"]) == ("m1", "m0")
    assert row["top1"] == 0.0 and row["true_rank"] == 2.0
    # NaN is a failure too, and two failures tie (half a point)
    frame = _scores_frame("news", [10.0, 20.0, 30.0], {"micro": [math.nan, math.inf, 5.0]})
    row = _corr(correlations(frame), "news", "micro")
    assert row["n_pairs"] == 3 and row["pairwise_acc"] == pytest.approx(0.5 / 3)
    assert row["proxy_best"] == "m2" and row["true_rank"] == 3.0


def test_rank_statistics_need_two_mixtures():
    corr = correlations(pl.concat([
        _scores_frame("one", [10.0], {"micro": [1.0]}),
        _scores_frame("two", [10.0, 12.0], {"micro": [2.0, 1.0]}),
    ]))
    one = _corr(corr, "one", "micro")
    assert one["n_pairs"] == 0 and math.isnan(one["pairwise_acc"]) and math.isnan(one["top1"])
    assert one["proxy_best"] in ("", None)
    two = _corr(corr, "two", "micro")
    assert math.isnan(two["pearson_r"])  # a correlation needs 3
    assert two["pairwise_acc"] == 0.0 and two["true_rank"] == 2.0 and two["top1"] == 0.0


def test_ood_mean_of_rank_statistics():
    seq = [1.0, 2.0, 3.0, 4.0, 5.0]
    scores = pl.concat([
        _scores_frame("a", seq, {"micro": [1.0, 2.0, 3.0, 4.0, 5.0]}),   # pick m0: rank 1, acc 1
        _scores_frame("b", seq, {"micro": [2.0, 1.0, 3.0, 4.0, 5.0]}),   # pick m1: rank 2, acc 9/10
        _scores_frame("c", seq, {"micro": [5.0, 4.0, 3.0, 2.0, 1.0]}),   # pick m4: rank 5, acc 0
        _scores_frame("in-domain", seq, {"micro": [5.0, 4.0, 3.0, 1.0, 2.0]}, "id"),  # not OOD
    ])
    corr = correlations(scores)
    row = _corr(corr, "ood-mean", "micro")
    assert row["domain_kind"] == "mean"
    assert row["top1"] == pytest.approx(1 / 3)
    assert row["true_rank"] == pytest.approx(8 / 3)
    assert row["median_true_rank"] == 2.0
    assert row["pairwise_acc"] == pytest.approx((1 + 0.9 + 0) / 3)
    assert row["n_pairs"] == 10 and row["n_mixtures"] == 5
    assert row["proxy_best"] in ("", None)
    assert _corr(corr, "in-domain", "micro")["true_rank"] == 4.0


# ---------------------------------------------------------------- tables


def _corr_table():
    rows = []
    for d, kind, vals in [
        ("web", "ood", {"micro": 0.5, "mean_ind": 0.9, "ind_id": 0.1}),
        ("news", "ood", {"micro": 0.8, "mean_ind": 0.7, "ind_id": -0.2}),
        ("in-domain", "id", {"micro": 0.95, "mean_ind": 0.6, "ind_id": 0.3}),
        ("ood-mean", "mean", {"micro": 0.65, "mean_ind": 0.8, "ind_id": -0.05}),
    ]:
        for p, r in vals.items():
            rows.append({"domain": d, "domain_kind": kind, "proxy": p, "n_mixtures": 7,
                         "pearson_r": r, "pearson_p": 0.01, "spearman_rho": r, "spearman_p": 0.01})
    return pl.DataFrame(rows)


def test_markdown_table_bolds_row_max():
    md = analyze.table_markdown(analyze.table2(_corr_table()))
    lines = md.strip().splitlines()
    assert "n = 7" in lines[0] and "Pearson r" in lines[0]
    table = [ln for ln in lines if ln.startswith("|")]
    assert table[0].replace(" ", "") == "|domain|micro|mean_ind|ind_id|"
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table[2:]}
    assert list(body) == ["news", "web", "in-domain", "OOD mean"]
    assert body["news"] == ["**0.800**", "0.700", "-0.200"]
    assert body["web"] == ["0.500", "**0.900**", "0.100"]
    assert body["in-domain"] == ["**0.950**", "0.600", "0.300"]
    assert body["OOD mean"] == ["0.650", "**0.800**", "-0.050"]


def test_latex_and_wide_tables():
    tex = analyze.table_latex(analyze.table2(_corr_table()))
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert r"web & 0.500 & \textbf{0.900} & 0.100 \\" in tex
    assert r"mean\_ind" in tex
    wide = analyze.table_frame(analyze.table2(_corr_table()))
    assert wide.columns == ["domain", "micro", "mean_ind", "ind_id"]
    assert wide["domain"].to_list() == ["news", "web", "in-domain", "OOD mean"]
    assert wide["mean_ind"].to_list() == pytest.approx([0.7, 0.9, 0.6, 0.8])


def _stats_table():
    """correlations.csv rows with every statistic set by hand (two OOD domains, in-domain, mean)."""
    cols = ("pearson_r", "spearman_rho", "pairwise_acc", "top1", "true_rank", "median_true_rank")
    vals = {
        ("news", "micro"): (0.9, 0.8, 0.75, 1.0, 1.0, 1.0),
        ("news", "ind_id"): (0.2, 0.1, 0.55, 0.0, 4.0, 4.0),
        ("web", "micro"): (0.7, 0.6, 0.65, 0.0, 3.0, 3.0),
        ("web", "ind_id"): (0.8, 0.9, 0.85, 1.0, 1.0, 1.0),
        ("in-domain", "micro"): (0.95, 0.9, 0.9, 1.0, 1.0, 1.0),
        ("in-domain", "ind_id"): (0.3, 0.2, 0.6, 0.0, 2.0, 2.0),
        ("ood-mean", "micro"): (0.8, 0.7, 0.7, 0.5, 2.0, 2.0),
        ("ood-mean", "ind_id"): (0.5, 0.5, 0.7, 0.5, 2.5, 2.5),
    }
    kinds = {"news": "ood", "web": "ood", "in-domain": "id", "ood-mean": "mean"}
    rows = []
    for (d, p), v in vals.items():
        rows.append({"domain": d, "domain_kind": kinds[d], "proxy": p, "n_mixtures": 6,
                     "pearson_p": 0.01, "spearman_p": 0.01, "n_pairs": 15,
                     "proxy_best": "", "true_best": "", **dict(zip(cols, v))})
    return pl.DataFrame(rows)


def _md_body(md):
    lines = md.strip().splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    header = [c.strip() for c in table[0].split("|")[1:-1]]
    body = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table[2:]}
    return lines[0], header, body


def test_table3_summary_per_proxy():
    t = analyze.table3(_stats_table())
    caption, header, body = _md_body(analyze.table_markdown(t))
    assert caption.startswith("Table 3:") and "2 OOD domain(s)" in caption and "n = 6 mixtures" in caption
    assert header == ["proxy", "OOD r", "OOD rho", "OOD pair acc.", "OOD top-1", "OOD median rank",
                      "ID r", "ID pair acc.", "ID rank"]
    assert list(body) == ["micro", "ind_id"]
    # OOD columns read the ood-mean row, ID columns the in-domain row; best per column bold
    # (higher is better except the ranks; the 0.700 and 0.500 ties are bold twice)
    assert body["micro"] == ["**0.800**", "**0.700**", "**0.700**", "**0.500**", "**2**",
                             "**0.950**", "**0.900**", "**1**"]
    assert body["ind_id"] == ["0.500", "0.500", "**0.700**", "**0.500**", "2.5", "0.300", "0.600", "2"]
    frame = analyze.table_frame(t)
    assert frame.columns[0] == "proxy" and frame["ood_median_true_rank"].to_list() == [2.0, 2.5]
    tex = analyze.table_latex(t)
    assert r"ind\_id & 0.500 & 0.500 & \textbf{0.700} & \textbf{0.500} & 2.5 & 0.300 & 0.600 & 2 \\" in tex


def test_table4_pairwise_accuracy_per_domain():
    t = analyze.table4(_stats_table())
    caption, header, body = _md_body(analyze.table_markdown(t))
    assert caption.startswith("Table 4") and "pairwise decision accuracy" in caption
    assert "chosen here" in caption and "n = 15 pairs" in caption
    assert header == ["domain", "micro", "ind_id"]
    assert body == {
        "news": ["**0.750**", "0.550"],
        "web": ["0.650", "**0.850**"],
        "in-domain": ["**0.900**", "0.600"],
        "OOD mean": ["**0.700**", "**0.700**"],
    }


def test_nan_cells_show_as_na():
    corr = _stats_table().with_columns(
        pl.when(pl.col("proxy") == "ind_id").then(float("nan")).otherwise(pl.col("pairwise_acc"))
        .alias("pairwise_acc"))
    _, _, body = _md_body(analyze.table_markdown(analyze.table4(corr)))
    assert body["news"] == ["**0.750**", "n/a"]
    assert r"news & \textbf{0.750} & -- \\" in analyze.table_latex(analyze.table4(corr))


# ---------------------------------------------------------------- loading / CLI


def test_missing_column_names_the_column(tmp_path):
    path = tmp_path / "perplexity.csv"
    example_frame().drop("nll_sum").write_csv(path)
    with pytest.raises(ValueError, match="nll_sum") as info:
        load_perplexity(path)
    assert "perplexity.csv" in str(info.value)
    assert analyze.main(["--perplexity", str(path), "--out-dir", str(tmp_path / "out")]) == 1


def test_load_keeps_names_as_strings(tmp_path):
    path = tmp_path / "perplexity.csv"
    example_frame().with_columns(pl.col("n_docs").cast(pl.Int64)).write_csv(path)
    df = load_perplexity(path)
    assert df.schema["method"] == pl.Utf8 and df.schema["n_tokens"] == pl.Int64
    assert set(df.filter(pl.col("model_kind") == "seq")["method"]) == {""}


def test_cli_no_seq_rows(tmp_path, capsys):
    path = tmp_path / "perplexity.csv"
    example_frame().filter(pl.col("model_kind") != "seq").write_csv(path)
    assert analyze.main(["--perplexity", str(path), "--out-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "seq" in err


def _age(paths, when=1_000_000_000):
    for p in paths:
        os.utime(p, (when, when))


def test_cli_outputs_and_idempotence(tmp_path):
    src = tmp_path / "perplexity.csv"
    write_example(src)
    out = tmp_path / "results"
    assert analyze.main(["--perplexity", str(src), "--out-dir", str(out), "-q"]) == 0
    files = [out / "proxy_scores.csv", out / "correlations.csv",
             *[out / "tables" / f"table{n}.{ext}" for n in (2, 3, 4) for ext in ("md", "csv", "tex")]]
    for f in files:
        assert f.stat().st_size > 0, f
    scores = pl.read_csv(out / "proxy_scores.csv")
    assert scores.height == 18
    corr = pl.read_csv(out / "correlations.csv")
    assert set(corr["domain"]) == {"news", "in-domain", "ood-mean"}
    # ind_id is the same for both domains; with 3 mixtures r is finite
    assert corr.filter(pl.col("proxy") == "micro")["n_mixtures"].to_list() == [3, 3, 3]
    _age(files)
    assert analyze.main(["--perplexity", str(src), "--out-dir", str(out), "-q"]) == 0
    assert [f.stat().st_mtime for f in files] == [1_000_000_000] * len(files)
    # a real change rewrites
    assert analyze.main(["--perplexity", str(src), "--out-dir", str(out), "-q",
                         "--proxies", "micro,mean_ind"]) == 0
    assert (out / "proxy_scores.csv").stat().st_mtime != 1_000_000_000
    assert "ind_id" not in (out / "tables" / "table2.md").read_text()


def test_write_if_changed(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    assert analyze.write_if_changed(p, "abc") is True
    assert analyze.write_if_changed(p, "abc") is False
    assert analyze.write_if_changed(p, b"abd") is True
    assert p.read_text() == "abd"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]  # no temp files left


# ---------------------------------------------------------------- plots


FIGURE_STEMS = ["figure3", "figure4_micro", "figure4_weighted", "figure4_mean_ind",
                "figure5", "figure6", "figure7", "figure8", "figure9"]


@pytest.mark.parametrize("damage", ["empty", "not a number", "extra field"])
def test_plots_name_a_damaged_table_and_draw_nothing(tmp_path, capsys, damage):
    from mergemix import plots

    src = tmp_path / "perplexity.csv"
    write_example(src)
    res = tmp_path / "results"
    assert analyze.main(["--perplexity", str(src), "--out-dir", str(res), "-q"]) == 0
    scores = res / "proxy_scores.csv"
    lines = scores.read_text().splitlines()
    if damage == "empty":
        scores.write_text("")
    elif damage == "not a number":
        header = lines[0].split(",")
        row = lines[1].split(",")
        row[header.index("seq_ppl")] = "abc"
        scores.write_text("\n".join([lines[0], ",".join(row), *lines[2:]]) + "\n")
    else:
        scores.write_text("\n".join([lines[0], lines[1] + ",extra", *lines[2:]]) + "\n")
    figs = tmp_path / "figures"
    argv = ["--scores", str(scores), "--correlations", str(res / "correlations.csv"), "--out-dir", str(figs), "-q"]
    assert plots.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(scores) in err[-1], err[-3:]
    assert not figs.exists() or not list(figs.iterdir())


def test_plots_write_png_pdf_and_are_stable(tmp_path):
    from mergemix import plots

    src = tmp_path / "perplexity.csv"
    write_example(src)
    res = tmp_path / "results"
    assert analyze.main(["--perplexity", str(src), "--out-dir", str(res), "-q"]) == 0
    figs = tmp_path / "figures"
    argv = ["--scores", str(res / "proxy_scores.csv"), "--correlations", str(res / "correlations.csv"),
            "--out-dir", str(figs), "-q", "--grid-proxies", "micro", "weighted,mean_ind"]
    assert plots.main(argv) == 0
    files = [figs / f"{stem}.{ext}" for stem in FIGURE_STEMS for ext in ("png", "pdf")]
    assert sorted(p.name for p in figs.iterdir()) == sorted(f.name for f in files)
    for f in files:
        assert f.stat().st_size > 1000, f
    assert (figs / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (figs / "figure3.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"CreationDate" not in (figs / "figure3.pdf").read_bytes()
    # weighted has no scores: its grid is a page saying so, not a failure
    assert (figs / "figure4_weighted.png").stat().st_size < (figs / "figure4_micro.png").stat().st_size
    _age(files)
    assert plots.main(argv) == 0
    assert [f.stat().st_mtime for f in files] == [1_000_000_000] * len(files)
    # another proxy changes figure3 but not the summaries
    assert plots.main(argv + ["--proxy", "mean_ind"]) == 0
    assert (figs / "figure3.png").stat().st_mtime != 1_000_000_000
    assert (figs / "figure5.png").stat().st_mtime == 1_000_000_000
    assert (figs / "figure4_micro.png").stat().st_mtime == 1_000_000_000


def test_rank_figure_marks_the_proxy_pick():
    from mergemix import plots

    # the four-mixture example: the proxy picks m1 (proxy rank 1), whose true rank is 2
    scores = _scores_frame("news", [10.0, 20.0, 30.0, 40.0], {"micro": [2.0, 1.0, 4.0, 3.0]})
    fig = plots.rank_grid(scores)
    (ax,) = fig.axes
    points, star = ax.collections
    assert star.get_offsets().tolist() == [[1.0, 2.0]]
    assert sorted(map(tuple, points.get_offsets().tolist())) == [(1, 2), (2, 1), (3, 4), (4, 3)]
    assert "true rank 2 of 4" in ax.get_title()


def test_summary_bars_heights():
    from mergemix import plots

    corr = _stats_table()
    # domains: news, web, in-domain, then the OOD group; bars of micro first, then ind_id
    (ax,) = plots.pick_rank_bars(corr).axes
    heights = [b.get_height() for b in ax.patches]
    assert heights == [1.0, 3.0, 1.0, 2.0, 4.0, 1.0, 2.0, 2.5]  # the OOD group holds the median
    assert [t.get_text() for t in ax.get_xticklabels()] == ["news", "web", "in-domain", "OOD median"]
    (ax,) = plots.accuracy_bars(corr).axes
    assert [b.get_height() for b in ax.patches] == [0.75, 0.65, 0.9, 0.7, 0.55, 0.85, 0.6, 0.7]
    (ax,) = plots.correlation_bars(corr, "spearman_rho").axes
    assert [b.get_height() for b in ax.patches][:4] == [0.8, 0.6, 0.9, 0.7]


def test_plots_default_proxy_and_unknown_proxy():
    from mergemix import plots

    scores = proxy_table(example_frame())
    assert plots.default_proxy(scores) == "micro"
    both = pl.concat([scores, scores.filter(pl.col("proxy") == "micro").with_columns(pl.lit("merged").alias("proxy"))])
    assert plots.default_proxy(both) == "merged"
    with pytest.raises(ValueError, match="weighted"):
        plots.figure3(scores, correlations(scores), proxy="weighted")


def test_analysis_modules_do_not_import_torch():
    code = ("import sys, mergemix.analyze, mergemix.plots; "
            "bad = [m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
