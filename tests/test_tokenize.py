import numpy as np
import polars as pl
import pytest

from mergemix.tokenize import make_shards, open_tokens, segments, split_documents, unit_ranges


@pytest.mark.parametrize("n_units", [1, 3, 7])
def test_units_are_disjoint_and_cover_the_stream(n_units):
    unit_tokens = 1000
    n_tokens = n_units * unit_tokens
    covered = np.zeros(n_tokens, dtype=int)
    for u in range(n_units):
        ranges = unit_ranges(n_tokens, unit_tokens, u)
        assert sum(b - a for a, b in ranges) == unit_tokens
        for a, b in ranges:
            covered[a:b] += 1
    assert (covered == 1).all()


def test_small_partition_is_upsampled_to_a_full_unit():
    ranges = unit_ranges(350, 1000, 0)
    assert sum(b - a for a, b in ranges) == 1000
    counts = np.zeros(350, dtype=int)
    for a, b in ranges:
        counts[a:b] += 1
    # 1000 tokens from a 350-token stream: every token twice, the first 300 a third time.
    assert counts.min() == 2 and counts.max() == 3 and counts.sum() == 1000


def test_segments_respect_the_limit_and_keep_the_text(texts):
    doc = "\n\n".join(texts["argparse"])
    pieces = segments(doc, 500)
    assert all(len(p) <= 500 for p in pieces)
    assert "".join(pieces).replace("\n", "").replace(" ", "") == doc.replace("\n", "").replace(" ", "")


def test_split_is_document_level_seeded_and_disjoint():
    train, heldout = split_documents(50, 0.2, seed=3)
    assert sorted(train + heldout) == list(range(50)) and len(heldout) == 10
    assert (train, heldout) == split_documents(50, 0.2, seed=3)
    assert heldout != split_documents(50, 0.2, seed=4)[1]


def test_shards_hold_every_document_once(tmp_path, texts, tokenizer_dir):
    from mergemix.tokenize import load_tokenizer

    docs = texts["subprocess"]
    part = tmp_path / "src" / "p.parquet"
    part.parent.mkdir()
    pl.DataFrame({"text": docs}).write_parquet(part)
    meta = make_shards(part, tokenizer_dir, tmp_path / "tok", heldout_fraction=0.25, segment_chars=300, seed=0)
    tok = load_tokenizer(tokenizer_dir)
    decoded = []
    total_bytes = 0
    for split in ("train", "heldout"):
        tokens, index, side = open_tokens(tmp_path / "tok" / split)
        assert side["n_tokens"] == tokens.size == meta[split]["n_tokens"]
        stops = list(index[1:, 0]) + [tokens.size]
        for (start, n_bytes), stop in zip(index, stops):
            assert tokens[stop - 1] == tok.eos_token_id
            text = tok.decode(tokens[start : stop - 1].tolist())
            assert len(text.encode("utf-8")) == n_bytes
            decoded.append(text)
        total_bytes += side["n_bytes"]
    assert total_bytes == sum(len(d.encode("utf-8")) for d in docs) - sum(
        len(d.encode()) - sum(len(p.encode()) for p in segments(d, 300)) for d in docs
    )
    assert "".join(sorted(decoded)).replace("\n", "").replace(" ", "") != ""
    whole = "".join(decoded).replace("\n", "").replace(" ", "")
    assert sorted(whole) == sorted("".join(docs).replace("\n", "").replace(" ", ""))


def test_shards_written_batch_by_batch_are_the_bytes_of_one_batch(tmp_path, texts, tokenizer_dir, monkeypatch):
    """make_shards reads READ_ROWS documents, encodes ENCODE_BATCH segments and copies
    COPY_TOKENS tokens at a time; the split into batches changes no byte, and a rewrite
    with the same bytes keeps the files' times."""
    from mergemix import tokenize

    part = tmp_path / "src" / "p.parquet"
    part.parent.mkdir()
    pl.DataFrame({"text": texts["subprocess"] + texts["typing"]}).write_parquet(part)
    make_shards(part, tokenizer_dir, tmp_path / "whole", heldout_fraction=0.25, segment_chars=300, seed=0)
    monkeypatch.setattr(tokenize, "ENCODE_BATCH", 7)
    monkeypatch.setattr(tokenize, "READ_ROWS", 5)
    monkeypatch.setattr(tokenize, "COPY_TOKENS", 100)
    sides = make_shards(part, tokenizer_dir, tmp_path / "batched", heldout_fraction=0.25, segment_chars=300, seed=0)
    assert sides["train"]["n_docs"] > 7 * 3
    for name in ("train.bin", "train.idx", "train.json", "heldout.bin", "heldout.idx", "heldout.json"):
        assert (tmp_path / "batched" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "batched").iterdir()}
    make_shards(part, tokenizer_dir, tmp_path / "batched", heldout_fraction=0.25, segment_chars=300, seed=0)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "batched").iterdir()} == times


