"""Decontamination: exact answers on hand-made text, the Bloom filter's guarantees, and a
planted contaminated document that the workflow removes before tokenization."""

from __future__ import annotations

import copy
import json
import random
import string
import subprocess
import sys

import polars as pl
import pytest
import yaml

from mergemix import config as mc
from mergemix import decontaminate as dc
from mergemix.tokenize import EOS, load_tokenizer, make_shards, open_tokens, split_documents
from tests.conftest import REPO

THIRTEEN = "the committee reported that the new budget would cover every school in town"
TWELVE = "one two three four five six seven eight nine ten eleven twelve"


def test_words_normalise_case_punctuation_spacing_and_width():
    assert dc.words("Hello,   WORLD!\tDon't stop: 3.14 fine_tuned.") == [
        "hello", "world", "don't", "stop", "3.14", "fine_tuned"]
    # NFKC folds full-width letters and ligatures; case-folding folds German sharp s
    assert dc.words("Ｆｕｌｌ ﬁne STRASSE straße") == ["full", "fine", "strasse", "strasse"]
    assert dc.words("-- ... !!") == []


def test_paragraphs_are_lines_of_at_least_min_tokens_words():
    assert len(dc.words(THIRTEEN)) == 13 and len(dc.words(TWELVE)) == 12
    text = f"{TWELVE}\n\n  {THIRTEEN.upper()}!  \n{THIRTEEN[:-5]}"
    assert dc.paragraph_keys(text, 13) == [THIRTEEN]
    assert dc.paragraph_keys(text, 12) == [TWELVE, THIRTEEN, " ".join(dc.words(THIRTEEN)[:12])]
    assert dc.paragraph_keys("", 13) == []


def _filter(eval_docs: list[str], rate: float = 1e-6) -> dc.BloomFilter:
    keys = sorted({k for d in eval_docs for k in dc.paragraph_keys(d, 13)})
    bloom = dc.BloomFilter.sized(len(keys), rate)
    bloom.add(keys)
    return bloom


def test_a_shared_13_word_paragraph_removes_the_document_a_12_word_one_does_not():
    bloom = _filter([f"Intro line.\n{THIRTEEN}.\n{TWELVE}"])
    docs = [
        "Some other text.\nThe Committee reported, that the NEW budget would cover every school in TOWN!",
        f"Counting:\n{TWELVE}",  # only the short paragraph is shared
        f"Before {THIRTEEN} after",  # contains it, but the paragraph is not the same
        "An unrelated document\nwith two lines.",
        f"{THIRTEEN}\n{THIRTEEN}",  # two hits, one document
    ]
    remove, counts, examples = dc.contaminated(docs, bloom, 13)
    assert remove.tolist() == [True, False, False, False, True]
    assert counts == {"documents_in": 5, "documents_removed": 2, "documents_out": 3,
                      "paragraphs_checked": 4, "paragraph_hits": 3}
    assert examples == [{"document": 0, "paragraph": THIRTEEN}, {"document": 4, "paragraph": THIRTEEN}]
    # with a 12-word threshold the short paragraph counts too
    keys = sorted({k for k in dc.paragraph_keys(f"{THIRTEEN}\n{TWELVE}", 12)})
    bloom12 = dc.BloomFilter.sized(len(keys), 1e-6)
    bloom12.add(keys)
    assert dc.contaminated(docs, bloom12, 12)[0].tolist() == [True, True, False, False, True]


def test_filter_size_follows_the_textbook_formula():
    bloom = dc.BloomFilter.sized(1000, 0.01)
    # m = ceil(-1000 ln 0.01 / ln(2)^2) = 9586 bits, k = round(9.586 ln 2) = 7 hashes
    assert (bloom.n_bits, bloom.n_hashes, bloom.bits.size) == (9586, 7, 1199)
    assert dc.BloomFilter.sized(0, 1e-6).n_bits >= 64
    with pytest.raises(dc.DecontaminateError, match="false-positive rate"):
        dc.BloomFilter.sized(10, 1.5)


