"""Training through DeepSpeed: seed pretraining and continued pretraining of units,
ind models and seq models.

Every phase is one pass over packed windows of `context_length + 1` tokens (stride
`context_length`, so each token is predicted once), shuffled with a fixed seed. The seed
phase warms up and decays (cosine); continued pretraining starts from the seed's weights
*and* its AdamW moments and re-warms the learning rate, then decays it by cosine to
`min_lr`; the shipped configs set `min_lr = lr`, which holds it (paper A.3).

Run as `python -m mergemix.train --kind unit ...` (one process; on the CPU it sets up a
world of size 1 itself) or under the `deepspeed` launcher for several GPUs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergemix import io, model as mm
from mergemix.config import ModelConfig, PhaseConfig, TrainConfig
from mergemix.tokenize import TokenizeError, load_tokenizer, open_tokens, tokenizer_hash

log = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_FILE = "train_metrics.csv"
METRICS_COLUMNS = ["step", "tokens", "loss", "lr", "elapsed_s"]  # one row per optimizer step


class TrainError(ValueError):
    """A training input that cannot be used, phrased for the user."""


# --- data ------------------------------------------------------------------------------


def parse_unit(spec: str) -> tuple[Path, int]:
    """`PREFIX:INDEX` -> (train shard prefix, unit index)."""
    prefix, sep, index = spec.rpartition(":")
    if not sep or not prefix or not index.isdigit():
        raise TrainError(f"bad --unit {spec!r}: expected SHARD_PREFIX:UNIT_INDEX")
    return Path(prefix), int(index)


def unit_hashes(units: list[str]) -> list[str | None]:
    """The sha256 of each unit's token shard, from its sidecar (what a resume state was trained on)."""
    return [io.read_json(parse_unit(spec)[0].with_suffix(".json")).get("bin_sha256") for spec in units]


