import math

import numpy as np
import pytest
import torch

from mergemix import model as mm
from mergemix.evaluate import Domain, EvalError, document_windows, evaluate, prepare_domain, sample_documents, score_windows
from mergemix.tokenize import write_shard


def test_windows_predict_every_token_once():
    doc = np.arange(1, 80)
    windows = document_windows(doc, eos=0, context=32)
    targets = np.concatenate([y for _, y in windows])
    assert (targets == doc).all()
    assert all(len(x) <= 32 and len(x) == len(y) for x, y in windows)
    assert windows[0][0][0] == 0  # EOS is the first context token


def test_padded_batches_score_what_single_windows_score(tiny_model_config):
    """Batches pad short windows on the right without an attention mask: each token's loss
    must be the one it gets alone (tokens of padding placed before it would change it)."""
    torch.manual_seed(0)
    model = mm.build(tiny_model_config, 512, 0).eval()
    rng = np.random.default_rng(0)
    windows = [w for n in (31, 5, 17, 1, 64, 9) for w in document_windows(rng.integers(1, 512, n), 0, 32)]
    alone = sum(score_windows(model, [w], 1) for w in windows)
    batched = score_windows(model, windows, 4)
    assert len({len(x) for x, _ in windows}) > 3 and batched == pytest.approx(alone, rel=1e-6)
    # Reference by hand for one window: the summed NLL of its targets.
    x, y = windows[0]
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(x)[None]).logits[0]
    by_hand = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y), reduction="sum").item()
    assert score_windows(model, [windows[0]], 1) == pytest.approx(by_hand, rel=1e-6)


def test_document_sample_is_seeded_and_capped():
    lengths = np.array([50, 10, 400, 30, 30, 20])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    index = np.stack([starts, lengths * 4], axis=1)
    docs = sample_documents(index, int(lengths.sum()), max_docs=10, max_tokens=100, seed=0)
    assert docs == sample_documents(index, int(lengths.sum()), max_docs=10, max_tokens=100, seed=0)
    assert sum(b - a for a, b, _ in docs) <= 100
    assert len(sample_documents(index, int(lengths.sum()), max_docs=2, max_tokens=10**6, seed=0)) == 2


def test_uniform_logits_give_perplexity_equal_to_vocabulary(tmp_path, tiny_model_config, tokenizer_dir, texts):
    from mergemix.tokenize import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    write_shard(tok, texts["pathlib"][:10], tmp_path / "heldout", {"tokenizer_sha256": "x"})
    model = mm.build(tiny_model_config, len(tok), tok.eos_token_id).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    vocab = model.config.vocab_size
    rows = evaluate(model, [Domain("d", "ood", 10**6, tmp_path / "heldout")], max_docs=100, batch_size=4, seed=0)
    assert rows[0]["n_docs"] == 10
    assert rows[0]["ppl"] == pytest_approx(vocab)
    n_bytes = sum(len(t.encode()) for t in texts["pathlib"][:10])
    assert rows[0]["n_bytes"] == n_bytes
    assert rows[0]["bpb"] == pytest_approx(rows[0]["n_tokens"] * math.log2(vocab) / n_bytes)


@pytest.mark.parametrize("docs", [[], ["", ""]], ids=["no documents", "empty documents"])
def test_a_domain_without_text_is_named(tmp_path, tokenizer_dir, docs):
    from mergemix.tokenize import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    write_shard(tok, docs, tmp_path / "blank", {"tokenizer_sha256": "x"})
    with pytest.raises(EvalError, match="domain 'speeches'"):
        prepare_domain(Domain("speeches", "ood", 10**6, tmp_path / "blank"), 64, len(tok), max_docs=10, seed=0)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-5)