@pytest.mark.parametrize("n_items", [10, 42, 200])
def test_small_filters_keep_their_false_positive_rate(n_items):
    """Positions by double hashing (a + i b mod m) folded onto a few bits when b shared a
    factor with m and repeated whole at small m: a filter of 42 evaluation paragraphs
    at 1e-6 matched about 1 clean paragraph in 2,000 (5 of the 249 State of the Union
    addresses dropped against held-out Shakespeare alone)."""
    rng = random.Random(n_items)

    def item():
        return "".join(rng.choices(string.ascii_lowercase + " ", k=24))

    bloom = dc.BloomFilter.sized(n_items, 1e-6)
    members = [item() for _ in range(n_items)]
    bloom.add(members)
    assert bloom.contains(members).all()
    probes = [item() for _ in range(300_000)]
    # 300k probes at about 1e-6 (share of bits set ^ k): 0.3 hits expected; the old
    # positions gave 224, 47 and 11 here
    assert bloom.contains(probes).sum() <= 3
    assert bloom.false_positive_rate() < 3e-6


def test_a_filter_built_before_the_new_positions_still_reads_its_own_way(tmp_path):
    keys = dc.paragraph_keys(THIRTEEN, 13)
    old = dc.BloomFilter.sized(len(keys), 1e-6)
    old.hash = dc.LEGACY_HASH
    old.add(keys)
    old.save(tmp_path / "f.json", {})
    assert json.loads((tmp_path / "f.json").read_text())["hash"] == dc.LEGACY_HASH
    loaded, _ = dc.BloomFilter.load(tmp_path / "f.json")
    assert loaded.hash == dc.LEGACY_HASH and loaded.contains(keys).all()
    new = dc.BloomFilter.sized(len(keys), 1e-6)
    assert not (new.positions(keys) == old.positions(keys)).all()


def test_filter_has_no_false_negatives_and_its_false_positive_rate_is_as_configured():
    rng = random.Random(0)

    def item():
        return "".join(rng.choices(string.ascii_lowercase + " ", k=24))

    members = [item() for _ in range(20_000)]
    bloom = dc.BloomFilter.sized(len(members), 0.01)
    bloom.add(members)
    assert bloom.contains(members).all()
    assert bloom.contains(members[:5]).tolist() == [True] * 5
    known = set(members)
    others = [x for x in (item() for _ in range(200_000)) if x not in known]
    measured = bloom.contains(others).mean()
    # 200k trials at p = 0.01: standard error 0.00022, so 0.0085-0.0115 is about +-7 sigma
    assert 0.0085 < measured < 0.0115, measured
    assert bloom.false_positive_rate() == pytest.approx(0.01, rel=0.1)
    assert bloom.false_positive_rate() == pytest.approx(measured, rel=0.15)


def test_filter_round_trips_and_refuses_tampered_bits(tmp_path):
    bloom = _filter([THIRTEEN])
    side = bloom.save(tmp_path / "f.json", {"sets": {"x": {}}})
    loaded, meta = dc.BloomFilter.load(tmp_path / "f.json")
    assert meta == side and loaded.contains([THIRTEEN]).tolist() == [True]
    assert (loaded.n_bits, loaded.n_hashes) == (bloom.n_bits, bloom.n_hashes)
    raw = bytearray((tmp_path / "f.bin").read_bytes())
    raw[0] ^= 1
    (tmp_path / "f.bin").write_bytes(bytes(raw))
    with pytest.raises(dc.DecontaminateError, match="does not match its sidecar"):
        dc.BloomFilter.load(tmp_path / "f.json")


