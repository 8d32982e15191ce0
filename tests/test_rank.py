"""mergemix.rank on a small hand-made perplexity table: every expected number is worked out
by hand from the literal nll_sum / n_tokens values below."""

from __future__ import annotations

import math
import subprocess
import sys

import polars as pl
import pytest

from mergemix import rank

e = math.exp
TOKENS = {"A": 10, "B": 20, "C": 40, "news": 50, "code": 25}
OOD = ("news", "code")

IND = {  # partition -> {domain: nll_sum}; ppl on news and code: e^1 (A), e^2 (B), e^3 (C)
    "A": {"A": 10, "B": 40, "C": 80, "news": 50, "code": 25},
    "B": {"A": 20, "B": 20, "C": 80, "news": 100, "code": 50},
    "C": {"A": 20, "B": 40, "C": 40, "news": 150, "code": 75},
}
MICRO = {
    # OOD score exp((news/50 + code/25) / 2): A+B e^1.5, A+C e^1.5 (a tie: A+B sorts first), B+C e^0.75
    "A+B": {"A": 10, "B": 30, "news": 50, "code": 50},
    "A+C": {"A": 10, "C": 40, "news": 100, "code": 25},
    "B+C": {"B": 20, "C": 40, "news": 25, "code": 25},
    "A+B+C": {"news": 1},  # lacks `code`: not ranked
}
SEQ = {"A+B": {"A": 10, "B": 20, "news": 40, "code": 30}}  # OOD score exp((0.8 + 1.2) / 2) = e^1


def _rows(kind, model_id, mixture, method, nlls):
    return [{
        "model_kind": kind, "model_id": model_id, "mixture": mixture, "method": method,
        "domain": d, "domain_kind": "ood" if d in OOD else "id", "n_docs": 1,
        "n_tokens": TOKENS[d], "n_bytes": 4 * TOKENS[d], "nll_sum": float(nll),
        "ppl": e(nll / TOKENS[d]), "bpb": nll / math.log(2) / (4 * TOKENS[d]),
    } for d, nll in nlls.items()]


def table(with_seq: bool = True) -> pl.DataFrame:
    rows = []
    for part, nlls in IND.items():
        rows += _rows("ind", f"ind-{part}", part, "", nlls)
    for mixture, nlls in MICRO.items():
        rows += _rows("merged", f"micro-{mixture}", mixture, "micro", nlls)
    if with_seq:
        for mixture, nlls in SEQ.items():
            rows += _rows("seq", f"seq-{mixture}", mixture, "", nlls)
    return pl.DataFrame(rows)


def test_micro_ranking_orders_by_the_geometric_mean_and_breaks_ties_by_id():
    out = rank.ranking(table(), "micro")
    assert out["mixture"].to_list() == ["B+C", "A+B", "A+C"]
    assert out["rank"].to_list() == [1, 2, 3]
    assert out["ood_score"].to_list() == pytest.approx([e(0.75), e(1.5), e(1.5)], rel=1e-12)
    first = out.row(0, named=True)
    assert first["ppl_news"] == pytest.approx(e(0.5)) and first["ppl_code"] == pytest.approx(e(1.0))
    # in-domain: the union of the mixture's held-out sets, exp((10 + 30) / (10 + 20)) for A+B
    assert out.row(1, named=True)["ppl_in-domain"] == pytest.approx(e(40 / 30))
    assert out["seq_ood_score"].to_list()[1] == pytest.approx(e(1.0))
    assert out["seq_ood_score"].to_list()[0] is None and out["seq_ood_score"].to_list()[2] is None


def test_mean_ind_ranks_mixtures_no_seq_model_was_trained_on():
    out = rank.ranking(table(with_seq=False), "mean_ind")
    # A+B+C's merged model lacks `code`, but its mean_ind needs only the three ind models
    assert out["mixture"].to_list() == ["A+B", "A+B+C", "A+C", "B+C"]
    expected = [(e(1) + e(2)) / 2, (e(1) + e(2) + e(3)) / 3, (e(1) + e(3)) / 2, (e(2) + e(3)) / 2]
    assert out["ood_score"].to_list() == pytest.approx(expected, rel=1e-12)
    assert out["seq_ood_score"].null_count() == 4


def test_a_diverged_model_ranks_last_instead_of_scrambling_the_order(caplog):
    broken = table().with_columns(
        pl.when((pl.col("model_id") == "micro-A+B") & (pl.col("domain") == "news"))
        .then(float("nan")).otherwise(pl.col("nll_sum")).alias("nll_sum"))
    broken = broken.with_columns((pl.col("nll_sum") / pl.col("n_tokens")).exp().alias("ppl"))
    out = rank.ranking(broken, "micro")
    assert out["mixture"].to_list() == ["B+C", "A+C", "A+B"]
    assert out["ood_score"].to_list()[:2] == pytest.approx([e(0.75), e(1.5)], rel=1e-12)
    assert out["ood_score"][2] == math.inf
    assert "mixture A+B has proxy_ppl nan on news; ranked last" in caplog.text


def test_a_proxy_nobody_scored_is_refused_by_name():
    with pytest.raises(rank.RankError, match="'macro'.*merged methods scored: micro"):
        rank.ranking(table(), "macro")
    with pytest.raises(rank.RankError, match="unknown proxy 'best'"):
        rank.ranking(table(), "best")
    no_ood = table().filter(pl.col("domain_kind") != "ood")
    with pytest.raises(rank.RankError, match="no out-of-domain rows"):
        rank.ranking(no_ood, "micro")


def test_markdown_shows_the_top_rows_and_the_seq_check():
    text = rank.markdown(rank.ranking(table(), "micro"), top=2)
    lines = text.splitlines()
    assert "the first 2 of 3 mixtures" in lines[0]
    assert lines[2] == "| rank | mixture | OOD score | code | news | in-domain | seq |"
    assert lines[4].startswith("| 1 | B+C | 2.12 | 2.72 | 1.65 |")
    assert lines[5].endswith(f"| {e(1.0):.2f} |") and len(lines) == 6


def test_command_line_writes_both_files_or_neither(tmp_path):
    src = tmp_path / "perplexity.csv"
    table().write_csv(src)
    outs = [tmp_path / "ranking.csv", tmp_path / "ranking.md"]
    cmd = [sys.executable, "-m", "mergemix.rank", "--perplexity", str(src),
           "--out-csv", str(outs[0]), "--out-md", str(outs[1])]
    bad = subprocess.run([*cmd, "--proxy", "weighted"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: no mixture has proxy 'weighted'")
    assert not any(p.exists() for p in outs)
    good = subprocess.run([*cmd, "--proxy", "micro"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert pl.read_csv(outs[0])["mixture"].to_list() == ["B+C", "A+B", "A+C"]
    assert "| 1 | B+C |" in outs[1].read_text()
