"""collect: per-model CSVs stacked into results/perplexity.csv, whatever numbers they hold."""

import math

import pytest

from mergemix import analyze, collect
from mergemix.evaluate import rows_csv

ROW = {"model_kind": "unit", "model_id": "a/0", "mixture": "a", "method": "", "domain": "web",
       "domain_kind": "ood", "n_docs": 3, "n_tokens": 10, "n_bytes": 40, "nll_sum": 12.5, "ppl": 3.49, "bpb": 0.6}


def test_a_diverged_model_and_whole_number_floats_stack_with_the_rest(tmp_path):
    # One file per model, as the evaluation jobs write them: a normal model, one whose
    # nll_sum prints without a decimal point (9000.0 -> "9000"), and one that diverged (nan).
    files = {
        "a": dict(ROW),
        "b": {**ROW, "model_id": "b/0", "mixture": "b", "nll_sum": 9000.0, "ppl": math.inf},
        "c": {**ROW, "model_id": "c/0", "mixture": "c", "nll_sum": math.nan, "ppl": math.nan, "bpb": math.nan},
    }
    paths = []
    for name, row in files.items():
        paths.append(tmp_path / f"{name}.csv")
        paths[-1].write_text(rows_csv([row]))
    out = tmp_path / "perplexity.csv"
    assert collect.main(["--out", str(out), *map(str, paths)]) == 0
    table = analyze.load_perplexity(out)
    ppl = dict(zip(table["model_id"], table["ppl"]))
    assert ppl["a/0"] == pytest.approx(3.49)
    assert ppl["b/0"] == math.inf
    assert math.isnan(ppl["c/0"])
    assert dict(zip(table["model_id"], table["nll_sum"]))["b/0"] == 9000.0


@pytest.mark.parametrize("column, value", [("nll_sum", "12.5x"), ("n_tokens", "10.5"), ("ppl", "")])
def test_a_damaged_number_names_file_and_column_and_writes_nothing(tmp_path, capsys, column, value):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text(rows_csv([ROW]))
    bad.write_text(rows_csv([{**ROW, "model_id": "b/0", column: value}]))
    out = tmp_path / "perplexity.csv"
    assert collect.main(["--out", str(out), str(good), str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and f"column {column}" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("damage", [b"extra field", b"not UTF-8"])
def test_a_damaged_csv_names_its_file_and_writes_nothing(tmp_path, capsys, damage):
    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    good.write_text(rows_csv([ROW]))
    text = rows_csv([{**ROW, "model_id": "b/0"}]).encode()
    if damage == b"extra field":
        bad.write_bytes(text.rstrip(b"\n") + b",surplus\n")
    else:
        bad.write_bytes(text.replace(b"b/0", b"b/\xff0"))
    out = tmp_path / "perplexity.csv"
    assert collect.main(["--out", str(out), str(good), str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and str(bad) in err[-1], err[-3:]
    assert not out.exists()
