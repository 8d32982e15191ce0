"""Training throughput: mergemix's DeepSpeed training against a plain torch loop, and MFU.

Training the unit and seq models is most of a study's cost. This script trains the same
GPT-NeoX on the same batches two ways, each in a fresh child process:

- mergemix: `python -m mergemix.train --kind seed` (DeepSpeed, fp32, ZeRO stage 0, on
  the CPU a world of one process), exactly as the workflow's seed rule runs it;
- a plain torch loop: the same model (`mergemix.model.build` after the same
  `torch.manual_seed`), the same windows in the same order, AdamW with the same
  hyperparameters and schedule, the same gradient clipping.

Both record the time of every step; tokens per second is taken over the steps after
the first `--warmup` (steady state: no DeepSpeed initialisation, no first-step
allocation), and the whole child's wall time is printed beside it. The two loss curves
must match (same initialisation, data and optimizer), which the script checks.

Model FLOPs utilisation (MFU) follows the PaLM paper (Chowdhery et al., 2022, appendix
B): model FLOPs per token = 6 N + 12 L H Q T, with N the parameters that take part in
matrix multiplications (all but the input embedding, a table lookup; the untied output
layer is counted), L layers, H heads, Q head size, T the context length. MFU = tokens
per second x FLOPs per token / peak FLOP/s, and the peak is measured here: the best
FLOP/s of a 2048 x 2048 float32 matmul with the same torch thread count (a CPU has no
datasheet number that torch reaches).

    python benchmarks/train.py                  # the demo model and a 14M model (about 2.5 minutes)
    python benchmarks/train.py --tiny           # seconds (the smoke test)
    python benchmarks/train.py --device cuda --precision bf16   # the GPU path (needs CUDA)

On a GPU (`--device cuda --precision bf16`) the models are a 130M GPT-NeoX at context
2048; the torch loop then uses bf16 autocast, SDPA attention, torch.compile and fused
AdamW, and mergemix DeepSpeed's bf16 mode. Without CUDA this path stops with an error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CACHE,
    MiB,
    BenchError,
    driver_rss_line,
    machine_line,
    markdown_table,
    run_child,
    scratch,
    stdlib_docstrings,
    torch_facts,
)

# name -> (model section, batch size, steps) per device. "demo" is config.yaml's model.
MODELS = {
    "cpu": {
        "demo": ({"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512, "context_length": 256}, 16, 40),
        "14M": ({"hidden_size": 384, "num_layers": 6, "num_heads": 6, "intermediate_size": 1536, "context_length": 256}, 16, 12),
    },
    "tiny": {
        "tiny": ({"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "context_length": 32}, 4, 6),
    },
    "cuda": {
        "130M": ({"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072, "context_length": 2048,
                  "vocab_size": 32768}, 16, 60),
    },
}
PHASE = {"lr": 0.002, "min_lr": 0.0002, "warmup_steps": 5}
TRAIN = {"precision": "fp32", "zero_stage": 0, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0,
         "checkpoint_every": 0}


def prepare(folder: Path, vocab: int) -> None:
    """A BPE tokenizer and a training shard of stdlib docstrings (the text wraps around as needed)."""
    import sysconfig

    from mergemix.tokenize import load_tokenizer, tokenizer_hash, train_bpe, write_shard

    root = Path(sysconfig.get_paths()["stdlib"])
    modules = sorted(p.stem for p in root.glob("*.py") if not p.stem.startswith("_"))
    texts = []
    for name in modules:
        try:
            texts += stdlib_docstrings([name])[name]
        except (SyntaxError, UnicodeDecodeError):  # a few stdlib files are test data, not Python 3
            continue
    train_bpe(texts, vocab, folder / "tokenizer")
    tok = load_tokenizer(folder / "tokenizer")
    write_shard(tok, texts, folder / "train", {"tokenizer_sha256": tokenizer_hash(folder / "tokenizer")})


def flops_per_token(model_section: dict, n_matmul_params: int) -> float:
    """PaLM appendix B: 6 N + 12 L H Q T (here H Q = hidden size)."""
    return 6 * n_matmul_params + 12 * model_section["num_layers"] * model_section["hidden_size"] * model_section["context_length"]


def peak_flops(device: str, seconds: float = 3.0) -> float:
    """Best achieved FLOP/s of a square matmul: float32 2048 on the CPU, bf16 8192 on a GPU."""
    import torch

    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def torch_loop(folder: Path, name: str, device: str, precision: str, out: Path) -> None:
    """The peer: a plain loop over the same windows, in the same order, with the same optimizer."""
    import numpy as np
    import torch

    from mergemix import model as mm
    from mergemix.config import ModelConfig, PhaseConfig
    from mergemix.tokenize import load_tokenizer, tokenizer_hash
    from mergemix.train import lr_at, window_loss, windows

    section, batch_size, steps = all_models()[name]
    phase = PhaseConfig(batch_size=batch_size, **PHASE)
    torch.manual_seed(0)  # what mergemix.train does first, with --seed 0
    tok = load_tokenizer(folder / "tokenizer")
    model = mm.build(ModelConfig(**section), len(tok), tok.eos_token_id)
    data = windows([f"{folder / 'train'}:0"], steps * batch_size * section["context_length"] + 1,
                   section["context_length"], tokenizer_hash(folder / "tokenizer"))
    order = np.random.default_rng(0).permutation(len(data))
    cuda = device == "cuda"
    if cuda:
        model = model.to("cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=phase.lr, betas=tuple(TRAIN["betas"]),
                                  weight_decay=TRAIN["weight_decay"], fused=cuda or None)
    forward = torch.compile(model) if cuda else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda and precision == "bf16")
    model.train()
    started, log = time.perf_counter(), []
    for step in range(steps):
        batch = torch.from_numpy(data[order[step * batch_size : (step + 1) * batch_size]].astype(np.int64)).to(device)
        with autocast:
            loss = window_loss(forward, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, phase)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "tokens": (step + 1) * batch_size * section["context_length"],
                    "loss": round(loss.item(), 5), "elapsed_s": round(time.perf_counter() - started, 3)})
    out.write_text(json.dumps({"attention": model.config._attn_implementation, "log": log}))


def all_models() -> dict:
    return {name: spec for group in MODELS.values() for name, spec in group.items()}


def mergemix_command(folder: Path, name: str, precision: str) -> list[str]:
    section, batch_size, steps = all_models()[name]
    return [sys.executable, "-m", "mergemix.train", "--kind", "seed", "--tokenizer", str(folder / "tokenizer"),
            "--out", str(folder / f"mergemix-{name}"), "--unit", f"{folder / 'train'}:0",
            "--unit-tokens", str(steps * batch_size * section["context_length"] + 1),
            "--model-json", json.dumps(section), "--train-json", json.dumps({**TRAIN, "precision": precision}),
            "--phase-json", json.dumps({"batch_size": batch_size, **PHASE}), "--seed", "0"]


def steady_rate(log: list[dict], warmup: int) -> float:
    """Tokens per second over the steps after the first `warmup`."""
    first, last = log[warmup - 1], log[-1]
    return (last["tokens"] - first["tokens"]) / (last["elapsed_s"] - first["elapsed_s"])


def median_rate(log: list[dict], warmup: int) -> float:
    """Tokens per second of the median step after the first `warmup`: on a shared machine
    a few steps starved by other jobs move the mean, not the median."""
    import statistics

    steps = [(b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"]) for a, b in zip(log[warmup - 1 :], log[warmup:])]
    return statistics.median(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--models", nargs="*", help="model names (default: all of the device's)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the steady-state rate")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, width-32 model for 6 steps: a smoke test")
    parser.add_argument("--child", choices=["prepare", "torch", "peak"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.child == "prepare":
        prepare(args.folder, 512 if args.tiny else 4096)
        return 0
    if args.child == "torch":
        torch_loop(args.folder, args.model, args.device, precision, args.folder / f"torch-{args.model}.json")
        return 0
    if args.child == "peak":
        (args.folder / "peak.json").write_text(json.dumps({"peak_flops": peak_flops(args.device)}))
        return 0
    try:
        if args.device == "cuda" and not torch_facts()["gpu"]:
            raise BenchError("--device cuda needs a CUDA GPU, and torch.cuda.is_available() is False here: "
                             "run this on a GPU machine (the CPU benchmark is the default, --device cpu)")
        if args.device == "cpu" and precision == "bf16":
            raise BenchError("--precision bf16 is the GPU path: on the CPU mergemix trains in fp32")
        group = "tiny" if args.tiny else args.device
        names = args.models or list(MODELS[group])
        unknown = [n for n in names if n not in MODELS[group]]
        if unknown:
            raise BenchError(f"unknown model '{unknown[0]}' for {group}: choose from {', '.join(MODELS[group])}")
        folder = scratch("train")
        try:
            return run(args, folder, group, names, precision)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, folder: Path, group: str, names: list[str], precision: str) -> int:
    print(machine_line())
    me = [sys.executable, str(Path(__file__).resolve()), "--folder", str(folder), "--device", args.device,
          "--precision", precision]
    # DeepSpeed compiles a CPU op once; keep it where the tests keep it.
    env = {"TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))}
    run_child("prepare", [*me, "--child", "prepare", *(["--tiny"] if args.tiny else [])])
    run_child("peak", [*me, "--child", "peak"])
    peak = json.loads((folder / "peak.json").read_text())["peak_flops"]
    print(f"peak: {peak / 1e9:.1f} GFLOP/s ({'bf16 8192' if args.device == 'cuda' else 'float32 2048'} matmul, "
          f"best of 3 s, {torch_facts()['threads']} torch threads)")
    rows, ratios, curves = [], [], []
    for name in names:
        section, batch_size, steps = MODELS[group][name]
        if steps <= args.warmup:
            raise BenchError(f"model {name} runs {steps} steps, not more than --warmup {args.warmup}")
        mine = run_child(f"mergemix ({name})", mergemix_command(folder, name, precision), env=env)
        with open(folder / f"mergemix-{name}" / "train_metrics.csv", newline="") as fh:
            mine_log = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
        sidecar = json.loads((folder / f"mergemix-{name}" / "mergemix.json").read_text())
        theirs = run_child(f"torch loop ({name})", [*me, "--child", "torch", "--model", name], env=env)
        result = json.loads((folder / f"torch-{name}.json").read_text())
        theirs_log, attention = result["log"], result["attention"]
        n_params, n_matmul = _param_counts(folder / f"mergemix-{name}")
        fpt = flops_per_token(section, n_matmul)
        for contender, child, log in (("mergemix", mine, mine_log), ("torch loop", theirs, theirs_log)):
            rate, median = steady_rate(log, args.warmup), median_rate(log, args.warmup)
            rows.append({"model": name, "params": f"{n_params / 1e6:.1f}M", "contender": contender,
                         "steps": len(log), "tokens/step": batch_size * section["context_length"],
                         "wall s": round(child.wall_s, 1), "tokens/s": round(rate), "MFU %": round(100 * rate * fpt / peak, 1),
                         "tokens/s (median step)": round(median), "MFU % (median step)": round(100 * median * fpt / peak, 1),
                         "peak RSS MiB": round(child.peak_rss / MiB)})
        ratios.append((name, steady_rate(mine_log, args.warmup) / steady_rate(theirs_log, args.warmup),
                       median_rate(mine_log, args.warmup) / median_rate(theirs_log, args.warmup)))
        curves.append((name, max(abs(a["loss"] - b["loss"]) for a, b in zip(mine_log, theirs_log, strict=True)),
                       mine_log[-1]["loss"], sidecar["tokens"], attention))
    print(driver_rss_line())
    print()
    print(markdown_table(rows, ["model", "params", "contender", "steps", "tokens/step", "wall s", "tokens/s",
                                "MFU %", "tokens/s (median step)", "MFU % (median step)", "peak RSS MiB"]))
    print(f"(tokens/s: steady state, steps {args.warmup + 1} to the last; wall s: the whole child process, "
          f"start-up, DeepSpeed initialisation and checkpoint writing included; FLOPs per token: 6 N + 12 L H Q T)")
    print()
    for name, ratio, median in ratios:
        print(f"ratio ({name}): mergemix / torch loop tokens per second: {ratio:.3f} (median steps: {median:.3f})")
    for name, diff, last, tokens, attention in curves:
        print(f"agreement ({name}): max |loss difference| between the two loops over all steps: {diff:.2e} "
              f"(last loss {last:.4f} after {tokens} tokens; attention: {attention})")
    return 0


def _param_counts(checkpoint: Path) -> tuple[int, int]:
    """(all parameters, those in matmuls: all but the input embedding), from the safetensors header."""
    import math
    import struct

    with open(checkpoint / "model.safetensors", "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    sizes = {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    embedding = sum(n for k, n in sizes.items() if k.endswith("embed_in.weight"))
    return sum(sizes.values()), sum(sizes.values()) - embedding


if __name__ == "__main__":
    sys.exit(main())
