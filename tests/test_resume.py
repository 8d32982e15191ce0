"""Training survives SIGKILL and SIGTERM: a rerun resumes and ends bit for bit where an
uninterrupted run ends (CPU, fp32, same thread count)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from mergemix import model as mm
from mergemix.tokenize import make_shards

MODEL = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "intermediate_size": 128, "context_length": 64, "vocab_size": None}
TRAIN = {"precision": "fp32", "zero_stage": 0, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0,
         "checkpoint_every": 4}
PHASE = {"batch_size": 8, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 5}


@pytest.fixture(scope="module")
def shard(tmp_path_factory, texts, tokenizer_dir):
    root = tmp_path_factory.mktemp("resume")
    part = root / "parts" / "docs.parquet"
    part.parent.mkdir()
    pl.DataFrame({"text": [t for docs in texts.values() for t in docs]}).write_parquet(part)
    make_shards(part, tokenizer_dir, root / "docs", heldout_fraction=0.1, segment_chars=2000, seed=0)
    return root / "docs" / "train"


def command(shard, tokenizer_dir, out, kind="seed", **engine):
    return [sys.executable, "-m", "mergemix.train", "--kind", kind, "--tokenizer", str(tokenizer_dir),
            "--unit", f"{shard}:0", "--unit-tokens", "40000", "--model-json", json.dumps(MODEL),
            "--train-json", json.dumps(dict(TRAIN, **engine)), "--phase-json", json.dumps(PHASE), "--threads", "1",
            "--out", str(out)]


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(shard, tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "model"
    run(command(shard, tokenizer_dir, out))
    assert not (out / ".resume").exists()
    return out


def assert_same_weights(a, b):
    wa, wb = load_file(a / mm.WEIGHTS), load_file(b / mm.WEIGHTS)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    la = pl.read_csv(a / "train_metrics.csv")["loss"].to_list()
    lb = pl.read_csv(b / "train_metrics.csv")["loss"].to_list()
    assert la == lb


def start_and_signal(cmd, out, after_step, sig, group=False):
    """Start training; once a resume state at or after `after_step` exists, send `sig`
    (with `group`, to every process the command started, as Slurm signals a job step)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=group)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in (out / ".resume").glob("step-*")] if (out / ".resume").exists() else []
        if steps and max(steps) >= after_step:
            time.sleep(random.uniform(0, 0.05))  # land somewhere inside a later step
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)
            break
        time.sleep(0.002)
    proc.wait(timeout=120)
    return proc


def test_sigkill_at_random_steps_resumes_bit_for_bit(shard, tokenizer_dir, reference, tmp_path):
    total = mm.read_sidecar(reference)["steps"]
    rng = random.Random(os.environ.get("MERGEMIX_KILL_SEED", time.time_ns()))
    points = sorted(rng.sample(range(TRAIN["checkpoint_every"], total - 6), 3))
    print("kill points (steps):", points)
    for point in points:
        out = tmp_path / f"killed-{point}"
        proc = start_and_signal(command(shard, tokenizer_dir, out), out, point, signal.SIGKILL)
        assert proc.returncode == -signal.SIGKILL, f"training ended before the kill at {point}"
        assert not (out / mm.WEIGHTS).exists()
        resumed = run(command(shard, tokenizer_dir, out))
        assert "resuming seed" in resumed.stderr
        assert_same_weights(reference, out)
        assert not (out / ".resume").exists()