def test_train_shard_holds_the_documents_in_the_split_order(tmp_path, texts, tokenizer_dir):
    """The partition file is read front to back, but the train shard holds its documents in
    split_documents' shuffled order (a unit is then a sample of the whole partition), and
    the held-out shard in file order; checked against the tokenizer applied here."""
    from mergemix.tokenize import load_tokenizer

    docs = texts["typing"] + texts["argparse"]
    part = tmp_path / "src" / "p.parquet"
    part.parent.mkdir()
    pl.DataFrame({"text": docs}).write_parquet(part)
    make_shards(part, tokenizer_dir, tmp_path / "tok", heldout_fraction=0.2, segment_chars=400, seed=5)
    tok = load_tokenizer(tokenizer_dir)
    train, heldout = split_documents(len(docs), 0.2, seed=5)
    assert train != sorted(train)
    for split, ids in (("train", train), ("heldout", heldout)):
        pieces = [p for i in ids for p in segments(docs[i], 400)]
        expected = [t for p in pieces for t in (*tok(p, add_special_tokens=False)["input_ids"], tok.eos_token_id)]
        tokens, index, side = open_tokens(tmp_path / "tok" / split)
        assert tokens.tolist() == expected
        assert index[:, 1].tolist() == [len(p.encode("utf-8")) for p in pieces]
        assert side["n_source_docs"] == len(ids) and side["n_docs"] == len(pieces)


def test_data_table_counts_each_split_and_the_passes_of_its_units(tmp_path, texts, tokenizer_dir):
    """Two partitions from real text, one far smaller than its units: the table gives
    each split's documents and tokens as the shards hold them, and passes = units x
    unit_tokens over the train tokens (over 1: upsampled; under 1: partly unused)."""
    from mergemix.tokenize import DATA_COLUMNS, data_table

    folders = []
    for name, docs in (("big", texts["subprocess"]), ("small", texts["subprocess"][:4])):
        part = tmp_path / "src" / f"{name}.parquet"
        part.parent.mkdir(exist_ok=True)
        pl.DataFrame({"text": docs}).write_parquet(part)
        make_shards(part, tokenizer_dir, tmp_path / "tok" / name, heldout_fraction=0.25, segment_chars=10_000, seed=0)
        folders.append(tmp_path / "tok" / name)
    big = open_tokens(tmp_path / "tok" / "big" / "train")[0].size
    small = open_tokens(tmp_path / "tok" / "small" / "train")[0].size
    unit_tokens = big // 3
    csv_text, markdown = data_table([(folders[0], 2), (folders[1], 1)], unit_tokens)
    table = pl.read_csv(csv_text.encode())
    assert table.columns == DATA_COLUMNS
    assert table["partition"].to_list() == ["big", "small"] and table["units"].to_list() == [2, 1]
    assert table["train_tokens"].to_list() == [big, small]
    assert table["trained_tokens"].to_list() == [2 * unit_tokens, unit_tokens]
    assert table["passes"].to_list() == [round(2 * unit_tokens / big, 2), round(unit_tokens / small, 2)]
    assert table["passes"][0] < 1 < table["passes"][1]
    for row, docs in zip(table.iter_rows(named=True), (texts["subprocess"], texts["subprocess"][:4])):
        assert row["train_docs"] + row["heldout_docs"] == len(docs)
        assert row["heldout_tokens"] == open_tokens(tmp_path / "tok" / row["partition"] / "heldout")[0].size
    assert markdown.count("\n| ") == 3 and "| small | 1 | " in markdown
