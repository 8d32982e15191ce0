"""Size transfer (paper 5.4 / A.6) end to end: the tiny study grown by a larger seq size.

The completed tiny study (tests/test_workflow.py, model width 32, 2 layers) gets a
`transfer` section (width 64, 3 layers). The plan must add the large seed, one large seq
model per mixture, their evaluations and the transfer analysis, and retrain nothing of
the small study; the outputs must say which size every seq row is.
"""

from __future__ import annotations

import json
import shutil

import polars as pl
import pytest

from tests.test_incremental import edit_config, plan, run_and_retrained

pytestmark = pytest.mark.slow

LARGE = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "intermediate_size": 128}
MIXTURES = {"alpha+beta", "alpha+gamma", "beta+gamma"}


def add_transfer(config):
    config["transfer"] = {
        "seq_sample": None,
        "pretrained": None,
        "model": LARGE,
        "seed_phase": {"tokens": 6000, "batch_size": 4, "lr": 0.002, "min_lr": 0.0002, "warmup_steps": 5},
        "continued": {"batch_size": 4, "lr": 0.0005, "min_lr": 0.0005, "warmup_steps": 2},
    }


@pytest.fixture(scope="module")
def grown(tiny_workflow, tmp_path_factory):
    """A copy of the tiny study with the transfer planned (returned) and then run."""
    root = tmp_path_factory.mktemp("transfer") / "study"
    shutil.copytree(tiny_workflow, root, symlinks=True)
    edit_config(root, add_transfer)
    jobs = plan(root)
    retrained = run_and_retrained(root)
    return root, jobs, retrained


def read(path):
    return pl.read_csv(path, schema_overrides={"method": pl.Utf8, "model_id": pl.Utf8})


def test_plan_adds_only_the_large_models_and_their_analysis(grown):
    _, jobs, retrained = grown
    rules = sorted(rule for rule, _ in jobs)
    assert rules == sorted(["seed_large", *["seq_large"] * 3, *["evaluate_seq_large"] * 3,
                            "collect_transfer", "analyze_transfer"])
    assert {out for rule, out in jobs if rule == "seq_large"} == {
        f"work/models/seq_large/{m}/model.safetensors" for m in MIXTURES}
    # nothing of the small study retrains: only the new large models were written
    assert retrained == {"work/models/seed_large", *(f"work/models/seq_large/{m}" for m in MIXTURES)}


def test_large_models_have_the_large_shape_and_grow_from_the_large_seed(grown):
    root, _, _ = grown
    seed = json.loads((root / "work/models/seed_large/mergemix.json").read_text())
    small = json.loads((root / "work/models/unit/docs/alpha/0/config.json").read_text())
    assert (small["hidden_size"], small["num_hidden_layers"]) == (32, 2)
    for m in MIXTURES:
        folder = root / "work/models/seq_large" / m
        config = json.loads((folder / "config.json").read_text())
        assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (64, 3, 128)
        # context and vocabulary are the small model's: both sizes see the same windows
        assert config["max_position_embeddings"] == small["max_position_embeddings"] == 32
        assert config["vocab_size"] == small["vocab_size"]
        side = json.loads((folder / "mergemix.json").read_text())
        assert side["seed_sha256"] == seed["weights_sha256"]
        assert side["data"]["mixture"] == m and side["data"]["size"] == "large"
        assert side["tokens"] > 0


def test_transfer_analysis_uses_the_large_seq_models_as_truth(grown):
    root, _, _ = grown
    small, large = read(root / "results/perplexity.csv"), read(root / "results/transfer/perplexity.csv")
    seq = large.filter(pl.col("model_kind") == "seq")
    # every seq row of the transfer table is a large model, named so
    assert set(seq["model_id"]) == {f"large/{m}" for m in MIXTURES}
    assert set(seq["mixture"]) == MIXTURES
    # the main table keeps the small seq models and nothing of the large ones
    assert set(small.filter(pl.col("model_kind") == "seq")["model_id"]) == MIXTURES
    # proxies are the same rows in both tables: they come from the small models
    cols = ["model_kind", "model_id", "method", "domain", "nll_sum"]
    proxies = [t.filter(pl.col("model_kind") != "seq").select(cols).sort(cols[:4]) for t in (small, large)]
    assert proxies[0].equals(proxies[1])
    # the two sizes are different models scored on the same documents
    key = ["mixture", "domain"]
    both = small.filter(pl.col("model_kind") == "seq").join(seq, on=key, suffix="_large")
    assert both.height == seq.height
    assert (both["n_tokens"] == both["n_tokens_large"]).all()
    assert (both["nll_sum"] != both["nll_sum_large"]).all()
    # the transfer analysis correlates the 3 mixtures' large seq ppl with each proxy
    corr = pl.read_csv(root / "results/transfer/correlations.csv")
    proxies = {"micro", "macro", "weighted", "merged", "mean_ind", "ind_id"}
    netdocs = corr.filter(pl.col("domain") == "netdocs")
    assert proxies <= set(netdocs["proxy"]) and (netdocs["n_mixtures"] == 3).all()
    scores = pl.read_csv(root / "results/transfer/proxy_scores.csv").filter(pl.col("domain") == "netdocs")
    truth = dict(seq.filter(pl.col("domain") == "netdocs").select("mixture", "ppl").iter_rows())
    assert len(truth) == 3 and scores.filter(pl.col("proxy").is_in(list(proxies))).height == 3 * len(proxies)
    for row in scores.iter_rows(named=True):
        assert row["seq_ppl"] == pytest.approx(truth[row["mixture"]], rel=1e-9)
    assert (root / "results/transfer/tables/table2.md").read_text().startswith("Table 2")


def test_removing_transfer_plans_nothing(grown, tmp_path):
    """Without `transfer` the study is the small one again, already complete."""
    root = tmp_path / "study"
    shutil.copytree(grown[0], root, symlinks=True)
    edit_config(root, lambda c: c.update(transfer=None))
    assert plan(root) == []