def test_sigterm_saves_promptly_and_a_rerun_resumes(shard, tokenizer_dir, reference, tmp_path):
    out = tmp_path / "preempted"
    proc = start_and_signal(command(shard, tokenizer_dir, out), out, 8, signal.SIGTERM)
    stderr = proc.stderr.read()
    assert proc.returncode == 143, stderr[-2000:]
    # the state saved on SIGTERM is the newest one, at the step the log names
    saved = sorted(p.name for p in (out / ".resume").glob("step-*"))
    step = int(stderr.split("SIGTERM: saved state at step ")[1].split()[0])
    assert saved[-1] == f"step-{step:08d}" and step >= 8
    assert not (out / mm.WEIGHTS).exists()
    run(command(shard, tokenizer_dir, out))
    assert_same_weights(reference, out)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_newest_state_falls_back_to_the_one_before(damage, shard, tokenizer_dir, reference, tmp_path):
    """A crash of the node can leave the newest state's files cut short; the rerun
    resumes from the state before it (a traceback on every rerun before)."""
    out = tmp_path / "crashed"
    proc = start_and_signal(command(shard, tokenizer_dir, out), out, 8, signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr.read()[-2000:]
    older, newest = sorted((out / ".resume").glob("step-*"))[-2:]
    weights = newest / mm.WEIGHTS
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:
        data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    resumed = run(command(shard, tokenizer_dir, out))
    assert f"ignoring resume state {newest}" in resumed.stderr, resumed.stderr[-2000:]
    assert f"resuming seed from {older}" in resumed.stderr
    assert_same_weights(reference, out)


@pytest.mark.parametrize("engine", [{}, {"precision": "bf16", "zero_stage": 1}], ids=["fp32", "bf16-zero1"])
def test_continued_pretraining_resumes_bit_for_bit_and_says_what_it_carried(engine, shard, tokenizer_dir, reference,
                                                                            tmp_path):
    """A unit model carries the seed's AdamW moments; killed and rerun, it resumes from its
    own state (not the seed's moments: under ZeRO, loading both would leave AdamW with
    zero moments) and ends as an uninterrupted run does, sidecar included."""
    def unit(out):  # the last --unit-tokens counts: half the seed's
        return [*command(shard, tokenizer_dir, out, kind="unit", **engine), "--init", str(reference),
                "--unit-tokens", "20000"]
    whole = tmp_path / "whole"
    run(unit(whole))
    out = tmp_path / "killed"
    proc = start_and_signal(unit(out), out, TRAIN["checkpoint_every"], signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "training ended before the kill"
    assert "resuming unit" in run(unit(out)).stderr
    assert_same_weights(whole, out)
    a, b = mm.read_sidecar(whole), mm.read_sidecar(out)
    assert a["optimizer_tensors_carried"] > 0
    for key in ("optimizer_tensors_carried", "tokens", "steps", "seed_sha256", "weights_sha256"):
        assert a[key] == b[key], key


def test_state_from_other_settings_is_not_resumed(shard, tokenizer_dir, reference, tmp_path):
    out = tmp_path / "changed"
    proc = start_and_signal(command(shard, tokenizer_dir, out), out, 4, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    cmd = command(shard, tokenizer_dir, out)
    cmd[cmd.index("--phase-json") + 1] = json.dumps(dict(PHASE, lr=1e-3))
    done = run(cmd)
    assert "ignoring resume state" in done.stderr and "resuming" not in done.stderr


def test_changing_checkpoint_every_still_resumes(shard, tokenizer_dir, reference, tmp_path):
    """checkpoint_every only decides when states are written: a state written under another
    value is resumed, and the run still ends bit for bit where the reference does."""
    out = tmp_path / "every"
    proc = start_and_signal(command(shard, tokenizer_dir, out), out, 4, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    done = run([*command(shard, tokenizer_dir, out), "--checkpoint-every", "6"])
    assert "resuming seed" in done.stderr
    assert_same_weights(reference, out)


def test_bf16_with_zero_resumes_bit_for_bit(shard, tokenizer_dir, tmp_path):
    """The paper config's engine (bf16, ZeRO stage 1): the resume state holds ZeRO's fp32
    copies of the weights and its moments, so a preempted run ends where an uninterrupted
    one does (bf16 weights alone would lose the fp32 copies' low bits)."""
    engine = {"precision": "bf16", "zero_stage": 1}
    reference = tmp_path / "reference"
    run(command(shard, tokenizer_dir, reference, **engine))
    out = tmp_path / "preempted"
    proc = start_and_signal(command(shard, tokenizer_dir, out, **engine), out, 8, signal.SIGTERM)
    assert proc.returncode == 143, proc.stderr.read()[-2000:]
    assert "resuming seed" in run(command(shard, tokenizer_dir, out, **engine)).stderr
    assert_same_weights(reference, out)


def test_an_imported_seed_with_dropout_resumes_bit_for_bit(shard, tokenizer_dir, tmp_path):
    """A GPT-2 seed (seed.pretrained) keeps its dropout of 0.1: the masks come from the
    random state, which each step draws afresh from (seed, step, rank), so a resumed
    run draws the masks the uninterrupted one drew. Its metrics keep their columns, and
    a staging folder a killed save left behind is cleared by the next save."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergemix.tokenize import load_tokenizer

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(load_tokenizer(tokenizer_dir)),
                                      n_positions=64, bos_token_id=0, eos_token_id=0))
    assert gpt2.config.resid_pdrop > 0
    gpt2.save_pretrained(tmp_path / "gpt2")
    run([sys.executable, "-m", "mergemix.train", "--kind", "seed", "--tokenizer", str(tokenizer_dir),
         "--pretrained", str(tmp_path / "gpt2"), "--out", str(tmp_path / "seed")])

    def unit(out):
        return [*command(shard, tokenizer_dir, out, kind="unit"), "--init", str(tmp_path / "seed"),
                "--unit-tokens", "20000"]
    whole = tmp_path / "whole"
    run(unit(whole))
    out = tmp_path / "killed"
    stale = out / ".resume" / ".step-00000002.abcd1234.tmp"
    stale.mkdir(parents=True)
    (stale / mm.WEIGHTS).write_bytes(b"half a state")
    proc = start_and_signal(unit(out), out, TRAIN["checkpoint_every"], signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "training ended before the kill"
    assert not stale.exists()
    assert "resuming unit" in run(unit(out)).stderr
    assert_same_weights(whole, out)
    header = (out / "train_metrics.csv").read_text().splitlines()[0]
    assert header == (whole / "train_metrics.csv").read_text().splitlines()[0] == "step,tokens,loss,lr,elapsed_s"
    elapsed = pl.read_csv(out / "train_metrics.csv")["elapsed_s"].to_list()
    assert elapsed == sorted(elapsed)  # the resumed attempt counts on from the first one's time


@pytest.fixture(scope="module")
def two_ranks(shard, tokenizer_dir, tmp_path_factory):
    """An uninterrupted run on two data-parallel ranks under ZeRO stage 1 (bf16)."""
    out = tmp_path_factory.mktemp("two-ranks") / "model"
    run(command(shard, tokenizer_dir, out, precision="bf16", zero_stage=1) + ["--processes", "2"])
    return out


@pytest.mark.parametrize("group", [True, False], ids=["slurm-signals-the-step", "kill-the-command"])
def test_two_ranks_preempted_under_zero_resume_bit_for_bit(group, shard, tokenizer_dir, two_ranks, tmp_path):
    """Under ZeRO every tensor of a resume state is gathered on both ranks, one at a time,
    while rank 0 writes it. A SIGTERM to every process (Slurm's preemption) or to the
    command alone (`kill PID`) reaches the ranks through the DeepSpeed launcher; the
    command returns only after they saved, with 143, and a rerun ends where the
    uninterrupted run did."""
    out = tmp_path / "preempted"
    cmd = command(shard, tokenizer_dir, out, precision="bf16", zero_stage=1) + ["--processes", "2"]
    proc = start_and_signal(cmd, out, 8, signal.SIGTERM, group=group)
    stderr = proc.stderr.read()
    assert proc.returncode == 143, stderr[-3000:]
    assert "SIGTERM: saved state at step" in stderr
    assert not (out / mm.WEIGHTS).exists()
    assert "resuming seed" in run(cmd).stderr
    assert_same_weights(two_ranks, out)


def test_a_merge_killed_at_any_moment_leaves_a_complete_checkpoint_or_none(tmp_path, tiny_model_config):
    """SIGKILL a merge at random moments: its output is absent or verifies; a rerun clears the debris."""
    from tests.conftest import make_checkpoint

    for seed in (1, 2, 3):
        make_checkpoint(tmp_path / f"m{seed}", tiny_model_config, seed)
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "mergemix.merge", "--method", "micro", "--out", str(out)]
    cmd += [arg for s in (1, 2, 3) for arg in ("--model", f"p{s}={tmp_path / f'm{s}'}")]
    rng = random.Random(os.environ.get("MERGEMIX_KILL_SEED", time.time_ns()))
    landed = 0  # kills that hit a merge while it was writing
    for _ in range(8):
        debris = set(tmp_path.glob(".merged.*.tmp"))  # an earlier kill's, which this merge clears
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not set(tmp_path.glob(".merged.*.tmp")) - debris:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.01))  # somewhere inside the write
        proc.kill()
        proc.wait()
        # model.safetensors, the file the workflow watches, lands last: if it is there,
        # the folder is complete and its sidecar describes it.
        if (out / mm.WEIGHTS).exists():
            mm.verify(out)
        else:
            assert not out.exists() or not list(out.iterdir()), "a killed merge left files under its final name"
        landed += proc.returncode == -signal.SIGKILL and bool(set(tmp_path.glob(".merged.*.tmp")) - debris)
        shutil.rmtree(out, ignore_errors=True)
    assert landed, "no kill landed while a merge was writing"
    run(cmd)
    mm.verify(out)
    assert not list(tmp_path.glob(".merged.*.tmp")), "debris of killed merges must be cleared by the next one"


def test_states_of_earlier_settings_never_crowd_out_a_new_runs(tmp_path):
    """After a NaN stop and a rerun with another learning rate, the old run's states sit at
    higher steps. Keeping "the newest two" by step would delete each new state as it is
    written; the new run's own newest two are what must stay."""
    from mergemix.io import TensorStream
    from mergemix.train import drop_resume_from, latest_resume, save_resume

    def stream(name):
        return TensorStream({name: ("F32", (3,))}, iter([(name, torch.ones(3).numpy())]))

    for step in (450, 500):
        save_resume(tmp_path, stream("w"), stream("exp_avg.w"), step, [], key="old")
    for step in (50, 100, 150):
        save_resume(tmp_path, stream("w"), stream("exp_avg.w"), step, [], key="new")
    states = sorted(p.name for p in (tmp_path / ".resume").iterdir())
    assert states == ["step-00000100", "step-00000150"], states
    assert latest_resume(tmp_path, "new").name == "step-00000150"
    # A NaN at step 120 drops this run's later state and names its last good one.
    assert drop_resume_from(tmp_path, 120, "new").name == "step-00000100"


def test_a_tied_embedding_model_writes_resume_states(tmp_path):
    """A GPT-2-style seed (seed.pretrained) ties its embedding and output layer: both keys
    are written as copies, and the state loads back with both."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergemix.io import TensorStream
    from mergemix.train import full_weights, latest_resume, save_resume

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    save_resume(tmp_path, full_weights(model), TensorStream({}, iter([])), 4, [], key="k")
    saved = load_file(latest_resume(tmp_path, "k") / mm.WEIGHTS)
    assert torch.equal(saved["lm_head.weight"], saved["transformer.wte.weight"])
    assert torch.equal(saved["lm_head.weight"], model.lm_head.weight.detach())