def window_loss(model: Any, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of windows of context + 1 tokens.

    The model reads the first `context` tokens of each window and predicts the last
    `context`: it never sees more positions than it has (a model with learned position
    embeddings, such as an imported GPT-2 seed, has no row for position `context`).
    """
    logits = model(input_ids=windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


class Windows:
    """The training windows of some base units, shape (N, context + 1), read from the
    memory-mapped shards batch by batch: a job holds one batch of tokens, not its
    units' (a 2.5B-token seed phase would otherwise need 5 GB for the tokens and as much
    again for the windows cut from them).

    Unit u of a partition is `unit_tokens` tokens of its shard's train stream read
    cyclically from u * unit_tokens (see `tokenize.unit_ranges`: disjoint while they
    fit, repeated when the partition is smaller). Its windows are cut with stride
    `context`, (unit_tokens - 1) // context of them; window i of the j-th unit listed
    is global window j * per_unit + i. Indexing with an array of window numbers gives
    those windows in the shards' dtype (uint16 for vocabularies up to 65,536).
    """

    def __init__(self, units: list[str], unit_tokens: int, context: int, expect_tokenizer: str) -> None:
        self.context = context
        self.unit_tokens = unit_tokens
        self.per_unit = (unit_tokens - 1) // context
        if self.per_unit < 1:
            raise TrainError(f"unit_tokens {unit_tokens} holds fewer tokens than one window of {context + 1}: "
                             "raise unit_tokens")
        self.sources: list[tuple[np.ndarray, int]] = []  # (shard tokens, first stream position)
        opened: dict[Path, np.ndarray] = {}  # each shard is opened (and hashed) once, however many units it gives
        for spec in units:
            prefix, index = parse_unit(spec)
            if prefix not in opened:
                opened[prefix] = self._open(prefix, expect_tokenizer)
            self.sources.append((opened[prefix], index * unit_tokens))
        self.dtype = self.sources[0][0].dtype if self.sources else np.dtype(np.uint16)

    @staticmethod
    def _open(prefix: Path, expect_tokenizer: str) -> np.ndarray:
        try:
            tokens, _, meta = open_tokens(prefix)
        except FileNotFoundError as exc:
            raise TrainError(f"token shard {prefix}.bin/.json is missing: run the tokenize rule first") from exc
        if meta["tokenizer_sha256"] != expect_tokenizer:
            raise TrainError(f"token shard {prefix} was made with another tokenizer than the model's: "
                             "rerun tokenization")
        if tokens.size == 0:
            raise TrainError(f"token shard {prefix} holds no tokens: its documents are empty")
        return tokens

    def __len__(self) -> int:
        return len(self.sources) * self.per_unit

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.context + 1), dtype=self.dtype)
        offsets = np.arange(self.context + 1, dtype=np.int64)
        unit_of, window_of = np.divmod(rows, self.per_unit)
        for u in np.unique(unit_of):
            tokens, first = self.sources[u]
            mine = unit_of == u
            positions = first + window_of[mine, None] * self.context + offsets[None, :]
            out[mine] = tokens[positions % tokens.size]
        return out


def windows(units: list[str], unit_tokens: int, context: int, expect_tokenizer: str) -> Windows:
    """All training windows of the given base units (see `Windows`)."""
    return Windows(units, unit_tokens, context, expect_tokenizer)


def lr_at(step: int, total: int, phase: PhaseConfig) -> float:
    """Linear warm-up to lr, then cosine decay toward min_lr over the remaining steps.

    Step s (from 0) of the warm-up uses lr x (s + 1) / warmup_steps, so the first step
    trains and step warmup_steps - 1 reaches lr; step s after it uses the cosine at
    progress (s - warmup_steps) / (total - warmup_steps): lr at the first, and just above
    min_lr at the last (min_lr would be the step after it), as in Hugging Face's cosine
    schedule.
    """
    if step < phase.warmup_steps:
        return phase.lr * (step + 1) / phase.warmup_steps
    span = max(1, total - phase.warmup_steps)
    progress = min(1.0, (step - phase.warmup_steps) / span)
    return phase.min_lr + 0.5 * (phase.lr - phase.min_lr) * (1 + math.cos(math.pi * progress))


# --- optimizer state -------------------------------------------------------------------
# DeepSpeed keeps AdamW's moments in one of two places. Without ZeRO (fp32 only; config.py
# refuses bf16 at stage 0) they are the torch optimizer's own per-parameter state. With
# ZeRO (stages 1 and 2, fp32 or bf16) they live in flat fp32 partitions behind the
# engine's optimizer, reached per parameter through deepspeed.utils' safe_get/safe_set
# calls, which gather across the ranks: every rank must make them, in the same order.
#
# A state is saved and loaded one tensor at a time (io.TensorStream out, safe_open in):
# at the paper's 1.1B model the weights and two moments are 13 GB, and holding them whole
# on each of a node's eight ranks, as the gathers did before, would need 105 GB of it.
MOMENTS = ("exp_avg", "exp_avg_sq")


def _zero(param: torch.nn.Parameter) -> bool:
    """Whether ZeRO holds this parameter's fp32 copy and moments."""
    return hasattr(param, "_hp_mapping")


def _zero_create_state(optimizer: Any, step: torch.Tensor) -> None:
    """ZeRO creates AdamW's state at its first step; create it now (zero moments at the
    saved step count) and link it to the parameters, so that safe_set can fill it."""
    for flat in optimizer.single_partition_of_fp32_groups:
        optimizer.optimizer.state[flat] = {
            "step": step.clone(), "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)
        }
    optimizer._lazy_init_hp_params_optimizer_state()


def moment_count(path: Path) -> int:
    """Parameters whose moments an optimizer-state file holds (what `load_optimizer_state` sets)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(key.startswith("exp_avg.") for key in f.keys())


def optimizer_state(model: torch.nn.Module, optimizer: Any) -> io.TensorStream:
    """AdamW moments keyed by parameter name (float32), for continued pretraining and
    resumes, gathered one parameter at a time as the stream is read. Every rank must read
    it to the end, rank 0 to save it and the others to `drain` it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    held = [(name, param) for name, param in model.named_parameters()
            if _zero(param) or "exp_avg" in optimizer.state.get(param, {})]
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, param in held:
        for moment in MOMENTS:
            layout[f"{moment}.{name}"] = ("F32", tuple(param.shape))
        layout[f"step.{name}"] = ("F32", (1,))

    def items():
        for name, param in held:
            if _zero(param):
                avg, sq = (safe_get_full_optimizer_state(param, key) for key in MOMENTS)
                step = next(iter(optimizer.optimizer.state.values()))["step"]  # ZeRO's flat partitions step together
            else:
                state = optimizer.state[param]
                avg, sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
            yield f"exp_avg.{name}", mm.stored(avg.float())
            yield f"exp_avg_sq.{name}", mm.stored(sq.float())
            yield f"step.{name}", np.array([float(step)], dtype=np.float32)

    return io.TensorStream(layout, items())


