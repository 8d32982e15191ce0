"""The bad-input catalogue: every case runs the command a user (or the workflow) runs and
expects exactly one error line that names the culprit, and no partial output.

Config cases go through `snakemake --dry-run` on a copy of the demo config; stage cases
call the stage's command line (`python -m mergemix.<stage>`) on files the test writes.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergemix import io
from mergemix import model as mm
from tests.conftest import REPO, make_checkpoint

# --- helpers ---------------------------------------------------------------------------


def run(*args: str, cwd: Path | None = None, address_space: int | None = None) -> subprocess.CompletedProcess:
    """Run python with `args`; `address_space` (bytes) caps the child's virtual memory, so
    that an allocation beyond it is refused at once on any machine, whatever its RAM and
    overcommit setting."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          preexec_fn=cap if address_space else None)


#: the address space of a child that must run out of memory: far above what a tiny model
#: needs, far below the logits the out-of-memory cases ask for (137 GB and 161 GB)
CAPPED = 48 << 30


def error_line(done: subprocess.CompletedProcess, prefix: str = "error:") -> str:
    """The one line a failed command printed to explain itself."""
    printed = done.stdout + done.stderr  # snakemake reports on stdout, stages on stderr
    assert done.returncode != 0, f"expected a failure, got rc 0:\n{printed[-2000:]}"
    lines = [line for line in printed.splitlines() if prefix in line]
    assert len(lines) == 1, f"expected one '{prefix}' line, got {len(lines)}:\n{printed[-3000:]}"
    assert "Traceback" not in printed, printed[-3000:]
    return lines[0]


def assert_nothing_left(folder: Path, before: set[str] = frozenset()) -> None:
    """`folder` holds no file the failed command wrote (temporaries included)."""
    now = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()
    assert now <= set(before), f"partial output left behind: {sorted(now - set(before))}"


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# --- config: snakemake --dry-run on an edited copy of config.yaml ----------------------


def _drop(key):
    def edit(c):
        section, name = key.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        del node[name]

    return edit


def _set(key, value):
    def edit(c):
        *path, name = key.split(".")
        node = c
        for part in path:
            node = node[part]
        node[name] = value

    return edit


def _duplicate_partition(c):
    c["sources"]["again"] = copy.deepcopy(c["sources"]["sotu"])
    c["sources"]["again"]["partitions"] = {"1990s": 1}


def _too_many_mixtures(c):
    c["sources"]["sotu"]["partitions"] = {f"d{i}": 1 for i in range(60)}  # C(60, 5) = 5,461,512
    c["mixtures"].update(k=5, sample=None)


def _all_of(*edits):
    def edit(c):
        for e in edits:
            e(c)

    return edit