def test_seed_heldout_set_is_exactly_the_documents_the_shards_hold_out(tmp_path, tokenizer_dir, texts):
    """A seed_heldout OOD set is checked on the documents tokenize.make_shards holds out."""
    docs = texts["pathlib"][:30]
    pl.DataFrame({"text": docs}).write_parquet(tmp_path / "seed.parquet")
    make_shards(tmp_path / "seed.parquet", tokenizer_dir, tmp_path / "tokens", 0.2, 100_000, 7)
    chosen = dc.EvalSet.parse(f"shakespeare:0.2:7:{tmp_path / 'seed.parquet'}").documents()
    assert len(chosen) == 6
    tokens, _, _ = open_tokens(tmp_path / "tokens" / "heldout")
    decoded = load_tokenizer(tokenizer_dir).backend_tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
    assert decoded == "".join(d + EOS for d in chosen)
    # fraction 1: every document of an OOD set's own file
    assert dc.EvalSet.parse(f"x:1:0:{tmp_path / 'seed.parquet'}").documents() == docs


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mergemix.decontaminate", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_filter_partition_and_table(tmp_path):
    pl.DataFrame({"text": [f"Evaluation.\n{THIRTEEN}", "x"]}).write_parquet(tmp_path / "ood.parquet")
    (tmp_path / "src").mkdir()
    pl.DataFrame({"text": [THIRTEEN, "clean one", "clean two"], "year": [1, 2, 3]}).write_parquet(
        tmp_path / "src" / "part.parquet")
    done = _cli("filter", "--eval", "evalset:1:0:ood.parquet", "--min-paragraph-tokens", "13",
                "--false-positive-rate", "1e-6", "--out", "f/filter.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "f/filter.json").read_text())
    assert meta["sets"] == {"evalset": {"documents": 2, "paragraphs": 1, "distinct": 1}} and meta["n_items"] == 1
    done = _cli("partition", "--input", "src/part.parquet", "--filter", "f/filter.json", "--out", "out/part.parquet",
                "--report", "out/part.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    kept = pl.read_parquet(tmp_path / "out/part.parquet")
    assert kept.to_dict(as_series=False) == {"text": ["clean one", "clean two"], "year": [2, 3]}
    report = json.loads((tmp_path / "out/part.json").read_text())
    assert (report["partition"], report["documents_removed"], report["against"]) == ("src/part", 1, ["evalset"])
    done = _cli("table", "--filter", "f/filter.json", "--out-csv", "t.csv", "--out-md", "t.md", "out/part.json",
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.csv").read_text().splitlines() == [
        "source,partition,documents_in,documents_removed,documents_out,paragraphs_checked,paragraph_hits",
        "src,part,3,1,2,1,1"]
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("Decontamination:") and "evalset (1 paragraphs)" in md and "| src | part | 3 | 1 | 2 | 1 | 1 |" in md


def test_a_partition_is_checked_and_written_batch_by_batch(tmp_path, monkeypatch):
    """decontaminate_partition reads READ_ROWS documents at a time: batches change no kept
    document, count or example, and an example names its document's row in the partition."""
    pl.DataFrame({"text": [f"Evaluation.\n{THIRTEEN}"]}).write_parquet(tmp_path / "ood.parquet")
    dc.build_filter([dc.EvalSet("evalset", tmp_path / "ood.parquet", 1.0, 0)], 13, 1e-6, tmp_path / "filter.json")
    docs = [f"doc {i}" if i % 3 else f"doc {i}\n{THIRTEEN.upper()}" for i in range(20)]
    (tmp_path / "src").mkdir()
    pl.DataFrame({"text": docs, "row": list(range(20))}).write_parquet(tmp_path / "src" / "p.parquet")
    whole = dc.decontaminate_partition(tmp_path / "src" / "p.parquet", tmp_path / "filter.json",
                                       tmp_path / "whole.parquet", tmp_path / "whole.json")
    monkeypatch.setattr(dc, "READ_ROWS", 2)
    batched = dc.decontaminate_partition(tmp_path / "src" / "p.parquet", tmp_path / "filter.json",
                                         tmp_path / "batched.parquet", tmp_path / "batched.json")
    assert batched == whole
    assert whole["documents_removed"] == 7  # rows 0, 3, ..., 18; the first EXAMPLES (5) quoted
    assert [e["document"] for e in whole["removed_examples"]] == [0, 3, 6, 9, 12]
    kept = pl.read_parquet(tmp_path / "batched.parquet")
    assert kept["row"].to_list() == [i for i in range(20) if i % 3] == pl.read_parquet(tmp_path / "whole.parquet")["row"].to_list()


def test_a_partition_emptied_by_decontamination_is_one_clear_error(tmp_path):
    pl.DataFrame({"text": [THIRTEEN]}).write_parquet(tmp_path / "ood.parquet")
    (tmp_path / "docs").mkdir()
    pl.DataFrame({"text": [THIRTEEN, f"{THIRTEEN}\nmore"]}).write_parquet(tmp_path / "docs" / "alpha.parquet")
    assert _cli("filter", "--eval", "evalset:1:0:ood.parquet", "--min-paragraph-tokens", "13",
                "--false-positive-rate", "1e-6", "--out", "filter.json", cwd=tmp_path).returncode == 0
    done = _cli("partition", "--input", "docs/alpha.parquet", "--filter", "filter.json", "--out", "out/alpha.parquet",
                "--report", "out/alpha.json", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "removes all 2 documents of partition docs/alpha" in done.stderr and "evalset" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # one left: the shards could not hold one out, and would blame the partition's definition
    pl.DataFrame({"text": [THIRTEEN, f"{THIRTEEN}\nmore", "clean"]}).write_parquet(tmp_path / "docs" / "beta.parquet")
    done = _cli("partition", "--input", "docs/beta.parquet", "--filter", "filter.json", "--out", "out/beta.parquet",
                "--report", "out/beta.json", cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert "leaves 1 of the 3 documents of partition docs/beta" in done.stderr and "evalset" in done.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    done = _cli("partition", "--input", "docs/nope.parquet", "--filter", "filter.json", "--out", "o.parquet",
                "--report", "o.json", cwd=tmp_path)
    assert done.returncode == 1 and "partition file docs/nope.parquet is missing" in done.stderr


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(against=["parliament", "nope"]), "decontaminate.against names 'nope'"),
    (lambda d: d.update(against=[]), "decontaminate.against is empty"),
    (lambda d: d.update(min_paragraph_tokens=0), "decontaminate.min_paragraph_tokens"),
    (lambda d: d.update(false_positive_rate=0.5), "decontaminate.false_positive_rate"),
])
def test_config_errors_name_the_key(change, message):
    config = mc.load(str(REPO / "config.yaml"))
    broken = copy.deepcopy(config)
    change(broken["decontaminate"])
    with pytest.raises(mc.ConfigError, match=message):
        mc.validate(broken)
    # switched off, the list is not checked against eval.ood
    broken["decontaminate"].update(enabled=False, against=["nope"], min_paragraph_tokens=13, false_positive_rate=1e-6)
    mc.validate(broken)


# --- the workflow -------------------------------------------------------------------------

SHARDS = [f"work/tokens/docs/{p}/{split}.json" for p in ("alpha", "beta", "gamma") for split in ("train", "heldout")]
TARGETS = [*SHARDS, "results/tables/decontamination.csv"]


def _line(docs: list[str], words: int = 13, avoid: frozenset = frozenset()) -> str:
    """The first line of >= 13 words in `docs` whose key is not in `avoid`, or its first
    `words` words when fewer than 13."""
    for doc in docs:
        for line in doc.split("\n"):
            found = dc.words(line)
            if len(found) >= 13 and " ".join(found) not in avoid:
                return line if words >= 13 else " ".join(found[:words])
    raise AssertionError("no line of 13 words")


def _job_counts(printed: str) -> dict[str, int]:
    """Rule -> jobs from the first 'Job stats' table of `snakemake -n`."""
    counts = {}
    for line in printed.split("Job stats:", 1)[1].splitlines()[3:]:
        if not line.strip():
            break
        rule, n = line.split()
        counts[rule] = int(n)
    return counts


def _shard_text(root, partition: str) -> str:
    tok = load_tokenizer(root / "work/tokenizer").backend_tokenizer
    return "".join(tok.decode(open_tokens(root / f"work/tokens/docs/{partition}/{split}")[0].tolist(),
                              skip_special_tokens=False)
                   for split in ("train", "heldout"))


@pytest.mark.slow
def test_workflow_drops_a_planted_contaminated_document(tmp_path):
    from tests.conftest import stdlib_docstrings
    from tests.test_workflow import MODULES, snakemake, tiny_config, write_data

    root = tmp_path
    write_data(root, stdlib_docstrings([m for ms in MODULES.values() for m in ms]))
    config = tiny_config(root)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(root, "work/partitions/seed/seed.parquet", "work/partitions/ood/netdocs.parquet")
    assert done.returncode == 0, done.stderr[-3000:]
    ood = pl.read_parquet(root / "work/partitions/ood/netdocs.parquet")["text"].to_list()
    seed = pl.read_parquet(root / "work/partitions/seed/seed.parquet")["text"].to_list()
    train_ids, held_ids = split_documents(len(seed), config["seed"]["heldout_fraction"], config["random_seed"])
    held_keys = frozenset(k for i in held_ids for k in dc.paragraph_keys(seed[i], 13))
    planted = {
        # an OOD line, re-cased and re-punctuated: removed from alpha
        "alpha": ("PLANTED-ALPHA-MARKER zebra quasar", _line(ood).upper().replace(" ", " ,  "), "typing"),
        # the first 12 words of an OOD line: kept in beta
        "beta": ("PLANTED-BETA-MARKER zebra quasar", _line(ood, 12), "pathlib"),
        # a line of the seed's held-out split (the `seedheld` OOD set): removed from gamma
        "gamma": ("PLANTED-GAMMA-MARKER zebra quasar", _line([seed[i] for i in held_ids]), "functools"),
        # a line of a seed *training* document is no evaluation text: kept in gamma
        "gamma-kept": ("PLANTED-KEPT-MARKER zebra quasar", _line([seed[i] for i in train_ids], avoid=held_keys),
                       "functools"),
    }
    with open(root / "data/docs.jsonl", "a") as fh:
        for marker, line, topic in planted.values():
            fh.write(json.dumps({"body": f"{marker} opens this document.\n{line}\nIt ends here.", "topic": topic}) + "\n")

    done = snakemake(root, *TARGETS)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pl.read_csv(root / "results/tables/decontamination.csv")
    assert table["partition"].to_list() == ["alpha", "beta", "gamma"]
    assert table["documents_removed"].to_list() == [1, 0, 1]
    assert table["paragraph_hits"].to_list() == [1, 0, 1]
    inputs = {p: pl.read_parquet(root / f"work/partitions/docs/{p}.parquet").height for p in ("alpha", "beta", "gamma")}
    assert table["documents_in"].to_list() == list(inputs.values())
    assert (table["documents_out"] == table["documents_in"] - table["documents_removed"]).all()
    # The removed documents are in no shard; the kept ones are.
    assert "PLANTED-ALPHA-MARKER" not in _shard_text(root, "alpha")
    assert "PLANTED-BETA-MARKER" in _shard_text(root, "beta")
    gamma = _shard_text(root, "gamma")
    assert "PLANTED-GAMMA-MARKER" not in gamma and "PLANTED-KEPT-MARKER" in gamma
    assert "netdocs" in (root / "results/tables/decontamination.md").read_text()

    # decontaminate.against is a fixed list: a new OOD set outside it changes no training data ...
    extra = [d for ds in stdlib_docstrings(["json/decoder", "csv"]).values() for d in ds]
    pl.DataFrame({"body": extra + [f"intro\n{_line(ood)}"]}).write_parquet(root / "data/ood2.parquet")
    config["eval"]["ood"]["moredocs"] = {"load": {"path": "parquet", "data_files": ["data/ood2.parquet"]},
                                         "text_column": "body"}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(root, "-n", *TARGETS)
    assert done.returncode == 0 and "Nothing to be done" in done.stdout + done.stderr, done.stdout[-2000:]
    # ... and naming it there reruns decontamination and tokenization of every partition.
    config["decontaminate"]["against"].append("moredocs")
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(root, "-n", *TARGETS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _job_counts(done.stdout) == {"partition": 1, "eval_filter": 1, "decontaminate": 3, "shards": 3,
                                        "decontamination_table": 1, "total": 9}
