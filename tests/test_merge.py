import math
import shutil

import numpy as np
import torch
from safetensors.torch import load_file

import pytest

from mergemix import model as mm
from mergemix.merge import MergeError, check_shares, merge, merge_weights, partition_shares
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
    loaded = mm.load(tmp_path / "m").state_dict()  # and from_pretrained reads it back as the model
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


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


def test_refuses_checkpoints_without_a_seed_hash(tmp_path, tiny_model_config):
    """Two sidecars without seed_sha256 would otherwise pass the seed check as None == None."""
    for name, seed in (("a", 1), ("b", 2)):
        make_checkpoint(tmp_path / name, tiny_model_config, seed=seed, seed_sha=None)
    with pytest.raises(MergeError, match=r"a/mergemix.json names no seed_sha256"):
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


def test_rounding_to_bfloat16_needs_little_beyond_its_output():
    """The rounded tensor (2 bytes an element) is the only full-size allocation: rounding
    the whole float32 tensor at once took three times the accumulator's size on top."""
    import tracemalloc

    from mergemix.merge import to_stored

    acc = np.random.default_rng(0).standard_normal(4_000_000, dtype=np.float32)
    acc[[5, 70_000]] = np.nan
    tracemalloc.start()
    rounded = to_stored(acc, "BF16")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.6 * acc.nbytes, f"peak {peak / acc.nbytes:.2f}x the accumulator"
    expected = torch.from_numpy(acc).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(rounded[~np.isnan(acc)], expected[~np.isnan(acc)])
    assert (rounded[[5, 70_000]] == 0x7FC0).all()