CONFIG_CASES = {
    "unknown top-level key": (_set("modle", {"hidden_size": 64}), "modle"),
    "mistyped nested key": (_set("train.continued.lrr", 0.001), "train.continued.lrr"),
    "missing key": (_drop("model.hidden_size"), "model.hidden_size"),
    "wrong type": (_set("train.unit_tokens", "lots"), "train.unit_tokens"),
    "out of range": (_set("eval.max_tokens", 0), "eval.max_tokens"),
    "out of range nested": (_set("train.continued.lr", 5.0), "train.continued.lr"),
    "heads do not divide width": (_set("model.num_heads", 5), "model.num_heads"),
    "min_lr above lr": (_set("train.seed_phase.min_lr", 0.5), "train.seed_phase.min_lr"),
    "duplicate partition names": (_duplicate_partition, "1990s"),
    "mixture names an unknown partition": (_set("mixtures.include", [["1850s", "1870"]]), "1870"),
    "k above the partition count": (_set("mixtures.k", 40), "mixtures.k"),
    "bad partition name": (_set("sources.sotu.partitions", {"../up": 1}), "../up"),
    "ranking by a merge method not scored": (_set("analysis.rank_by", "macro"), "analysis.rank_by"),
    "unit smaller than one batch": (_set("train.unit_tokens", 100), "train.unit_tokens"),
    "bf16 without ZeRO": (_set("train.precision", "bf16"), "train.zero_stage"),
    "no out-of-domain set": (_set("eval.ood", {}), "eval.ood"),
    "whole number written as a float": (_set("mixtures.k", 2.0), "mixtures.k"),
    "token count in float notation": (_set("train.unit_tokens", 1.0e5), "train.unit_tokens"),
    "unquoted numeric partition name": (_set("sources.sotu.partitions", {1850: 1}), "quote"),
    "several partitions, nothing to partition on": (_set("sources.sotu.partition_by", []), "sources.sotu.partition_by"),
    "included mixture of another size than k": (_set("mixtures.include", [["1850s"]]), "mixtures.include[0]"),
    "warm-up as long as a unit": (_set("train.continued.warmup_steps", 48), "train.continued.warmup_steps"),
    "seed imported from the workflow's own output": (_set("seed.pretrained", "work/models/seed"), "seed.pretrained"),
    "tokenizer imported from the workflow's own output": (
        _all_of(_set("tokenizer.name", "./work/tokenizer"), _set("model.vocab_size", 4096)), "tokenizer.name"),
    "too many candidate mixtures to list": (_too_many_mixtures, "mixtures.k"),
    "empty seed name": (_set("seed.pretrained", ""), "seed.pretrained"),
    "split beside a demo recipe": (_set("sources.sotu.load.split", "test"), "sources.sotu.load.split"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_error_names_the_key_before_anything_runs(case, tmp_path):
    edit, culprit = CONFIG_CASES[case]
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    edit(config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    done = run("-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n", "--cores", "1")
    line = error_line(done, "config error:")
    assert culprit in line, line
    assert files_under(tmp_path) == {"config.yaml"}, "a config error must not create outputs"


def test_a_key_given_twice_in_the_config_file_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys: a copied partition line would silently win."""
    text = (REPO / "config.yaml").read_text()
    assert "      1850s: 1\n" in text
    (tmp_path / "config.yaml").write_text(text.replace("      1850s: 1\n", "      1850s: 1\n      1850s: 3\n", 1))
    done = run("-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "-n", "--cores", "1")
    line = error_line(done, "config error:")
    assert "'1850s' is given twice" in line and "line " in line, line
    assert files_under(tmp_path) == {"config.yaml"}


# --- corpus: python -m mergemix.corpus partition ----------------------------------------


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"body": f"document number {i} about {t}", "topic": t, "n": i} for i, t in enumerate("aabbc")]


def _spec(files, **over):
    spec = {"source": "toy", "load": {"path": "json", "data_files": [str(f) for f in files]},
            "text_column": "body", "partition_by": ["topic"], "partitions": ["a", "b"]}
    spec.update(over)
    return spec


def corpus_missing_file(tmp):
    return _spec([tmp / "nope.jsonl"]), "nope.jsonl"


def corpus_corrupt_parquet(tmp):
    bad = tmp / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    return _spec([bad], load={"path": "parquet", "data_files": [str(bad)]}), "broken.parquet"


def corpus_non_utf8(tmp):
    good = _jsonl(tmp / "good.jsonl", ROWS)
    bad = tmp / "latin1.jsonl"
    bad.write_bytes(json.dumps({"body": "x", "topic": "a"}).encode() + b"\n" + b'{"body": "caf\xe9", "topic": "a"}\n')
    return _spec([good, bad]), "latin1.jsonl"


def corpus_non_utf8_parquet(tmp):
    """Parquet stores a string column's bytes as they are: the third row is Latin-1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    body = pa.array([b"first text", b"second text", b"caf\xe9 au lait"], pa.binary()).view(pa.string())
    bad = tmp / "latin1.parquet"
    pq.write_table(pa.table({"body": body, "topic": ["a", "b", "a"]}), bad)
    return _spec([bad], load={"path": "parquet", "data_files": [str(bad)]}), "not valid UTF-8 in row 2"


def corpus_missing_text_column(tmp):
    return _spec([_jsonl(tmp / "d.jsonl", ROWS)], text_column="content"), "content"


def corpus_missing_metadata_column(tmp):
    return _spec([_jsonl(tmp / "d.jsonl", ROWS)], partition_by=["year"]), "year"


def corpus_text_not_string(tmp):
    return _spec([_jsonl(tmp / "d.jsonl", ROWS)], text_column="n"), "'n'"


def corpus_empty_partition(tmp):
    return _spec([_jsonl(tmp / "d.jsonl", ROWS)], partitions=["a", "zzz"]), "zzz"


def corpus_duplicate_partition(tmp):
    return _spec([_jsonl(tmp / "d.jsonl", ROWS)], partitions=["a", "b", "a"]), "'a'"


def corpus_blank_only_partition(tmp):
    rows = ROWS + [{"body": "   ", "topic": "blank", "n": 9}]
    return _spec([_jsonl(tmp / "d.jsonl", rows)], partitions=["a", "blank"]), "blank"


def corpus_keys_that_collide(tmp):
    """("x-y", "z") and ("x", "y-z") both join to the key x-y-z: two groups, not one."""
    rows = [{"body": "one text", "topic": "x-y", "sub": "z"}, {"body": "another", "topic": "x", "sub": "y-z"}]
    return _spec([_jsonl(tmp / "d.jsonl", rows)], partition_by=["topic", "sub"], partitions=["x-y-z"]), "'x-y-z'"


def corpus_mistyped_rename_key(tmp):
    """'aa' is meant to be 'a': partition b would quietly lack the documents meant for it."""
    return _spec([_jsonl(tmp / "d.jsonl", ROWS)], rename={"aa": "b"}), "rename key 'aa'"


def corpus_empty_file(tmp):
    good = _jsonl(tmp / "good.jsonl", ROWS)
    (tmp / "empty.jsonl").write_bytes(b"")
    return _spec([good, tmp / "empty.jsonl"]), "empty.jsonl"


def corpus_folder_as_file(tmp):
    (tmp / "shards").mkdir()
    _jsonl(tmp / "shards" / "d.jsonl", ROWS)
    return _spec([tmp / "shards"]), "is a folder"


CORPUS_CASES = [corpus_folder_as_file, corpus_missing_file, corpus_corrupt_parquet, corpus_non_utf8, corpus_non_utf8_parquet,
                corpus_missing_text_column,
                corpus_missing_metadata_column, corpus_text_not_string, corpus_empty_partition,
                corpus_duplicate_partition, corpus_blank_only_partition, corpus_keys_that_collide, corpus_empty_file,
                corpus_mistyped_rename_key]


@pytest.mark.parametrize("case", CORPUS_CASES, ids=lambda f: f.__name__.removeprefix("corpus_"))
def test_corpus_error_names_the_culprit(case, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    spec, culprit = case(tmp_path)
    out = tmp_path / "parts"
    done = run("-m", "mergemix.corpus", "partition", "--spec-json", json.dumps(spec), "--out-dir", str(out))
    line = error_line(done)
    assert culprit in line, line
    assert_nothing_left(out)


# --- tokenizer and training -------------------------------------------------------------

MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "context_length": 32}
PHASE = {"batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2}


@pytest.fixture(scope="module")
def shard(tmp_path_factory, texts, tokenizer_dir):
    from mergemix.tokenize import make_shards

    root = tmp_path_factory.mktemp("shards")
    part = root / "docs.parquet"
    pl.DataFrame({"text": [t for docs in texts.values() for t in docs]}).write_parquet(part)
    make_shards(part, tokenizer_dir, root / "docs", heldout_fraction=0.1, segment_chars=2000, seed=0)
    return root / "docs" / "train"


def train_cmd(shard, tokenizer_dir, out, model=MODEL, phase=PHASE, train=None, tokens=4000):
    return ["-m", "mergemix.train", "--kind", "seed", "--tokenizer", str(tokenizer_dir), "--unit", f"{shard}:0",
            "--unit-tokens", str(tokens), "--model-json", json.dumps(model), "--phase-json", json.dumps(phase),
            "--train-json", json.dumps(train or {"checkpoint_every": 1}), "--threads", "1", "--out", str(out)]


def test_tokenizer_larger_than_model_vocabulary(shard, tokenizer_dir, tmp_path):
    out = tmp_path / "seed"
    line = error_line(run(*train_cmd(shard, tokenizer_dir, out, model=dict(MODEL, vocab_size=100))))
    assert "model.vocab_size" in line and "100" in line, line
    assert_nothing_left(out)


def test_training_out_of_memory_says_to_set_micro_batch(shard, tokenizer_dir, tmp_path):
    """A forward pass whose logits cannot be allocated (a 2**20-row vocabulary, 1,024
    windows at once: 137 GB of float32 logits) ends in one line naming train.micro_batch."""
    batch = 1024
    assert batch * MODEL["context_length"] * (1 << 20) * 4 > 2 * CAPPED
    out = tmp_path / "seed"
    phase = dict(PHASE, batch_size=batch)
    line = error_line(run(*train_cmd(shard, tokenizer_dir, out, model=dict(MODEL, vocab_size=1 << 20), phase=phase,
                                     tokens=batch * (MODEL["context_length"] + 1) + 1), address_space=CAPPED))
    assert "out of memory on cpu" in line and "train.micro_batch" in line and str(batch) in line, line
    assert_nothing_left(out)


@pytest.mark.parametrize("kind", ["missing", "empty folder"])
def test_unknown_tokenizer_name(kind, tmp_path):
    out = tmp_path / "tokenizer"
    name = tmp_path / "no-such-tokenizer"
    if kind == "empty folder":
        name.mkdir()
    done = run("-m", "mergemix.tokenize", "tokenizer", "--name", str(name), "--out-dir", str(out))
    line = error_line(done)
    assert str(name) in line, line
    assert done.stderr.strip().splitlines()[-1] == line, "the error goes on past its line"
    assert_nothing_left(out)


@pytest.mark.parametrize("stage", ["shards", "tokenizer", "decontaminate"])
@pytest.mark.parametrize("damage, message", [
    ("not parquet", "is not a readable parquet file"),
    ("no text column", "has no 'text' column"),
])
def test_partition_file_that_cannot_be_read(damage, message, stage, tokenizer_dir, tmp_path):
    """Tokenizing a partition, training a tokenizer on it, decontaminating it."""
    part = tmp_path / "parts" / "docs.parquet"
    part.parent.mkdir()
    if damage == "not parquet":
        part.write_bytes(b"PAR1 cut short by a crash")
    else:
        pl.DataFrame({"body": ["one document", "another"]}).write_parquet(part)
    out = tmp_path / "out"
    if stage == "shards":
        args = ["-m", "mergemix.tokenize", "shards", "--input", part, "--tokenizer", tokenizer_dir,
                "--out-dir", out, "--heldout-fraction", "0.5", "--segment-chars", "100"]
    elif stage == "tokenizer":
        args = ["-m", "mergemix.tokenize", "tokenizer", "--input", part, "--vocab-size", "300", "--out-dir", out]
    else:
        from mergemix import decontaminate as dc

        pl.DataFrame({"text": ["an evaluation document"]}).write_parquet(tmp_path / "ood.parquet")
        dc.build_filter([dc.EvalSet("ood", tmp_path / "ood.parquet", 1.0, 0)], 13, 1e-6, tmp_path / "filter.json")
        args = ["-m", "mergemix.decontaminate", "partition", "--input", part, "--filter", tmp_path / "filter.json",
                "--out", out / "docs.parquet", "--report", out / "docs.json"]
    line = error_line(run(*map(str, args)))
    assert str(part) in line and message in line and "rerun its partition rule" in line, line
    assert_nothing_left(out)


def test_nan_loss_stops_training_and_keeps_the_last_good_state(shard, tokenizer_dir, tmp_path):
    """An absurd learning rate diverges after a few steps: training stops with the step,
    writes no model, and keeps the newest resume state whose loss was still finite."""
    out = tmp_path / "seed"
    phase = dict(PHASE, lr=1e9, min_lr=1e9, warmup_steps=10**9)  # lr grows by 1.0 per step
    line = error_line(run(*train_cmd(shard, tokenizer_dir, out, phase=phase, tokens=20000)))
    assert "loss is nan" in line or "loss is inf" in line, line
    failed_at = int(line.split(" at step ")[1].split(":")[0])
    assert not (out / mm.WEIGHTS).exists()
    kept = sorted((out / ".resume").glob("step-*"))
    assert kept, "the last good state must be kept"
    assert all(int(k.name.split("-")[1]) < failed_at for k in kept), (kept, failed_at)
    assert kept[-1].name in line


# --- merging and evaluation of checkpoints ----------------------------------------------


def _rewrite_weights(path: Path, edit) -> None:
    """Change a checkpoint's tensors and keep its sidecar consistent (a well-formed but different model)."""
    state = edit(load_file(path / mm.WEIGHTS))
    save_file(state, path / mm.WEIGHTS, metadata={"format": "pt"})
    sidecar = mm.read_sidecar(path)
    sidecar["weights_sha256"] = io.sha256_file(path / mm.WEIGHTS)
    io.write_json(path / mm.SIDECAR, sidecar)


def ckpt_other_seed(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2, seed_sha="t" * 64)
    return "seed tttttttttttt"


def ckpt_other_architecture(tmp, cfg):
    from dataclasses import replace

    make_checkpoint(tmp / "b", replace(cfg, num_layers=3), 2)
    return "num_hidden_layers"


def ckpt_other_shape(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    name = "lm_head.weight"
    _rewrite_weights(tmp / "b", lambda s: {**s, name: s[name][:-8].clone()})
    return name


def ckpt_missing_tensor(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    _rewrite_weights(tmp / "b", lambda s: {k: v for k, v in s.items() if k != "lm_head.weight"})
    return "lm_head.weight"


def ckpt_corrupt_bytes(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    weights = tmp / "b" / mm.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    return str(weights)


def ckpt_truncated(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    weights = tmp / "b" / mm.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(weights)


def ckpt_no_sidecar(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    (tmp / "b" / mm.SIDECAR).unlink()
    return f"{tmp / 'b'} has no {mm.SIDECAR}"  # the folder and the file it lacks


def ckpt_bad_sidecar(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    (tmp / "b" / mm.SIDECAR).write_text('{"kind": "unit", ')
    return str(tmp / "b" / mm.SIDECAR)


def ckpt_sidecar_not_a_mapping(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    (tmp / "b" / mm.SIDECAR).write_text('["unit"]')
    return str(tmp / "b" / mm.SIDECAR)


def ckpt_no_weights(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    (tmp / "b" / mm.WEIGHTS).unlink()
    return f"{tmp / 'b'} has no {mm.WEIGHTS}"  # the folder and the file it lacks


def ckpt_no_config(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    (tmp / "b" / mm.CONFIG).unlink()
    return f"{tmp / 'b'} has no {mm.CONFIG}"  # the folder and the file it lacks


def ckpt_bad_config(tmp, cfg):
    make_checkpoint(tmp / "b", cfg, 2)
    (tmp / "b" / mm.CONFIG).write_text('{"model_type": "gpt_neox", ')
    return str(tmp / "b" / mm.CONFIG)


CHECKPOINT_CASES = [ckpt_other_seed, ckpt_other_architecture, ckpt_other_shape, ckpt_missing_tensor,
                    ckpt_corrupt_bytes, ckpt_truncated, ckpt_no_sidecar, ckpt_bad_sidecar, ckpt_no_weights,
                    ckpt_no_config, ckpt_bad_config, ckpt_sidecar_not_a_mapping]


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=lambda f: f.__name__.removeprefix("ckpt_"))
def test_merge_refuses_with_the_culprit(case, tmp_path, tiny_model_config):
    make_checkpoint(tmp_path / "a", tiny_model_config, 1)
    culprit = case(tmp_path, tiny_model_config)
    out = tmp_path / "merged"
    done = run("-m", "mergemix.merge", "--method", "micro", "--model", f"p={tmp_path / 'a'}",
               "--model", f"q={tmp_path / 'b'}", "--out", str(out))
    line = error_line(done)
    assert culprit in line, line
    assert_nothing_left(out)
    assert not list(tmp_path.glob(".merged*")), "staging debris left beside the output"


@pytest.mark.parametrize("case", [ckpt_corrupt_bytes, ckpt_truncated, ckpt_no_config, ckpt_bad_config],
                         ids=["corrupt", "truncated", "no_config", "bad_config"])
def test_evaluate_refuses_a_damaged_checkpoint(case, tmp_path, tiny_model_config, shard):
    culprit = case(tmp_path, tiny_model_config)
    out = tmp_path / "rows.csv"
    done = run("-m", "mergemix.evaluate", "--model", str(tmp_path / "b"), "--domain", f"docs:ood:1000:{shard}",
               "--out", str(out), "--model-kind", "unit", "--model-id", "b")
    line = error_line(done)
    assert culprit in line, line
    assert not out.exists()


def _evaluate_damaged_shard(tmp_path, tiny_model_config, shard, damage):
    """Evaluate a fresh checkpoint on a copy of `shard` that `damage(prefix)` spoiled; the error line."""
    make_checkpoint(tmp_path / "a", tiny_model_config, 1)
    copy = tmp_path / "shard" / Path(shard).name
    copy.parent.mkdir()
    for suffix in (".bin", ".idx", ".json"):
        shutil.copy(Path(shard).with_suffix(suffix), copy.with_suffix(suffix))
    damage(copy)
    out = tmp_path / "rows.csv"
    done = run("-m", "mergemix.evaluate", "--model", str(tmp_path / "a"), "--domain", f"docs:ood:1000:{copy}",
               "--out", str(out), "--model-kind", "unit", "--model-id", "a")
    assert not out.exists()
    return error_line(done)


@pytest.mark.parametrize("sidecar", ["{", "[]", "{}"], ids=["not JSON", "a list", "no keys"])
def test_evaluate_refuses_a_damaged_shard_sidecar(sidecar, tmp_path, tiny_model_config, shard):
    line = _evaluate_damaged_shard(tmp_path, tiny_model_config, shard,
                                   lambda prefix: prefix.with_suffix(".json").write_text(sidecar))
    assert str(tmp_path / "shard" / (Path(shard).name + ".json")) in line, line


@pytest.mark.parametrize("cut", [16, 5], ids=["a row", "part of a row"])
def test_evaluate_refuses_a_shard_index_cut_short(cut, tmp_path, tiny_model_config, shard):
    def shorten(prefix):
        idx = prefix.with_suffix(".idx")
        idx.write_bytes(idx.read_bytes()[:-cut])

    line = _evaluate_damaged_shard(tmp_path, tiny_model_config, shard, shorten)
    assert str(tmp_path / "shard" / (Path(shard).name + ".idx")) in line and "document rows" in line, line


@pytest.mark.parametrize("cut", [1, 2, 4], ids=["half a token", "a token", "two tokens"])
def test_evaluate_refuses_a_shard_cut_short(cut, tmp_path, tiny_model_config, shard):
    """Cut by an odd number of bytes, numpy refused to map the file with a traceback."""
    def shorten(prefix):
        data = prefix.with_suffix(".bin")
        data.write_bytes(data.read_bytes()[:-cut])

    line = _evaluate_damaged_shard(tmp_path, tiny_model_config, shard, shorten)
    assert str(tmp_path / "shard" / (Path(shard).name + ".bin")) in line and "truncated" in line, line


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_evaluate_refuses_a_shard_changed_since_it_was_written(suffix, tmp_path, tiny_model_config, shard):
    """Same size, one byte different: only the sha256 in the sidecar tells (jobs track the sidecar alone)."""
    def flip(prefix):
        path = prefix.with_suffix(suffix)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    line = _evaluate_damaged_shard(tmp_path, tiny_model_config, shard, flip)
    assert str(tmp_path / "shard" / (Path(shard).name + suffix)) in line and "sha256" in line, line


def test_evaluate_out_of_memory_names_the_batch_size(tmp_path, tiny_model_config, shard):
    """A batch whose logits cannot be allocated (here a 2**20-row vocabulary: the first
    batch's logits take far more than the child may map, and the allocator refuses at
    once) ends in one line that says what to lower, not a traceback."""
    vocab = 1 << 20
    make_checkpoint(tmp_path / "a", tiny_model_config, 1, vocab=vocab)
    tokens = json.loads(Path(shard).with_suffix(".json").read_text())["n_tokens"]
    need = min(tokens, 100_000) * vocab * 4  # bytes of float32 logits of one batch of every window
    assert need > 2 * CAPPED, "the shard is too small to overflow"
    out = tmp_path / "rows.csv"
    done = run("-m", "mergemix.evaluate", "--model", str(tmp_path / "a"), "--domain", f"docs:ood:100000:{shard}",
               "--out", str(out), "--model-kind", "unit", "--model-id", "a", "--batch-size", "100000",
               address_space=CAPPED)
    line = error_line(done)
    assert "out of memory on cpu" in line and "--batch-size" in line and "100000" in line, line
    assert not out.exists()


def test_neither_merge_nor_evaluate_writes_over_the_checkpoint_it_reads(tmp_path, tiny_model_config, shard):
    make_checkpoint(tmp_path / "a", tiny_model_config, 1)
    make_checkpoint(tmp_path / "b", tiny_model_config, 2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    done = run("-m", "mergemix.merge", "--method", "micro", "--model", f"p={tmp_path / 'a'}",
               "--model", f"q={tmp_path / 'b'}", "--out", str(tmp_path / "x" / ".." / "a"))
    assert "is the input checkpoint" in error_line(done)
    done = run("-m", "mergemix.evaluate", "--model", str(tmp_path / "a"), "--domain", f"docs:ood:1000:{shard}",
               "--out", str(tmp_path / "a" / mm.WEIGHTS), "--model-kind", "unit", "--model-id", "a")
    assert "inside the checkpoint" in error_line(done)
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before


# --- a full disk ------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: too small for a checkpoint. Needs root (CI runs as root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}): run as root to test a full disk")
    yield mount
    if subprocess.run(["umount", str(mount)], check=False, capture_output=True).returncode != 0:
        # a file left open on it (a failing test) keeps it busy: detach it now, freed on close
        subprocess.run(["umount", "--lazy", str(mount)], check=False)


def test_full_disk_while_saving_a_merge(tmp_path, tiny_model_config, tiny_disk):
    make_checkpoint(tmp_path / "a", tiny_model_config, 1)
    make_checkpoint(tmp_path / "b", tiny_model_config, 2)
    (tiny_disk / "mine.txt").write_text("a file of the user's that must survive\n")
    out = tiny_disk / "merged"
    done = run("-m", "mergemix.merge", "--method", "micro", "--model", f"p={tmp_path / 'a'}",
               "--model", f"q={tmp_path / 'b'}", "--out", str(out))
    line = error_line(done)
    assert "no space left" in line and f"{out}/{mm.WEIGHTS}" in line, line
    assert files_under(tiny_disk) == {"mine.txt"}
    assert (tiny_disk / "mine.txt").read_text().startswith("a file of the user's")


def test_a_write_that_fails_at_its_flush_gives_its_space_back(tiny_disk):
    """The disk fills when the last buffered bytes are flushed: the error names the
    output, and the temporary is closed as well as unlinked (an open unlinked file
    would hold its blocks until the process ends)."""
    from mergemix import io as mio

    (tiny_disk / "mine.bin").write_bytes(b"u" * (60 << 10))  # the user's file: one 4 KiB page left
    free = os.statvfs(tiny_disk).f_bavail
    out = tiny_disk / "table.csv"
    with pytest.raises(OSError) as raised:
        with mio.StreamedFile(out) as file:
            file.write(b"x" * 6000)  # fits Python's buffer; the flush at the end needs two pages
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(out)
    assert file.closed
    assert files_under(tiny_disk) == {"mine.bin"}
    assert os.statvfs(tiny_disk).f_bavail == free


def test_full_disk_while_writing_token_shards(tmp_path, tiny_disk, texts, tokenizer_dir):
    """Token shards are streamed to disk batch by batch: a failed write names the shard."""
    part = tmp_path / "parts" / "docs.parquet"
    part.parent.mkdir()
    pl.DataFrame({"text": [t for docs in texts.values() for t in docs]}).write_parquet(part)
    (tiny_disk / "mine.txt").write_text("a file of the user's that must survive\n")
    out = tiny_disk / "docs"
    line = error_line(run("-m", "mergemix.tokenize", "shards", "--input", str(part), "--tokenizer", str(tokenizer_dir),
                          "--out-dir", str(out), "--heldout-fraction", "0.1", "--segment-chars", "2000"))
    assert "no space left" in line and str(out / "train.bin") in line, line
    assert files_under(tiny_disk) == {"mine.txt"}


def test_full_disk_while_writing_a_table(tmp_path, tiny_disk):
    """Tables, shards and sidecars go through io.write_bytes, whose failed write() names no
    file: the message must still name the output, and leave nothing partial."""
    from mergemix.evaluate import rows_csv

    row = {"model_kind": "unit", "model_id": "a/0", "mixture": "a", "method": "", "domain": "web",
           "domain_kind": "ood", "n_docs": 3, "n_tokens": 10, "n_bytes": 40, "nll_sum": 12.5, "ppl": 3.49, "bpb": 0.6}
    rows = tmp_path / "a.csv"
    rows.write_text(rows_csv([{**row, "model_id": f"a/{i}"} for i in range(2000)]))  # ~150 KB out
    (tiny_disk / "mine.txt").write_text("a file of the user's that must survive\n")
    out = tiny_disk / "perplexity.csv"
    line = error_line(run("-m", "mergemix.collect", "--out", str(out), str(rows)))
    assert "no space left" in line and str(out) in line, line
    assert files_under(tiny_disk) == {"mine.txt"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here")
@pytest.mark.parametrize("stage, args", [
    ("train", ["--kind", "unit", "--tokenizer", "tok", "--unit", "shard:0", "--unit-tokens", "100"]),
    ("evaluate", ["--model", "m", "--domain", "d:ood:10:shard", "--model-kind", "unit", "--model-id", "m"]),
    ("engine", ["--method", "micro", "--model", "p=m", "--mixture", "p", "--domain", "d:ood:10:shard"]),
])
def test_gpus_given_to_a_job_that_cannot_use_them(tmp_path, stage, args):
    """A Slurm job given GPUs (CUDA_VISIBLE_DEVICES) with a CPU build of torch stops at
    once rather than running a GPU-sized job on the CPU."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", f"mergemix.{stage}", *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env={**{k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}, "CUDA_VISIBLE_DEVICES": "0,1"})
    line = error_line(done)
    assert "CUDA_VISIBLE_DEVICES=0,1" in line and "sees no CUDA device" in line, line
    assert not out.exists()


TRAIN_ARGS = ["--kind", "seed", "--tokenizer", "tok"]
SHARD_ARGS = ["--input", "part.parquet", "--tokenizer", "tok"]
EVAL_ARGS = ["--model", "m", "--domain", "d:ood:10:shard", "--model-kind", "unit", "--model-id", "m"]


@pytest.mark.parametrize("stage, args, culprit", [
    ("train", [*TRAIN_ARGS, "--unit", "shard:0"], "--unit-tokens is required"),
    ("train", [*TRAIN_ARGS, "--unit-tokens", "100"], "--unit is required"),
    ("train", [*TRAIN_ARGS, "--unit", "shard:0", "--unit-tokens", "0"], "argument --unit-tokens: 0 is below 1"),
    ("train", [*TRAIN_ARGS, "--unit", "shard:0", "--unit-tokens", "100", "--seed", "-1"], "argument --seed: -1 is below 0"),
    ("train", ["--kind", "unit", "--tokenizer", "tok", "--pretrained", "gpt2"], "--pretrained imports a seed"),
    ("train", [*TRAIN_ARGS, "--unit", "shard:0", "--unit-tokens", "100", "--threads", "-2"],
     "argument --threads: -2 is below 0"),
    ("tokenize", ["shards", *SHARD_ARGS, "--heldout-fraction", "0.1", "--segment-chars", "-5"],
     "argument --segment-chars: -5 is below 1"),
    ("tokenize", ["shards", *SHARD_ARGS, "--heldout-fraction", "1.5", "--segment-chars", "2000"],
     "argument --heldout-fraction: 1.5 is not in (0, 1]"),
    ("tokenize", ["shards", *SHARD_ARGS, "--heldout-fraction", "nan", "--segment-chars", "2000"],
     "argument --heldout-fraction: nan is not in (0, 1]"),
    ("evaluate", [*EVAL_ARGS, "--seed", "-5"], "argument --seed: -5 is below 0"),
    ("evaluate", [*EVAL_ARGS, "--threads", "-1"], "argument --threads: -1 is below 0"),
    ("engine", ["--method", "micro", "--model", "p=m", "--mixture", "p", "--domain", "d:ood:10:shard", "--seed", "x"],
     "argument --seed: 'x' is not a whole number"),
], ids=["no unit tokens", "no unit", "zero unit tokens", "negative seed", "pretrained unit", "negative threads",
        "negative segment length", "held-out fraction above 1", "held-out fraction NaN", "evaluate seed", "evaluate threads",
        "engine seed"])
def test_command_line_mistakes_name_the_flag(tmp_path, stage, args, culprit):
    """Before, these ended in a TypeError traceback, numpy's 'need at least one array to
    concatenate', or a seed error naming no flag."""
    out = tmp_path / "out"
    done = run("-m", f"mergemix.{stage}", *args, "--out-dir" if stage == "tokenize" else "--out", str(out), cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    line = error_line(done)
    assert culprit in line, line
    assert not out.exists()


def test_partial_resume_folders_are_not_trusted(tmp_path):
    """A resume folder without its state.json (killed while writing) is skipped, not loaded."""
    from mergemix.train import latest_resume

    broken = tmp_path / ".resume" / "step-00000009"
    broken.mkdir(parents=True)
    (broken / mm.WEIGHTS).write_bytes(b"half")
    assert latest_resume(tmp_path, "key") is None
    good = tmp_path / ".resume" / "step-00000004"
    good.mkdir()
    io.write_json(good / "state.json", {"step": 4, "fingerprint": "key", "metrics": []})
    assert latest_resume(tmp_path, "key") == good
    shutil.rmtree(tmp_path / ".resume")
