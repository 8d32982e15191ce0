import torch
from safetensors.torch import load_file

import pytest

from mergemix import model as mm
from mergemix.merge import MergeError, merge, merge_weights
from tests.conftest import make_checkpoint


def test_weights_of_each_method():
    groups = {"a": ["a0", "a1", "a2"], "b": ["b0"]}
    assert merge_weights("micro", groups) == {k: 0.25 for k in ["a0", "a1", "a2", "b0"]}
    macro = merge_weights("macro", groups)
    assert macro["b0"] == 0.5 and macro["a0"] == pytest.approx(1 / 6)
    weighted = merge_weights("weighted", groups, {"a": 300, "b": 100})
    assert weighted["b0"] == 0.25 and weighted["a1"] == pytest.approx(0.25)
    for w in (macro, weighted):
        assert sum(w.values()) == pytest.approx(1.0)


def test_averaging_identical_models_returns_the_model(tmp_path, tiny_model_config):
    original = make_checkpoint(tmp_path / "a", tiny_model_config, seed=1)
    make_checkpoint(tmp_path / "b", tiny_model_config, seed=1)
    merge("micro", {"p": [tmp_path / "a"], "q": [tmp_path / "b"]}, tmp_path / "m")
    merged = load_file(tmp_path / "m" / mm.WEIGHTS)
    for name, tensor in original.state_dict().items():
        assert torch.equal(merged[name], tensor), name
    assert mm.load(tmp_path / "m") is not None


def test_average_of_two_models_is_their_mean(tmp_path, tiny_model_config):
    a = make_checkpoint(tmp_path / "a", tiny_model_config, seed=1).state_dict()
    b = make_checkpoint(tmp_path / "b", tiny_model_config, seed=2).state_dict()
    merge("weighted", {"p": [tmp_path / "a"], "q": [tmp_path / "b"]}, tmp_path / "m", {"p": 3, "q": 1})
    merged = load_file(tmp_path / "m" / mm.WEIGHTS)
    for name in a:
        torch.testing.assert_close(merged[name], 0.75 * a[name] + 0.25 * b[name], rtol=0, atol=1e-6)


def test_refuses_other_seed(tmp_path, tiny_model_config):
    make_checkpoint(tmp_path / "a", tiny_model_config, seed=1, seed_sha="1" * 64)
    make_checkpoint(tmp_path / "b", tiny_model_config, seed=2, seed_sha="2" * 64)
    with pytest.raises(MergeError, match="only models of one seed"):
        merge("micro", {"p": [tmp_path / "a"], "q": [tmp_path / "b"]}, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_refuses_other_shape_naming_the_tensor(tmp_path, tiny_model_config):
    from dataclasses import replace

    make_checkpoint(tmp_path / "a", tiny_model_config, seed=1)
    make_checkpoint(tmp_path / "b", replace(tiny_model_config, intermediate_size=128), seed=1)
    with pytest.raises(MergeError, match="intermediate_size"):
        merge("micro", {"p": [tmp_path / "a"], "q": [tmp_path / "b"]}, tmp_path / "m")
    # Same config.json but a tensor of another shape: the error names the tensor.
    cfg = (tmp_path / "a" / "config.json").read_text()
    (tmp_path / "b" / "config.json").write_text(cfg)
    with pytest.raises(MergeError, match=r"tensor 'gpt_neox\.layers\.0\.mlp\.dense_4h_to_h\.weight' has shape"):
        merge("micro", {"p": [tmp_path / "a"], "q": [tmp_path / "b"]}, tmp_path / "m")
    assert not (tmp_path / "m").exists()