def load_optimizer_state(model: torch.nn.Module, optimizer: Any, path: Path) -> int:
    """Put saved AdamW moments into the engine's optimizer (after deepspeed.initialize, so
    they land on the parameters' device and in ZeRO's partitions), reading one tensor at a
    time; returns how many parameters' moments were set."""
    from deepspeed.utils import safe_set_full_optimizer_state
    from safetensors import safe_open

    with safe_open(path, "pt") as saved:
        keys = set(saved.keys())
        if any(_zero(param) for param in model.parameters()):
            steps = sorted(k for k in keys if k.startswith("step."))
            if steps:  # AdamW steps every parameter together: one count for all
                _zero_create_state(optimizer, saved.get_tensor(steps[0]).reshape(()))
        count = 0
        for name, param in model.named_parameters():
            key = f"exp_avg.{name}"
            if key not in keys:
                raise TrainError(f"optimizer state {path} has no moments for parameter '{name}': "
                                 "the seed does not match the model")
            shape = tuple(saved.get_slice(key).get_shape())
            if shape != tuple(param.shape):
                raise TrainError(f"optimizer state {path}: '{name}' has shape {shape}, the model {tuple(param.shape)}")
            if _zero(param):
                for moment in MOMENTS:
                    safe_set_full_optimizer_state(param, saved.get_tensor(f"{moment}.{name}").to(param.device), moment)
            else:
                optimizer.state[param] = {
                    "step": saved.get_tensor(f"step.{name}").reshape(()),
                    **{m: saved.get_tensor(f"{m}.{name}").to(param.device, param.dtype) for m in MOMENTS},
                }
            count += 1
    return count


def full_weights(model: torch.nn.Module) -> io.TensorStream:
    """The model's tensors, each parameter at the precision the optimizer keeps it (ZeRO's
    fp32 copy under bf16), so a resume continues from the same numbers. Gathered one at
    a time as the stream is read: every rank must read it to the end, as `optimizer_state`.
    Tied tensors (a GPT-2 seed's embedding and output layer) are written under both names."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    zero = {name for name, param in params.items() if _zero(param)}
    layout = {name: ("F32" if name in zero else mm.safetensors_dtype(tensor), tuple(tensor.shape))
              for name, tensor in state.items()}

    def items():
        for name, tensor in state.items():
            yield name, mm.stored(safe_get_full_fp32_param(params[name]) if name in zero else tensor)

    return io.TensorStream(layout, items())


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Copy a resume state's weights into the model (before deepspeed.initialize), one tensor at a time."""
    from safetensors import safe_open

    state = model.state_dict()
    with safe_open(path, "pt") as saved, torch.no_grad():
        unmatched = sorted(set(state) ^ set(saved.keys()))  # in the model or in the file, not both
        if unmatched:
            raise TrainError(f"resume state {path} does not fit the model: tensor '{unmatched[0]}' is in one, "
                             "not the other; delete the folder's .resume to start over")
        for name, tensor in state.items():
            shape = tuple(saved.get_slice(name).get_shape())
            if shape != tuple(tensor.shape):
                raise TrainError(f"resume state {path}: tensor '{name}' has shape {shape}, the model "
                                 f"{tuple(tensor.shape)}; delete the folder's .resume to start over")
            tensor.copy_(saved.get_tensor(name))


def restore_full_weights(model: torch.nn.Module, path: Path) -> None:
    """Give ZeRO back the fp32 copies `full_weights` saved (it built its own from bf16)."""
    from deepspeed.utils import safe_set_full_fp32_param
    from safetensors import safe_open

    with safe_open(path, "pt") as saved:
        for name, param in model.named_parameters():
            if _zero(param):
                safe_set_full_fp32_param(param, saved.get_tensor(name).to(param.device))


# --- resumable state -------------------------------------------------------------------

RESUME_DIR = ".resume"


