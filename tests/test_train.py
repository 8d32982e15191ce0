"""Real DeepSpeed training of a tiny GPT-NeoX, through the command line the rules use."""

import json
import shutil
import subprocess
import sys

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from mergemix import model as mm
from mergemix.tokenize import make_shards

MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "context_length": 32, "vocab_size": None}
TRAIN = {"precision": "fp32", "zero_stage": 0, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0}


def run_train(*args):
    cmd = [sys.executable, "-m", "mergemix.train", "--model-json", json.dumps(MODEL), "--train-json", json.dumps(TRAIN),
           "--threads", "1", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, texts, tokenizer_dir):
    root = tmp_path_factory.mktemp("shards")
    for name in ("argparse", "typing"):
        part = root / "parts" / f"{name}.parquet"
        part.parent.mkdir(exist_ok=True)
        pl.DataFrame({"text": texts[name]}).write_parquet(part)
        make_shards(part, tokenizer_dir, root / name, heldout_fraction=0.1, segment_chars=2000, seed=0)
    return root


@pytest.fixture(scope="module")
def seed(shards, tokenizer_dir):
    out = shards / "seed"
    phase = {"batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3}
    done = run_train("--kind", "seed", "--tokenizer", tokenizer_dir, "--unit", f"{shards}/argparse/train:0",
                     "--unit-tokens", 4000, "--phase-json", json.dumps(phase), "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("unit_tokens", [700, 5000, 100_000])  # units that fit, and units upsampled
def test_windows_read_from_the_shards_are_the_units_cut_with_stride_context(shards, tokenizer_dir, unit_tokens):
    import numpy as np

    from mergemix.tokenize import open_tokens, tokenizer_hash, unit_ranges
    from mergemix.train import windows

    context = 32
    units = [f"{shards / 'argparse' / 'train'}:0", f"{shards / 'typing' / 'train'}:1", f"{shards / 'argparse' / 'train'}:2"]
    expected = []  # each unit's stream joined from its ranges, cut into windows one by one
    for spec in units:
        prefix, index = spec.rsplit(":", 1)
        tokens = np.asarray(open_tokens(prefix)[0])
        stream = np.concatenate([tokens[a:b] for a, b in unit_ranges(tokens.size, unit_tokens, int(index))])
        expected += [stream[i : i + context + 1] for i in range(0, stream.size - context, context)]
    data = windows(units, unit_tokens, context, tokenizer_hash(tokenizer_dir))
    assert len(data) == len(expected)
    order = np.random.default_rng(0).permutation(len(data))
    np.testing.assert_array_equal(data[order], np.stack(expected)[order])
    assert data[order[:5]].dtype == np.uint16


def test_seed_checkpoint_is_a_loadable_hf_folder_with_sidecar(seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(seed)
    assert model.config.use_parallel_residual and model.config.hidden_size == 32
    side = mm.read_sidecar(seed)
    assert side["seed_sha256"] == side["weights_sha256"] and side["steps"] == (3999 // 32) // 4
    assert side["optimizer_tensors_carried"] == 0 and side["tokens"] > 3000
    metrics = pl.read_csv(seed / "train_metrics.csv")
    assert metrics.height == side["steps"]
    # the loss falls: mean of the last 5 steps is below the first step
    assert metrics["loss"].tail(5).mean() < metrics["loss"][0] - 0.5
    assert (seed / "optimizer.safetensors").is_file()


def test_unit_continues_from_the_seed_with_its_optimizer_state(seed, shards, tokenizer_dir):
    out = shards / "unit"
    phase = {"batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 2}
    done = run_train("--kind", "unit", "--tokenizer", tokenizer_dir, "--init", seed, "--unit", f"{shards}/typing/train:0",
                     "--unit-tokens", 2000, "--phase-json", json.dumps(phase), "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    side = mm.read_sidecar(out)
    seed_side = mm.read_sidecar(seed)
    assert side["seed_sha256"] == seed_side["weights_sha256"]
    n_params = len(load_file(seed / mm.WEIGHTS))
    assert side["optimizer_tensors_carried"] == n_params
    lrs = pl.read_csv(out / "train_metrics.csv")["lr"].to_list()
    assert lrs[0] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(1e-3)  # re-warmed, then constant
    a, b = load_file(seed / mm.WEIGHTS), load_file(out / mm.WEIGHTS)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_micro_batches_accumulate_to_the_whole_batch(seed, shards, tokenizer_dir, tmp_path):
    """train.micro_batch splits each step's batch into forward passes whose gradients
    DeepSpeed averages: the same training as one pass, up to the order of float sums
    (the paper config's 64 windows of 2048 tokens do not fit one GPU in one pass)."""
    phase = {"batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3}
    split = dict(TRAIN, micro_batch=2)
    cmd = [sys.executable, "-m", "mergemix.train", "--model-json", json.dumps(MODEL), "--train-json", json.dumps(split),
           "--threads", "1", "--kind", "seed", "--tokenizer", str(tokenizer_dir), "--unit", f"{shards}/argparse/train:0",
           "--unit-tokens", "4000", "--phase-json", json.dumps(phase), "--out", str(tmp_path / "seed")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert mm.read_sidecar(tmp_path / "seed")["train"]["micro_batch"] == 2
    whole, micro = load_file(seed / mm.WEIGHTS), load_file(tmp_path / "seed" / mm.WEIGHTS)
    for name in whole:  # 31 AdamW steps apart by at most 2e-5 here
        torch.testing.assert_close(micro[name], whole[name], rtol=1e-3, atol=1e-4)
    assert any(not torch.equal(micro[k], whole[k]) for k in whole)  # two passes, other sums: not bit for bit
    a = pl.read_csv(seed / "train_metrics.csv")["loss"].to_list()
    b = pl.read_csv(tmp_path / "seed" / "train_metrics.csv")["loss"].to_list()
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    # a micro-batch that does not divide a process's share of the batch is refused, named
    done = subprocess.run([*cmd[:6], json.dumps(dict(TRAIN, micro_batch=3)), *cmd[7:-1], str(tmp_path / "bad")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "train.micro_batch (3)" in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert not (tmp_path / "bad" / mm.WEIGHTS).exists()


def test_damaged_seed_moments_are_refused_before_a_unit_trains(seed, shards, tokenizer_dir, tmp_path):
    """Every unit, ind and seq model carries the seed's AdamW moments over: one flipped
    bit there trained every model of a study from poisoned moments, without an error."""
    assert set(mm.read_sidecar(seed)["files_sha256"]) == {"optimizer.safetensors"}
    damaged = tmp_path / "seed"
    shutil.copytree(seed, damaged)
    moments = bytearray((damaged / "optimizer.safetensors").read_bytes())
    moments[-3] ^= 0x40
    (damaged / "optimizer.safetensors").write_bytes(bytes(moments))
    phase = {"batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 2}
    done = run_train("--kind", "unit", "--tokenizer", tokenizer_dir, "--init", damaged, "--unit", f"{shards}/typing/train:0",
                     "--unit-tokens", 2000, "--phase-json", json.dumps(phase), "--out", tmp_path / "unit")
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("error: "), done.stderr[-2000:]
    assert f"{damaged / 'optimizer.safetensors'} does not match the sha256" in done.stderr
    assert not (tmp_path / "unit").exists() or not list((tmp_path / "unit").glob("*.safetensors"))


def test_a_seed_whose_moments_are_gone_is_refused(seed, shards, tokenizer_dir, tmp_path):
    """The seed's sidecar records its optimizer state: without the file a unit would
    train from zero moments, not the seed's (paper A.3), and say nothing."""
    gone = tmp_path / "seed"
    shutil.copytree(seed, gone)
    (gone / "optimizer.safetensors").unlink()
    phase = {"batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 2}
    done = run_train("--kind", "unit", "--tokenizer", tokenizer_dir, "--init", gone, "--unit", f"{shards}/typing/train:0",
                     "--unit-tokens", 2000, "--phase-json", json.dumps(phase), "--out", tmp_path / "unit")
    assert done.returncode == 1, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and f"{gone / 'optimizer.safetensors'} is missing" in line, line
    assert not (tmp_path / "unit").exists()


def test_a_seed_with_tied_embeddings_imports_trains_and_merges(shards, tokenizer_dir, tmp_path):
    """GPT-2 ties its input and output embeddings: two state_dict keys on one tensor."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergemix.tokenize import load_tokenizer

    vocab = len(load_tokenizer(tokenizer_dir))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=vocab, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "seed").mkdir()
    (tmp_path / "seed" / "train_metrics.csv").write_text("step,tokens,loss,lr,elapsed_s\n1,64,9.0,0.001,1.0\n")
    done = run_train("--kind", "seed", "--tokenizer", tokenizer_dir, "--pretrained", tmp_path / "gpt2",
                     "--out", tmp_path / "seed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "seed" / "train_metrics.csv").exists()  # an earlier seed's: the import trained nothing
    phase = {"batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 2}
    done = run_train("--kind", "unit", "--tokenizer", tokenizer_dir, "--init", tmp_path / "seed",
                     "--unit", f"{shards}/typing/train:0", "--unit-tokens", 1000, "--phase-json", json.dumps(phase),
                     "--out", tmp_path / "unit")
    assert done.returncode == 0, done.stderr[-3000:]
    unit = load_file(tmp_path / "unit" / mm.WEIGHTS)
    assert torch.equal(unit["lm_head.weight"], unit["transformer.wte.weight"])  # trained as one tensor
    assert not torch.equal(unit["lm_head.weight"], load_file(tmp_path / "seed" / mm.WEIGHTS)["lm_head.weight"])
    done = subprocess.run([sys.executable, "-m", "mergemix.merge", "--method", "micro", "--model", f"a={tmp_path / 'seed'}",
                           "--model", f"b={tmp_path / 'unit'}", "--out", tmp_path / "merged"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = mm.load(tmp_path / "merged")
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()


def test_vocabulary_that_does_not_fit_is_refused_before_training(shards, tokenizer_dir, tmp_path):
    small = dict(MODEL, vocab_size=64)
    cmd = [sys.executable, "-m", "mergemix.train", "--model-json", json.dumps(small), "--train-json", json.dumps(TRAIN),
           "--kind", "seed", "--tokenizer", str(tokenizer_dir), "--unit", f"{shards}/argparse/train:0", "--unit-tokens", "500",
           "--phase-json", json.dumps({"batch_size": 4, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1}),
           "--out", str(tmp_path / "m")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "model.vocab_size is 64 but the tokenizer has" in done.stderr
    assert not (tmp_path / "m").exists()


def test_seq_on_two_data_parallel_ranks_matches_one_process(shards, seed, tokenizer_dir, tmp_path):
    """`--processes 2` goes through the DeepSpeed launcher (two CPU ranks, gloo) and trains the
    same model as one process: each rank takes half of every global batch."""
    phase = {"batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 2}
    units = ["--unit", f"{shards}/argparse/train:0", "--unit", f"{shards}/typing/train:0"]
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"seq-{n}"
        done = run_train("--kind", "seq", "--tokenizer", tokenizer_dir, "--init", seed, *units, "--unit-tokens", 1500,
                         "--phase-json", json.dumps(phase), "--processes", n, "--out", outs[n])
        assert done.returncode == 0, done.stderr[-3000:]
    assert mm.read_sidecar(outs[2])["hardware"]["world_size"] == 2
    assert mm.read_sidecar(outs[1])["hardware"]["world_size"] == 1
    one, two = load_file(outs[1] / mm.WEIGHTS), load_file(outs[2] / mm.WEIGHTS)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=2e-5, msg=name)
    loss1 = pl.read_csv(outs[1] / "train_metrics.csv")["loss"]
    loss2 = pl.read_csv(outs[2] / "train_metrics.csv")["loss"]
    assert loss1.len() == loss2.len() and (loss1 - loss2).abs().max() < 1e-4
    seed_weights = load_file(seed / mm.WEIGHTS)
    assert not torch.equal(one["lm_head.weight"], seed_weights["lm_head.weight"])  # it did train


def train_with(engine, *args):
    """run_train with other train settings (precision, ZeRO stage)."""
    cmd = [sys.executable, "-m", "mergemix.train", "--model-json", json.dumps(MODEL),
           "--train-json", json.dumps(dict(TRAIN, **engine)), "--threads", "1", *map(str, args)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_zero_carries_the_seeds_moments_as_stage_0_does(seed, shards, tokenizer_dir, tmp_path):
    """ZeRO keeps AdamW's moments in flat fp32 partitions, not per parameter: a unit trained
    under stage 1 must start from the seed's moments exactly as under stage 0, and so end
    with the same weights (moments lost on the way would give other weights)."""
    phase = {"batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 2}
    n_params = len(load_file(seed / mm.WEIGHTS))
    outs = {}
    for stage in (0, 1):
        outs[stage] = tmp_path / f"stage{stage}"
        train_with({"zero_stage": stage}, "--kind", "unit", "--tokenizer", tokenizer_dir, "--init", seed,
                   "--unit", f"{shards}/typing/train:0", "--unit-tokens", 2000,
                   "--phase-json", json.dumps(phase), "--out", outs[stage])
        assert mm.read_sidecar(outs[stage])["optimizer_tensors_carried"] == n_params
    zero, plain = load_file(outs[1] / mm.WEIGHTS), load_file(outs[0] / mm.WEIGHTS)
    for name in plain:
        torch.testing.assert_close(zero[name], plain[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_with_zero_saves_and_carries_moments(shards, tokenizer_dir, tmp_path):
    """The paper config's engine (bf16, ZeRO stage 1), on the CPU: the seed writes AdamW's
    moments for every parameter and a unit continues from them."""
    bf16 = {"precision": "bf16", "zero_stage": 1}
    seed_dir, unit_dir = tmp_path / "seed", tmp_path / "unit"
    train_with(bf16, "--kind", "seed", "--tokenizer", tokenizer_dir, "--unit", f"{shards}/argparse/train:0",
               "--unit-tokens", 2000, "--out", seed_dir,
               "--phase-json", json.dumps({"batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 3}))
    weights = load_file(seed_dir / mm.WEIGHTS)
    moments = load_file(seed_dir / "optimizer.safetensors")
    assert {f"exp_avg.{name}" for name in weights} <= set(moments)
    steps = mm.read_sidecar(seed_dir)["steps"]
    for name in weights:
        assert moments[f"exp_avg_sq.{name}"].dtype == torch.float32
        assert moments[f"exp_avg_sq.{name}"].abs().sum() > 0, name
        assert moments[f"step.{name}"].item() == steps
    train_with(bf16, "--kind", "unit", "--tokenizer", tokenizer_dir, "--init", seed_dir,
               "--unit", f"{shards}/typing/train:0", "--unit-tokens", 2000, "--out", unit_dir,
               "--phase-json", json.dumps({"batch_size": 4, "lr": 1e-3, "min_lr": 1e-3, "warmup_steps": 2}))
    assert mm.read_sidecar(unit_dir)["optimizer_tensors_carried"] == len(weights)
    unit = load_file(unit_dir / mm.WEIGHTS)
    assert any(not torch.equal(weights[k], unit[k]) for k in weights)