@pytest.mark.parametrize("block", [None, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_rounds_as_torch_does_in_every_block(tmp_path, tiny_model_config, dtype, block, monkeypatch):
    """Checkpoints of each dtype: widened to float32, averaged, rounded back like torch's .to(dtype).

    The average is summed BLOCK elements at a time: the 4,099-token embedding (131,168
    elements) spans three default blocks, the last one partial, and with 1,000-element
    blocks every tensor but the smallest crosses block edges at odd offsets.
    """
    from safetensors.torch import save_file

    from mergemix import io, merge as merging

    if block:
        monkeypatch.setattr(merging, "BLOCK", block)
    states = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        model = make_checkpoint(tmp_path / name, tiny_model_config, seed=seed, vocab=4099)
        states[name] = {k: v.to(dtype) for k, v in model.state_dict().items()}
        save_file(states[name], tmp_path / name / mm.WEIGHTS, metadata={"format": "pt"})
        sidecar = mm.read_sidecar(tmp_path / name)
        io.write_json(tmp_path / name / mm.SIDECAR, {**sidecar, "weights_sha256": io.sha256_file(tmp_path / name / mm.WEIGHTS)})
    merge("macro", {"p": [tmp_path / "a", tmp_path / "b"], "q": [tmp_path / "c"]}, tmp_path / "m")
    merged = load_file(tmp_path / "m" / mm.WEIGHTS)
    for name, a in states["a"].items():
        acc = a.float() * 0.25
        acc += states["b"][name].float() * 0.25
        acc += states["c"][name].float() * 0.5
        assert merged[name].dtype == dtype
        assert torch.equal(merged[name], acc.to(dtype)), name


def test_a_corrupt_input_found_after_averaging_leaves_nothing(tmp_path, tiny_model_config):
    """Inputs are hashed while the average is formed: a mismatch still commits nothing."""
    make_checkpoint(tmp_path / "a", tiny_model_config, seed=1)
    make_checkpoint(tmp_path / "b", tiny_model_config, seed=2)
    weights = tmp_path / "b" / mm.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x01  # a flipped bit in the last tensor: the header and sizes stay valid
    weights.write_bytes(bytes(data))
    with pytest.raises(mm.CheckpointError, match="does not match the sha256"):
        merge("micro", {"p": [tmp_path / "a"], "q": [tmp_path / "b"]}, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_merging_does_not_import_torch():
    """`python -m mergemix.merge` starts without torch: its import costs more than a small merge."""
    import subprocess
    import sys

    code = "import sys, mergemix.merge; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "mergemix.merge imports torch"


def test_a_checkpoint_given_twice_or_weights_adding_to_zero_are_refused():
    with pytest.raises(MergeError, match="checkpoint x is given twice"):
        merge_weights("micro", {"a": ["x", "x"], "b": ["y"]})
    with pytest.raises(MergeError, match="partition 'a' has token count or weight 0"):
        merge_weights("weighted", {"a": ["x"], "b": ["y"]}, {"a": 0, "b": 0})
    # a negative count would pass a check of the total alone (weights -1 and 2)
    with pytest.raises(MergeError, match="partition 'a' has token count or weight -5"):
        merge_weights("weighted", {"a": ["x"], "b": ["y"]}, {"a": -5, "b": 10})


def test_token_counts_and_weights_are_for_weighted_merges_of_their_partitions():
    with pytest.raises(MergeError, match="--weight gives partition 'a' twice"):
        partition_shares([], ["a=1", "b=2", "a=3"])
    with pytest.raises(MergeError, match="--tokens gives partition 'a' twice"):
        partition_shares(["a=10", "a=20"], [])
    with pytest.raises(MergeError, match="--tokens ²: not an integer"):  # isdigit() takes '²', int() does not
        partition_shares(["a=²"], [])
    with pytest.raises(MergeError, match="--method weighted only, not micro"):
        check_shares("micro", partition_shares([], ["a=1"]))
    check_shares("weighted", partition_shares(["a=1", "b=1"], []))
    check_shares("micro", partition_shares([], []))


def test_perplexity_of_a_hopeless_model_is_inf_not_an_overflow():
    from mergemix.evaluate import perplexity

    assert perplexity(1.0) == math.exp(1.0)
    assert perplexity(1000.0) == math.inf
    assert math.isnan(perplexity(float("nan")))


def test_a_new_model_in_a_folder_drops_tensor_files_the_old_one_had(tmp_path, tiny_model_config):
    """A trained seed's optimizer state must not outlive it when an imported seed replaces it."""
    torch.manual_seed(0)
    model = mm.build(tiny_model_config, 512, 0)
    mm.save(model, tmp_path / "seed", {"kind": "seed"}, {"optimizer.safetensors": {"exp_avg.x": torch.zeros(2)}},
            is_seed=True)
    assert (tmp_path / "seed" / "optimizer.safetensors").is_file()
    mm.save(model, tmp_path / "seed", {"kind": "seed"}, is_seed=True)
    assert sorted(p.name for p in (tmp_path / "seed").iterdir()) == ["config.json", "mergemix.json", "model.safetensors"]


def test_a_merge_into_a_trained_models_folder_drops_its_optimizer_state_and_metrics(tmp_path, tiny_model_config):
    """`train --init` carries any optimizer.safetensors it finds: a seed's moments left
    beside merged weights would be applied to another model."""
    torch.manual_seed(0)
    model = mm.build(tiny_model_config, 512, 0)
    mm.save(model, tmp_path / "a", {"kind": "seed"}, {"optimizer.safetensors": {"exp_avg.x": torch.zeros(2)}},
            is_seed=True)
    (tmp_path / "a" / "train_metrics.csv").write_text("step,loss\n1,5.0\n")
    make_checkpoint(tmp_path / "b", tiny_model_config, seed=2, seed_sha=mm.read_sidecar(tmp_path / "a")["seed_sha256"])
    shutil.copytree(tmp_path / "a", tmp_path / "m")
    merge("micro", {"p": [tmp_path / "a"], "q": [tmp_path / "b"]}, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "mergemix.json", "model.safetensors"]
    assert mm.read_sidecar(tmp_path / "m")["kind"] == "merged"


def test_an_input_cut_short_during_the_average_is_named(tmp_path, tiny_model_config):
    """A file truncated after its header was checked (another process at work) ends the read, named."""
    from mergemix.merge import averaged

    for name, seed in (("a", 1), ("b", 2)):
        make_checkpoint(tmp_path / name, tiny_model_config, seed=seed)
    paths = [tmp_path / "a", tmp_path / "b"]
    layouts = {path: mm.read_layout(path) for path in paths}
    weights = tmp_path / "b" / mm.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(MergeError, match=r"b/model\.safetensors ended at byte \d+, before its header's end"):
        for _ in averaged({path: 0.5 for path in paths}, layouts, layouts[paths[0]]):
            pass