def fingerprint(**what: Any) -> str:
    """Hash of everything that determines a run: a resume state from other inputs is ignored."""
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def save_resume(out: Path, weights: io.TensorStream, moments: io.TensorStream, step: int,
                metrics: list[dict[str, Any]], key: str) -> Path:
    """Write `out/.resume/step-NNNNNNNN/` atomically (a folder renamed into place), then drop older ones.

    `weights` and `moments` come from `full_weights` and `optimizer_state`; rank 0 saves
    them here while the other ranks drain theirs (ZeRO gathers each tensor on all ranks).
    """
    root = out / RESUME_DIR
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:08d}"
    with io.StagingDir(target) as stage:
        hashes = {mm.WEIGHTS: weights.save(stage.path / mm.WEIGHTS),
                  OPTIMIZER_FILE: moments.save(stage.path / OPTIMIZER_FILE)}
        io.write_json(stage.path / "state.json", {"step": step, "fingerprint": key, "metrics": metrics,
                                                  "files_sha256": hashes})
        if target.exists():  # written by an earlier attempt with other settings
            shutil.rmtree(target)
        stage.path.rename(target)  # one rename: a resume folder is complete or absent
    # Keep this run's newest two: if the newest turns out to produce a non-finite loss, the
    # one before it is the last good state. States of other inputs or settings (an earlier
    # attempt's) can never be resumed by this run and go, whatever their step.
    # A save killed midway left a staging folder: it holds no state anyone can resume.
    ours, _ = _states(out, key)
    for old in sorted([*root.glob("step-*"), *root.glob(".step-*.tmp")]):
        if old not in ours[-2:]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _states(out: Path, key: str) -> tuple[list[Path], list[Path]]:
    """Complete resume folders written for `key`, and those written for other inputs or
    settings, each oldest first (a folder without a readable state.json is neither)."""
    ours, others = [], []
    for folder in sorted((out / RESUME_DIR).glob("step-*")):
        try:
            state = io.read_json(folder / "state.json")
        except (OSError, ValueError):
            continue
        (ours if state.get("fingerprint") == key else others).append(folder)
    return ours, others


def drop_resume_from(out: Path, step: int, key: str) -> Path | None:
    """Delete this run's resume states at or after `step` (they lead to a non-finite loss); return its newest left."""
    kept = []
    for folder in _states(out, key)[0]:
        if int(folder.name.split("-")[1]) >= step:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            kept.append(folder)
    return kept[-1] if kept else None


def _damage(folder: Path) -> str | None:
    """Why a resume folder's tensor files do not match the sha256 its state.json
    recorded (a file cut short by a crash of the node), or None when they do. States
    written before the hashes were recorded are taken as they are."""
    recorded = io.read_json(folder / "state.json").get("files_sha256", {})
    for name, expected in recorded.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if io.sha256_file(file) != expected:
            return f"{name} does not match its sha256"
    return None


def latest_resume(out: Path, key: str) -> Path | None:
    """The newest intact resume folder written for the same inputs, if any: a damaged
    one is passed over, with a warning, for the one before it."""
    ours, others = _states(out, key)
    for folder in others:
        log.warning("ignoring resume state %s: it was written for other inputs or settings", folder)
    for folder in reversed(ours):
        why = _damage(folder)
        if why is None:
            return folder
        log.warning("ignoring resume state %s: %s (truncated or corrupt); trying the one before it", folder, why)
    return None


class _Preemption:
    """SIGTERM (Slurm preemption, scancel) asks the loop to save and stop after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    """The mean of a scalar over the ranks (every rank calls it at the same point)."""
    if world == 1:
        return value.item()
    import torch.distributed as dist

    total = value.detach().float().reshape(1).clone()
    dist.all_reduce(total)  # sum over ranks (gloo on CPUs)
    return total.item() / world


# --- engine ----------------------------------------------------------------------------


def _single_process_env() -> None:
    """Let deepspeed.initialize run without a launcher (a world of one process)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LAUNCHER_GRACE_S = 60  # DeepSpeed's launcher gives its ranks 30 s to stop once it is signalled


