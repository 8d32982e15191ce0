"""The model: a GPT-NeoX built by transformers from a small config, and checkpoint folders.

The block runs attention and MLP in parallel (`use_parallel_residual`), the "PaLM-like"
block of the paper. A checkpoint is a Hugging Face folder (config.json +
model.safetensors) plus `mergemix.json`, a sidecar that makes it self-describing:
which seed it grew from, on what data, for how many tokens and steps, on what hardware.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergemix import io

if TYPE_CHECKING:  # torch is imported where it is used: merging needs none of it
    import torch

    from mergemix.config import ModelConfig

SIDECAR = "mergemix.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be used, named with the reason."""


def round_vocab(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def build(cfg: ModelConfig, tokenizer_size: int, eos_id: int) -> torch.nn.Module:
    """A freshly initialised GPT-NeoX whose embedding fits the tokenizer."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    vocab = cfg.vocab_size if cfg.vocab_size is not None else round_vocab(tokenizer_size)
    if vocab < tokenizer_size:
        raise CheckpointError(
            f"model.vocab_size is {vocab} but the tokenizer has {tokenizer_size} tokens: "
            f"set model.vocab_size to null or to at least {tokenizer_size}"
        )
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.context_length,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
    )
    return GPTNeoXForCausalLM(config)


def load(path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Load a checkpoint folder with transformers (safetensors only: never a pickle), float32 by default."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    verify(path)
    read_config(path)  # a missing or damaged config.json is named here, not deep in transformers
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)


def verify(path: str | Path) -> dict[str, Any]:
    """Check model.safetensors against the sha256 its sidecar recorded; returns the sidecar.

    A truncated or altered file fails here with its name, before anything reads it.
    """
    path = Path(path)
    sidecar = read_sidecar(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS}")
    expected = sidecar.get("weights_sha256")
    if expected is None:
        raise CheckpointError(f"{path / SIDECAR} records no weights_sha256: the checkpoint cannot be verified")
    if io.sha256_file(weights) != expected:
        raise CheckpointError(
            f"{weights} does not match the sha256 in {SIDECAR} (truncated or corrupt): delete {path} and rerun"
        )
    return sidecar


def verify_file(path: str | Path, name: str) -> Path:
    """Check file `name` of checkpoint folder `path` (the seed's optimizer state) against
    the sha256 its sidecar recorded under files_sha256; returns the file. A checkpoint
    written before files_sha256 existed has no record, and its file is used unchecked."""
    file = Path(path) / name
    expected = read_sidecar(path).get("files_sha256", {}).get(name)
    if expected is not None and io.sha256_file(file) != expected:
        raise CheckpointError(f"{file} does not match the sha256 in {SIDECAR} (truncated or corrupt): delete {path} and rerun")
    return file


def _read_object(path: str | Path, name: str, if_missing: str) -> dict[str, Any]:
    """The JSON object in file `name` of checkpoint folder `path`, or one CheckpointError naming the file."""
    file = Path(path) / name
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {name}: {if_missing}")
    try:
        data = io.read_json(file)
    except ValueError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}): delete {path} and rerun") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} holds a {type(data).__name__}, not a JSON object: delete {path} and rerun")
    return data


def read_sidecar(path: str | Path) -> dict[str, Any]:
    return _read_object(path, SIDECAR, "it was not written by mergemix")


def read_config(path: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json (its architecture), refused with its name if missing or not JSON."""
    config = _read_object(path, CONFIG, f"delete {path} and rerun to write it again")
    if "model_type" not in config:
        raise CheckpointError(f"{Path(path) / CONFIG} names no model_type: it is not a Hugging Face model config; "
                              f"delete {path} and rerun")
    return config


def read_layout(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """Each tensor of a checkpoint's weights: name -> (dtype, shape, first byte, end byte), in file order.

    Read from the safetensors header alone (8 bytes of length, then JSON) and checked
    against the file's size, so a truncated file is refused here, named, before any of
    its data is read. Byte positions are from the start of the file.
    """
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS}")
    size = file.stat().st_size

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is not a complete safetensors file ({why}; truncated or corrupt): delete {path} and rerun")

    with open(file, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little")
        if size < 8 or length > size - 8:
            raise damaged(f"its header claims {length} bytes but the file has {size}")
        try:
            header = json.loads(fh.read(length))
        except ValueError as exc:
            raise damaged(f"unreadable header: {exc}") from exc
    if not isinstance(header, dict):
        raise damaged("the header is not a JSON object")
    header.pop("__metadata__", None)
    start = 8 + length
    spans = {}
    for name, entry in header.items():
        try:
            dtype, shape, (first, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            nbytes = io.ELEMENT_SIZE[dtype] * math.prod(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise damaged(f"tensor '{name}' has no valid header entry ({exc!r})") from exc
        if end - first != nbytes or first < 0 or start + end > size:
            raise damaged(f"tensor '{name}' needs bytes {start + first} to {start + end} but the file has {size}")
        spans[name] = (dtype, shape, start + first, start + end)
    return dict(sorted(spans.items(), key=lambda item: item[1][2]))


def out_of_memory(exc: RuntimeError) -> bool:
    """Whether `exc` is an allocation that failed: torch's GPU error, or the CPU allocator's."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc)


class DeviceError(ValueError):
    """A job given GPUs that torch cannot use."""


def check_gpus_usable() -> None:
    """Refuse to train or score on the CPU when this job was given GPUs torch cannot see.

    Slurm (and users) hand GPUs to a job through CUDA_VISIBLE_DEVICES. A CPU build of
    torch (envs/mergemix.yaml's pytorch-cpu, say) would ignore them and run a GPU-sized
    job on the CPU for days without a word; this stops it at the start instead. The
    ranks of a data-parallel job on CPUs are exempt: DeepSpeed's launcher numbers them
    through CUDA_VISIBLE_DEVICES too, and `train.launch` marks them DS_ACCELERATOR=cpu
    once their parent has passed this check.
    """
    import torch

    if os.environ.get("DS_ACCELERATOR") == "cpu":
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles") and not torch.cuda.is_available():
        raise DeviceError(
            f"this job was given GPUs (CUDA_VISIBLE_DEVICES={visible}) but torch {torch.__version__} sees no CUDA "
            "device: install a CUDA build of torch, or run on the CPU with CUDA_VISIBLE_DEVICES= and resources.*.gpu: 0"
        )


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"machine": platform.machine(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


# torch dtype name -> safetensors dtype name, for the dtypes a checkpoint holds.
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
                      "int64": "I64", "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def stored(tensor: torch.Tensor) -> Any:
    """A tensor's bytes on the CPU, as the numpy array io.save_tensors_streamed writes
    (bfloat16, which numpy lacks, as its uint16 bit patterns)."""
    import numpy as np
    import torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def safetensors_dtype(tensor: torch.Tensor) -> str:
    return _SAFETENSORS_DTYPE[str(tensor.dtype).removeprefix("torch.")]


def state_stream(state: dict[str, torch.Tensor]) -> io.TensorStream:
    """A state dict as an io.TensorStream: each tensor is copied to the CPU only as it is
    written, so saving a model on a GPU holds one tensor of it on the host, not a copy.

    A model with tied input and output embeddings (GPT-2, many imported seeds) has two
    state_dict keys on one tensor. Both are written, so every checkpoint holds every key
    of its model: merging averages both alike, the engine and a resume load them without
    special cases, and `from_pretrained` ties them again on loading.
    """
    layout = {name: (safetensors_dtype(tensor), tuple(tensor.shape)) for name, tensor in state.items()}
    return io.TensorStream(layout, ((name, stored(tensor)) for name, tensor in state.items()))


def drop_stale(out: str | Path, keep: set[str] = frozenset()) -> None:
    """Remove what an earlier model in folder `out` left that the model replacing it
    lacks: a tensor file other than its weights and `keep` (a trained seed's optimizer
    state, which `train --init` would carry into the new model's training) and its
    training metrics. Called just before the new files are moved in."""
    for old in Path(out).glob("*.safetensors"):
        if old.name != WEIGHTS and old.name not in keep:
            old.unlink()
    if "train_metrics.csv" not in keep:
        (Path(out) / "train_metrics.csv").unlink(missing_ok=True)


def save(
    model: torch.nn.Module,
    out: str | Path,
    sidecar: dict[str, Any],
    extra: dict[str, Any] | None = None,
    is_seed: bool = False,
    texts: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write model + sidecar atomically; model.safetensors is moved into place last.

    `extra` maps file names to the tensors of additional safetensors files (the seed's
    optimizer state), each a dict or an io.TensorStream (written as it is gathered);
    `texts` maps file names to text files of the model (its training metrics). Every
    file is on disk before the folder is committed, and every tensor file is hashed as
    it is written. A seed's `seed_sha256` is the hash of its own weights. Files an
    earlier model left in `out` that this one lacks go (`drop_stale`).
    """

    with io.StagingDir(out) as stage:
        model.config.save_pretrained(stage.path)
        io.fsync_file(stage.path / CONFIG)
        for name, text in (texts or {}).items():
            io.write_text(stage.path / name, text)
        weights_sha = state_stream(model.state_dict()).save(stage.path / WEIGHTS, {"format": "pt"})
        hashes = {}
        for name, tensors in (extra or {}).items():
            stream = tensors if isinstance(tensors, io.TensorStream) else state_stream(tensors)
            hashes[name] = stream.save(stage.path / name, {"format": "pt"})
        sidecar = {**sidecar, "weights_sha256": weights_sha}
        if extra:  # checked by verify_file before use: every model trained from a seed reads its moments
            sidecar["files_sha256"] = dict(sorted(hashes.items()))
        if is_seed:
            sidecar["seed_sha256"] = sidecar["weights_sha256"]
        io.write_json(stage.path / SIDECAR, sidecar)
        drop_stale(out, keep={*(extra or {}), *(texts or {})})
        stage.commit(last=(SIDECAR, WEIGHTS))
    return sidecar
