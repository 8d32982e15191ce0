"""Merging k checkpoints: mergemix against mergekit and a naive load-all average, in one run.

The workflow averages unit models (`python -m mergemix.merge --method micro`, and the
engine in memory). Averaging is I/O: every byte of k checkpoints is read once. So the
yardsticks are another merge tool (mergekit's `linear` merge, the common choice), the
obvious few lines of torch (load every state dict, sum, divide), and `cat` of the same
files to /dev/null, the rate at which this disk delivers the bytes at all.

This script writes k randomly initialised GPT-NeoX checkpoints with mergemix's own
saver (so their sidecars are valid), then for each k runs every contender in a fresh
child process, with the page cache dropped before each where it may (as root), and
prints wall time, peak resident memory (the child's ru_maxrss), read rate (input bytes
over wall time), the goals as PASS/FAIL, and the largest difference between the
merged tensors of the contenders.

    python benchmarks/merge.py                # ~106M parameters, k = 2 and 8 (about 5 minutes)
    python benchmarks/merge.py --tiny         # a 2-layer toy, seconds (the smoke test)
    python benchmarks/merge.py --peers naive  # leave mergekit out (it installs into a venv)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MiB,
    BenchError,
    driver_rss_line,
    drop_page_cache,
    goal,
    machine_line,
    markdown_table,
    peer_python,
    run_child,
    scratch,
)

PEERS = ("mergekit", "naive")
WEIGHTS = "model.safetensors"


def make_checkpoints(folder: Path, k: int, hidden: int, layers: int, vocab: int) -> None:
    """k random initialisations of one architecture, saved as mergemix checkpoints of one seed
    (unit0, unit1, ...), and `params.txt`: the parameter count."""
    import torch

    from mergemix import model as mm
    from mergemix.config import ModelConfig

    cfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                      intermediate_size=4 * hidden, context_length=2048, vocab_size=vocab)
    n_params = 0
    for i in range(k):
        torch.manual_seed(i)
        model = mm.build(cfg, vocab, 0)
        n_params = sum(p.numel() for p in model.parameters())
        path = folder / f"unit{i}"
        mm.save(model, path, {"kind": "unit", "seed_sha256": "b" * 64})
        del model
    (folder / "params.txt").write_text(f"{n_params}\n")


def naive_average(out: Path, inputs: list[Path]) -> None:
    """The obvious torch: load every state dict, sum in float32, divide, save."""
    from safetensors.torch import load_file, save_file

    states = [load_file(p / WEIGHTS) for p in inputs]
    merged = {name: (sum(s[name].float() for s in states) / len(states)).contiguous() for name in states[0]}
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / WEIGHTS, metadata={"format": "pt"})


def mergekit_view(checkpoint: Path, work: Path) -> Path:
    """The checkpoint as mergekit can read it: the same weights file, a config naming an architecture.

    mergekit picks a tensor layout by config.json's `architectures`, which mergemix's
    saver leaves out (transformers loads the folder by `model_type`). Its built-in
    GPT-NeoX layout (0.1.5) lists buffers that transformers 5 no longer saves
    (`attention.bias`, `masked_bias`, `rotary_emb.inv_freq`) and refuses the checkpoint,
    so the view names an architecture mergekit has no layout for: mergekit then infers
    the layout from the model transformers builds, its path for any new architecture.
    """
    view = work / "mergekit-view" / checkpoint.name
    if not view.is_dir():
        view.mkdir(parents=True)
        (view / WEIGHTS).symlink_to(checkpoint.resolve() / WEIGHTS)
        config = json.loads((checkpoint / "config.json").read_text())
        (view / "config.json").write_text(json.dumps({**config, "architectures": ["MergemixGPTNeoXForCausalLM"]}))
    return view


def mergekit_config(inputs: list[Path], work: Path) -> str:
    models = "".join(f"  - model: {mergekit_view(p, work)}\n    parameters:\n      weight: 1.0\n" for p in inputs)
    return f"merge_method: linear\ndtype: float32\nparameters:\n  normalize: true\nmodels:\n{models}"


def command(name: str, inputs: list[Path], out: Path, work: Path) -> list[str]:
    if name == "cat":
        return ["cat", *(str(p / WEIGHTS) for p in inputs)]
    if name == "mergemix":
        return [sys.executable, "-m", "mergemix.merge", "--method", "micro", "--out", str(out),
                *(f"--model=u{i}={p}" for i, p in enumerate(inputs))]
    if name == "naive":
        return [sys.executable, str(Path(__file__).resolve()), "--naive-out", str(out), *map(str, inputs)]
    if name == "mergekit":
        config = work / "mergekit.yaml"
        config.write_text(mergekit_config(inputs, work))
        return [str(peer_python().parent / "mergekit-yaml"), str(config), str(out), "--no-cuda", "--quiet"]
    raise AssertionError(name)


def read_merged(folder: Path) -> dict:
    """Every tensor of a merged folder, whatever its shard names."""
    from safetensors.torch import load_file

    tensors: dict = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def max_abs_diff(a: dict, b: dict) -> float:
    if set(a) != set(b):
        raise BenchError(f"merged tensors differ in names: {sorted(set(a) ^ set(b))[:3]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 8], help="checkpoints per merge (default 2 8)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 model and k = 2 3: a smoke test")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS, help="peers to run (default all)")
    parser.add_argument("--cache", choices=["both", "cold", "warm"], default="both",
                        help="page cache before each contender: dropped (cold, needs root), filled (warm), or both (default)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; the median is reported (default 3)")
    parser.add_argument("--workdir", type=Path, help="folder for checkpoints (default: a temporary one)")
    parser.add_argument("--naive-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-in", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("inputs", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.naive_out:
        naive_average(args.naive_out, args.inputs)
        return 0
    if args.tiny:
        args.hidden, args.layers, args.vocab, args.k = 64, 2, 1024, [2, 3]
    if args.make_in:
        make_checkpoints(args.make_in, max(args.k), args.hidden, args.layers, args.vocab)
        return 0
    try:
        if "mergekit" in args.peers:
            peer_python()  # install before anything is timed
        root = args.workdir or scratch("merge")
        try:
            return run(args, root)
        finally:
            if not args.workdir:
                shutil.rmtree(root, ignore_errors=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, root: Path) -> int:
    print(machine_line())
    # Built in a child: this process must not hold torch while it measures others (see _common).
    run_child("make checkpoints", [sys.executable, __file__, "--make-in", str(root), "--k", str(max(args.k)),
                                   "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)])
    inputs = [root / f"unit{i}" for i in range(max(args.k))]
    n_params = int((root / "params.txt").read_text())
    model_bytes = (inputs[0] / WEIGHTS).stat().st_size
    print(f"model: GPT-NeoX, hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}: "
          f"{n_params / 1e6:.1f}M parameters, {model_bytes / MiB:.0f} MiB per checkpoint (float32)")
    modes = ["cold", "warm"] if args.cache == "both" else [args.cache]
    if "cold" in modes and not drop_page_cache():
        print("page cache: cannot be dropped here (not root): cold runs left out, warm-cache runs only")
        modes = ["warm"]
    print("page cache: " + "; ".join({"cold": "cold = dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every contender",
                                      "warm": "warm = every input read once by cat just before every contender"}[m] for m in modes))
    contenders = ["cat", "mergemix", *args.peers]
    rows, results = [], {}
    for mode in modes:
        for k in args.k:
            chosen = inputs[:k]
            for name in contenders:
                out = root / f"out-{name}-{k}"
                runs = []
                for _ in range(args.repeat):
                    shutil.rmtree(out, ignore_errors=True)
                    os.sync()  # the last contender's output is written back now, not during this one
                    if mode == "cold":
                        drop_page_cache()
                    else:
                        run_child("warm-up", command("cat", chosen, out, root), keep_output=False)
                    runs.append(run_child(f"{name} (k={k})", command(name, chosen, out, root), keep_output=name != "cat"))
                child = sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]  # the median run
                results[mode, name, k] = child
                rows.append({"cache": mode, "k": k, "contender": name, "wall s": round(child.wall_s, 2),
                             "peak RSS MiB": round(child.peak_rss / MiB), "RSS / model": round(child.peak_rss / model_bytes, 2),
                             "read MiB/s": round(k * model_bytes / MiB / child.wall_s)})
    print(driver_rss_line())
    print()
    print(markdown_table(rows, ["cache", "k", "contender", "wall s", "peak RSS MiB", "RSS / model", "read MiB/s"]))
    print()
    big = max(args.k)
    for mode in modes:
        mine = results[mode, "mergemix", big]
        for peer in args.peers:
            theirs = results[mode, peer, big]
            print(f"ratio ({mode}, k={big}): mergemix / {peer}: wall time {mine.wall_s / theirs.wall_s:.3f}, "
                  f"peak RSS {mine.peak_rss / theirs.peak_rss:.3f}")
        print(f"ratio ({mode}, k={big}): mergemix read rate / cat's: {results[mode, 'cat', big].wall_s / mine.wall_s:.3f}")
        print(f"ratio ({mode}): mergemix peak RSS / one model: " +
              ", ".join(f"k={k}: {results[mode, 'mergemix', k].peak_rss / model_bytes:.2f}" for k in args.k))
    reference = read_merged(root / f"out-mergemix-{big}")
    for peer in args.peers:
        print(f"agreement (k={big}): max |mergemix - {peer}| over all merged tensors: "
              f"{max_abs_diff(reference, read_merged(root / f'out-{peer}-{big}')):.3g}")
    print()
    for mode in modes:
        mine = results[mode, "mergemix", big]
        if "mergekit" in args.peers:
            goal(f"({mode}) mergemix wall time <= 1/3 of mergekit's at k={big}", mine.wall_s <= results[mode, "mergekit", big].wall_s / 3)
        goal(f"({mode}) mergemix peak RSS <= two models' size at every k",
             all(results[mode, "mergemix", k].peak_rss <= 2 * model_bytes for k in args.k))
        goal(f"({mode}) mergemix read rate >= 0.8 x cat's at k={big}", results[mode, "cat", big].wall_s / mine.wall_s >= 0.8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