def launch(processes: int, argv: list[str]) -> int:
    """Rerun this command as `processes` data-parallel ranks under the DeepSpeed launcher.

    One rank per GPU when GPUs are visible, CPU processes otherwise (the test here). The
    launcher sets RANK/WORLD_SIZE/MASTER_* for each rank.

    A SIGTERM (or SIGINT) reaches the ranks whichever process it is sent to, and this
    process returns only when every rank has saved its state and stopped. The chain is
    this process -> DeepSpeed's runner -> its launcher -> the ranks. Slurm's preemption
    signals every process of the job step: the runner dies at once (it has no handler on
    one node) and the launcher gives the ranks 30 s; if this process died as well, the
    step would end and Slurm would kill the ranks in the middle of saving. `kill PID`
    signals this process alone, so it passes the signal on to everything under it. As
    the child subreaper (Linux) it inherits the launcher when the runner dies, and
    waits for it (at most LAUNCHER_GRACE_S, then it kills what is left). It returns 0
    when the ranks finished, 128 + the signal's number when one stopped them.
    """
    import ctypes
    import subprocess

    import psutil  # a DeepSpeed dependency

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes),
           "--master_port", str(free_port()), "--module", "mergemix.train", *argv]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    prctl = getattr(ctypes.CDLL(None), "prctl", None)  # Linux only
    if prctl is not None:
        PR_SET_CHILD_SUBREAPER = 36
        prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    received: list[int] = []

    def signal_tree(signum: int) -> None:
        try:
            procs = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            try:
                proc.send_signal(signum)
            except psutil.Error:  # gone, or not ours to signal
                pass

    def forward(signum: int, frame: Any) -> None:
        received.append(signum)
        signal_tree(signum)

    log.info("launching %d ranks: %s", processes, " ".join(cmd))
    # A signal ignored by whoever started this command (nohup) stays ignored.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        runner = subprocess.Popen(cmd, env=env)
        if received:  # it came before the runner existed
            signal_tree(received[0])
        code = runner.wait()
        # Whatever is left under this process (the launcher and its ranks, if the runner
        # died before them) is told to stop, if it was not already, and given the time
        # the launcher gives its ranks to save, and a margin; what remains is killed.
        left = psutil.Process().children(recursive=True)
        if left:
            signal_tree(received[0] if received else signal.SIGTERM)
            _, alive = psutil.wait_procs(left, timeout=LAUNCHER_GRACE_S)
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        return 0  # the ranks finished (a signal came too late to stop them)
    if received:
        return 128 + received[0]  # preempted: the ranks saved what they could; a rerun resumes
    return 128 - code if code < 0 else code


def micro_batches(batch_size: int, tcfg: TrainConfig, world_size: int = 1) -> tuple[int, int]:
    """(windows per forward pass, forward passes per step) on one rank: its share of a
    batch in one pass, or in passes of train.micro_batch windows accumulated."""
    share = batch_size // world_size
    micro = tcfg.micro_batch or share
    if share % micro:
        raise TrainError(f"a process's share of a batch ({batch_size} windows over {world_size} processes: {share}) is not "
                         f"a multiple of train.micro_batch ({micro}): choose a micro_batch that divides it")
    return micro, share // micro


def deepspeed_config(batch_size: int, tcfg: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """One optimizer step per global batch of `batch_size` windows, split evenly over the
    ranks and accumulated over micro-batches (DeepSpeed averages their gradients)."""
    micro, accumulate = micro_batches(batch_size, tcfg, world_size)
    config: dict[str, Any] = {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulate,
        "gradient_clipping": tcfg.grad_clip,
        "zero_optimization": {"stage": tcfg.zero_stage},
        "bf16": {"enabled": tcfg.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tcfg.zero_stage >= 1:
        config["zero_allow_untested_optimizer"] = True
    return config


def train(
    kind: str,
    units: list[str],
    unit_tokens: int,
    tokenizer_dir: Path,
    out: Path,
    mcfg: ModelConfig,
    tcfg: TrainConfig,
    phase: PhaseConfig,
    seed: int,
    init: Path | None = None,
    data_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model and write its checkpoint folder; returns the sidecar."""
    import deepspeed
    from tqdm import tqdm

    started = time.time()
    torch.manual_seed(seed)
    tok = load_tokenizer(tokenizer_dir)
    tok_hash = tokenizer_hash(tokenizer_dir)
    if init is None:
        model = mm.build(mcfg, len(tok), tok.eos_token_id)
        seed_sha = None
    else:
        sidecar = mm.read_sidecar(init)
        if sidecar.get("tokenizer_sha256") not in (None, tok_hash):
            raise TrainError(f"seed {init} was trained with another tokenizer than {tokenizer_dir}: rerun the seed rule")
        if OPTIMIZER_FILE in sidecar.get("files_sha256", {}) and not (init / OPTIMIZER_FILE).is_file():
            raise TrainError(f"{init / OPTIMIZER_FILE} is missing, though {init / mm.SIDECAR} records it: the seed's "
                             "AdamW moments cannot be carried over; retrain the seed (snakemake --forcerun seed)")
        model = mm.load(init)
        seed_sha = sidecar["seed_sha256"]
    vocab = model.get_input_embeddings().weight.shape[0]
    if vocab < len(tok):
        raise TrainError(
            f"tokenizer {tokenizer_dir} has {len(tok)} tokens but the model's vocabulary has {vocab} rows: "
            "use the seed's own tokenizer or a larger model.vocab_size"
        )
    context = model.config.max_position_embeddings if init is not None else mcfg.context_length
    data = windows(units, unit_tokens, context, tok_hash)
    order = np.random.default_rng(seed).permutation(len(data))
    # Full batches only (the last < batch_size windows are left out), so a step means the
    # same on any number of data-parallel processes.
    steps = len(data) // phase.batch_size
    if steps == 0:
        raise TrainError(f"{kind}: {len(data)} training windows are fewer than one batch of {phase.batch_size}: "
                         "raise unit_tokens or lower batch_size")

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=phase.lr, betas=tuple(tcfg.betas), weight_decay=tcfg.weight_decay
    )
    # checkpoint_every decides only when states are written, so it is not part of the key;
    # the shards' hashes are: a state trained on data since rebuilt is not resumed.
    # micro_batch changes the sums' order: in the key when set (left out when not, so the
    # states of runs from before it existed still match)
    engine_key = {k: v for k, v in asdict(tcfg).items() if not (k == "micro_batch" and v is None)}
    key = fingerprint(kind=kind, units=units, data=unit_hashes(units), unit_tokens=unit_tokens, model=asdict(mcfg),
                      train={**engine_key, "checkpoint_every": None}, phase=asdict(phase), seed=seed,
                      init=seed_sha, tokenizer=tok_hash)
    start, metrics = 0, []
    resume = latest_resume(out, key)
    if resume is not None:
        load_weights(model, resume / mm.WEIGHTS)
        state = io.read_json(resume / "state.json")
        start, metrics = state["step"], state["metrics"]
        started -= metrics[-1]["elapsed_s"] if metrics else 0.0  # times count every attempt's training
        log.info("resuming %s from %s (step %d of %d)", kind, resume, start, steps)
    _single_process_env()
    world = int(os.environ["WORLD_SIZE"])
    if phase.batch_size % world:
        raise TrainError(f"batch_size {phase.batch_size} cannot be split evenly over {world} processes: "
                         "make it a multiple of the process count")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(phase.batch_size, tcfg, world)
    )
    seed_moments = init / OPTIMIZER_FILE if init is not None and (init / OPTIMIZER_FILE).is_file() else None
    carried = 0
    if resume is not None:  # the resume state's moments, not the seed's (loading both would
        # create ZeRO's optimizer state twice, and DeepSpeed links parameters to it once)
        restore_full_weights(engine.module, resume / mm.WEIGHTS)
        load_optimizer_state(engine.module, optimizer, resume / OPTIMIZER_FILE)
        carried = moment_count(seed_moments) if seed_moments else 0  # what the first attempt carried
    elif seed_moments:
        carried = load_optimizer_state(engine.module, optimizer, mm.verify_file(init, OPTIMIZER_FILE))
    rank0 = engine.global_rank == 0
    gathers = any(_zero(param) for param in engine.module.parameters())  # saving a state is collective
    micro, _ = micro_batches(phase.batch_size, tcfg, world)
    share = phase.batch_size // world
    mine = slice(engine.global_rank * share, (engine.global_rank + 1) * share)  # this rank's share of a batch
    log.info("%s: %d windows, %d steps, %d optimizer tensors carried from %s", kind, len(data), steps, carried, init)

    tokens_seen = metrics[-1]["tokens"] if metrics else 0
    preemption = _Preemption()
    engine.train()
    bar = tqdm(range(start, steps), desc=f"train {kind}", disable=not rank0, mininterval=5,
               initial=start, total=steps)
    for step in bar:
        # The global batch is the same for any process count; each rank reads its slice.
        batch = data[order[step * phase.batch_size : (step + 1) * phase.batch_size][mine]]
        local = torch.from_numpy(batch.astype(np.int64)).to(engine.device)
        lr = lr_at(step, steps, phase)  # a pure function of the step: nothing to restore on resume
        # So is the random state (dropout, in an imported seed that has it): a resumed run
        # draws the masks an uninterrupted one draws, on each rank.
        torch.manual_seed(int(np.random.SeedSequence([seed, step, engine.global_rank]).generate_state(1)[0]))
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = []
        for chunk in local.split(micro):  # DeepSpeed steps the optimizer after the last one
            try:
                loss = window_loss(engine, chunk)
                # Ranks agree on each loss before its backward pass: a non-finite loss
                # stops them all, before the step changes any weight.
                losses.append(_mean_over_ranks(loss, world))
                if not math.isfinite(losses[-1]):
                    good = drop_resume_from(out, step, key) if rank0 else None
                    kept = f"; the last good state ({good.name}) is kept in {good.parent}" if good else ""
                    raise TrainError(f"{kind} training loss is {losses[-1]} at step {step}: lower the learning rate{kept}")
                engine.backward(loss)
                engine.step()
            except RuntimeError as exc:
                if not mm.out_of_memory(exc):
                    raise
                fix = (f"set train.micro_batch to a smaller divisor of {len(local)} (the gradients of its passes "
                       "are accumulated into the same step)" if len(chunk) > 1 else
                       "one window does not fit: use a device with more memory, or a smaller model or context")
                raise TrainError(f"out of memory on {engine.device} in a pass of {len(chunk)} windows of {context} "
                                 f"tokens ({kind} training, step {step}): {fix}") from exc
        mean_loss = sum(losses) / len(losses)
        # ... and on a pending SIGTERM once the step is done, so a signal that came during
        # it is acted on now (not a step later) and the ranks stop together.
        stop = _mean_over_ranks(torch.tensor(float(preemption.requested), device=engine.device), world) > 0
        tokens_seen += phase.batch_size * context
        metrics.append({"step": step + 1, "tokens": tokens_seen, "loss": round(mean_loss, 5),
                        "lr": lr, "elapsed_s": round(time.time() - started, 3)})
        bar.set_postfix(loss=f"{mean_loss:.3f}")
        done = step + 1
        periodic = tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0 and done < steps
        if periodic or stop:
            weights, moments = full_weights(engine.module), optimizer_state(engine.module, optimizer)
            if rank0:
                save_resume(out, weights, moments, done, metrics, key)
            elif gathers:  # take part in ZeRO's gathers (without ZeRO there are none to join)
                weights.drain()
                moments.drain()
        if stop:
            log.warning("SIGTERM: saved state at step %d of %d in %s; rerun to resume", done, steps, out / RESUME_DIR)
            raise SystemExit(143)
    preemption.restore()

    sidecar = {
        "kind": kind,
        "seed_sha256": seed_sha,
        "init": str(init) if init is not None else None,
        "tokenizer_sha256": tok_hash,
        "data": {"units": units, "unit_tokens": unit_tokens, **(data_meta or {})},
        "tokens": tokens_seen,
        "steps": steps,
        "optimizer_tensors_carried": carried,
        "wall_time_s": round(time.time() - started, 2),
        "hardware": {**mm.hardware(), "world_size": engine.world_size, "precision": tcfg.precision},
        "model": asdict(mcfg),
        "train": asdict(tcfg),
        "phase": asdict(phase),
        "random_seed": seed,
    }
    moments = optimizer_state(engine.module, optimizer) if kind == "seed" else None
    if rank0:
        extra = {OPTIMIZER_FILE: moments} if moments is not None else None
        sidecar = mm.save(engine.module, out, sidecar, extra, is_seed=kind == "seed",
                          texts={METRICS_FILE: metrics_csv(metrics)})
        shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
    elif moments is not None and gathers:
        moments.drain()
    leave_process_group(world)
    return sidecar


def leave_process_group(world: int) -> None:
    """Every rank waits until rank 0 has written the model, then closes its process group.

    A rank that exited with its group open aborted in gloo's teardown ("terminate called
    without an active exception", exit 250) in about one two-rank run in five, and the
    job failed after its model was saved.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if world > 1:
        dist.barrier()
    dist.destroy_process_group()


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    """train_metrics.csv's text: METRICS_COLUMNS, one row per step."""
    import io as stdio

    buf = stdio.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRICS_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def import_seed(name: str, tokenizer_dir: Path, out: Path) -> dict[str, Any]:
    """Use a Hugging Face causal LM as the seed: copy it into a mergemix checkpoint folder."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load seed.pretrained '{name}' as safetensors: {exc}") from exc
    tok = load_tokenizer(tokenizer_dir)
    vocab = model.get_input_embeddings().weight.shape[0]
    if vocab < len(tok):
        raise TrainError(f"seed.pretrained '{name}' has {vocab} embedding rows but its tokenizer {len(tok)} tokens")
    sidecar = {"kind": "seed", "init": name, "tokenizer_sha256": tokenizer_hash(tokenizer_dir),
               "tokens": 0, "steps": 0, "wall_time_s": 0.0, "hardware": mm.hardware()}
    return mm.save(model, out, sidecar, is_seed=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mergemix.train", description=__doc__)
    parser.add_argument("--kind", choices=["seed", "unit", "ind", "seq"], required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--init", type=Path, help="checkpoint to continue from (the seed)")
    parser.add_argument("--pretrained", help="seed only: a Hugging Face model name or folder to import instead of training")
    parser.add_argument("--unit", action="append", default=[], help="SHARD_PREFIX:UNIT_INDEX of a base unit (repeatable)")
    parser.add_argument("--unit-tokens", type=io.whole(1), help="tokens per unit (the seed: its token budget)")
    parser.add_argument("--model-json", default="{}", help="the config's model section")
    parser.add_argument("--train-json", default="{}", help="the config's train section (optimizer, engine)")
    parser.add_argument("--phase-json", default="{}", help="the phase's schedule: train.seed_phase or train.continued")
    parser.add_argument("--meta-json", default="{}", help="what the data is (partitions, units), for the sidecar")
    parser.add_argument("--seed", type=io.whole(0), default=0)
    parser.add_argument("--threads", type=io.whole(0), default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--checkpoint-every", type=io.whole(0),
                        help="steps between resume states (overrides the train section's checkpoint_every)")
    parser.add_argument("--processes", type=int, default=1,
                        help="data-parallel ranks, started through the DeepSpeed launcher (one per GPU)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the DeepSpeed launcher
    args = parser.parse_args(argv)
    if not args.pretrained and not args.unit:
        parser.error("--unit is required to train (or, for a seed, --pretrained to import one)")
    if not args.pretrained and args.unit_tokens is None:
        parser.error("--unit-tokens is required with --unit")
    if args.pretrained and args.kind != "seed":
        parser.error(f"--pretrained imports a seed, not a {args.kind} model: use --kind seed")
    if args.processes > 1 and "RANK" not in os.environ:
        rest = list(sys.argv[1:] if argv is None else argv)
        keep = [a for i, a in enumerate(rest)
                if not a.startswith("--processes") and not (i and rest[i - 1] == "--processes")]
        return launch(args.processes, keep)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    def work() -> None:
        mm.check_gpus_usable()
        if args.pretrained:
            import_seed(args.pretrained, args.tokenizer, args.out)
            return
        train_section = json.loads(args.train_json)
        fields = ("precision", "zero_stage", "betas", "weight_decay", "grad_clip", "checkpoint_every", "micro_batch")
        if args.checkpoint_every is not None:
            train_section["checkpoint_every"] = args.checkpoint_every
        tcfg = TrainConfig(**{k: train_section[k] for k in fields if k in train_section})
        train(
            kind=args.kind,
            units=args.unit,
            unit_tokens=args.unit_tokens,
            tokenizer_dir=args.tokenizer,
            out=args.out,
            mcfg=ModelConfig(**json.loads(args.model_json)),
            tcfg=tcfg,
            phase=PhaseConfig(**json.loads(args.phase_json)),
            seed=args.seed,
            init=args.init,
            data_meta=json.loads(args.meta_json),
        )

    return io.run_command(work, (TrainError, TokenizeError, mm.CheckpointError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
