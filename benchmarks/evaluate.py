"""Perplexity evaluation: mergemix against a plain Hugging Face loop and lm-evaluation-harness.

Every model of a study is scored on every evaluation domain, so evaluation throughput
(tokens per second) sets much of a study's cost. This script builds one GPT-NeoX,
one tokenizer and one evaluation shard from real English text (the docstrings of the
running Python's standard library), then scores the same documents three ways, each in
a fresh child process:

- mergemix: `python -m mergemix.evaluate` (what the workflow runs): each document after
  an end-of-text token, cut into disjoint windows of the context length, windows
  batched (16) and padded;
- a plain Hugging Face loop: `AutoModelForCausalLM`, the same disjoint windows one at a
  time, the sum of token NLLs (the reference the perplexities must match to 1e-5);
- lm-evaluation-harness's `loglikelihood_rolling` (HFLM), installed into the peers'
  virtualenv. Its windows are the same except the last window of a document longer
  than the context, which it fills with earlier tokens as context, so its perplexity
  differs slightly by design; on documents of one window it must agree exactly.

The model's output layer is scaled up (x8) after random initialisation so that
per-token losses vary widely: a token scored twice, skipped or given other context
moves the perplexity, where a near-uniform random model would hide it.

    python benchmarks/evaluate.py              # 29M parameters, context 512, ~40k tokens
    python benchmarks/evaluate.py --tiny       # seconds (the smoke test)
    python benchmarks/evaluate.py --peers hf   # leave lm-evaluation-harness out
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    MODULES,
    OFFLINE,
    MiB,
    BenchError,
    driver_rss_line,
    goal,
    machine_line,
    markdown_table,
    peer_python,
    run_child,
    scratch,
    stdlib_docstrings,
)

PEERS = ("hf", "lm-eval")


def prepare(folder: Path, hidden: int, layers: int, context: int, vocab: int, max_tokens: int) -> None:
    """Tokenizer, shard, documents (texts.json, in shard order) and model (facts.json: sizes)."""
    import torch

    from mergemix import model as mm
    from mergemix.config import ModelConfig
    from mergemix.tokenize import load_tokenizer, train_bpe, write_shard

    docs = stdlib_docstrings(MODULES)
    train_bpe([t for d in docs.values() for t in d], vocab, folder / "tokenizer")
    tok = load_tokenizer(folder / "tokenizer")
    pool = [t for d in docs.values() for t in d]
    random.Random(0).shuffle(pool)  # short and long documents mixed, whatever the size
    texts, n = [], 0
    for text in pool:
        texts.append(text)
        n += len(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)
        if n >= max_tokens:
            break
    meta = write_shard(tok, texts, folder / "docs", {"tokenizer_sha256": "bench"})
    (folder / "texts.json").write_text(json.dumps(texts))
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                      intermediate_size=4 * hidden, context_length=context)
    model = mm.build(cfg, len(tok), tok.eos_token_id)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    mm.save(model, folder / "model", {"kind": "bench", "seed_sha256": "e" * 64})
    (folder / "facts.json").write_text(json.dumps({
        "params": sum(p.numel() for p in model.parameters()), "docs": len(texts),
        "tokens": meta["n_tokens"] - len(texts),  # the shard stores one EOS per document
        "one_window_docs": sum(1 for t in texts if len(tok(t, add_special_tokens=False).input_ids) <= context),
    }))


def hf_loop(folder: Path, out: Path) -> None:
    """The plain loop: one disjoint window at a time, EOS in front of each document."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder / "tokenizer")
    context = model.config.max_position_embeddings
    per_doc, n_tokens = [], 0
    with torch.inference_mode():
        for text in json.loads((folder / "texts.json").read_text()):
            ids = [tok.eos_token_id] + tok(text, add_special_tokens=False).input_ids
            nll = 0.0
            for start in range(0, len(ids) - 1, context):
                chunk = torch.tensor(ids[start : start + context + 1])
                logits = model(input_ids=chunk[None, :-1]).logits[0]
                nll += F.cross_entropy(logits.float(), chunk[1:], reduction="sum").item()
            per_doc.append(nll)
            n_tokens += len(ids) - 1
    out.write_text(json.dumps({"nll_sum": sum(per_doc), "n_tokens": n_tokens, "per_doc": per_doc}))


def lm_eval_rolling(folder: Path, out: Path, batch_size: int) -> None:
    """lm-evaluation-harness's rolling log-likelihood of every document (run in the peers' venv)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    config = json.loads((folder / "model" / "config.json").read_text())
    lm = HFLM(pretrained=str(folder / "model"), tokenizer=str(folder / "tokenizer"), device="cpu",
              dtype="float32", batch_size=batch_size, max_length=config["max_position_embeddings"])
    texts = json.loads((folder / "texts.json").read_text())
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    per_doc = [-ll for ll in lm.loglikelihood_rolling(requests, disable_tqdm=True)]
    n_tokens = sum(len(lm.tok_encode(t)) for t in texts)
    out.write_text(json.dumps({"nll_sum": sum(per_doc), "n_tokens": n_tokens, "per_doc": per_doc}))


def mergemix_result(rows: Path) -> dict:
    with open(rows, newline="") as fh:
        row = next(csv.DictReader(fh))
    return {"nll_sum": float(row["nll_sum"]), "n_tokens": int(row["n_tokens"]), "n_docs": int(row["n_docs"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary trained on the docstrings")
    parser.add_argument("--tokens", type=int, default=40000, help="evaluation tokens (whole documents, about this many)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (mergemix, lm-eval)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer, width-64 model on ~3k tokens: a smoke test")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS, help="peers to run (default all)")
    parser.add_argument("--child", choices=["prepare", "hf", "lm-eval"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.context, args.vocab, args.tokens = 64, 2, 64, 512, 3000
    if args.child == "prepare":
        prepare(args.folder, args.hidden, args.layers, args.context, args.vocab, args.tokens)
        return 0
    if args.child == "hf":
        hf_loop(args.folder, args.folder / "hf.json")
        return 0
    if args.child == "lm-eval":
        lm_eval_rolling(args.folder, args.folder / "lm-eval.json", args.batch_size)
        return 0
    try:
        lm_eval_python = peer_python() if "lm-eval" in args.peers else None
        folder = scratch("eval")
        try:
            return run(args, folder, lm_eval_python)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, folder: Path, lm_eval_python: Path | None) -> int:
    print(machine_line())
    me = [sys.executable, str(Path(__file__).resolve()), "--folder", str(folder)]
    run_child("prepare", [*me, "--child", "prepare", "--hidden", str(args.hidden), "--layers", str(args.layers),
                          "--context", str(args.context), "--vocab", str(args.vocab), "--tokens", str(args.tokens)])
    facts = json.loads((folder / "facts.json").read_text())
    print(f"model: GPT-NeoX, hidden {args.hidden}, {args.layers} layers, context {args.context}, vocabulary "
          f"{args.vocab}: {facts['params'] / 1e6:.1f}M parameters; documents: {facts['docs']} standard-library "
          f"docstrings, {facts['tokens']} tokens, {facts['one_window_docs']} of them fit one window")
    commands = {
        "mergemix": [sys.executable, "-m", "mergemix.evaluate", "--model", str(folder / "model"),
                     "--domain", f"docs:ood:{facts['tokens']}:{folder / 'docs'}", "--max-docs", str(facts["docs"]),
                     "--batch-size", str(args.batch_size), "--out", str(folder / "mergemix.csv"),
                     "--model-kind", "bench", "--model-id", "bench"],
        "hf": [*me, "--child", "hf"],
        "lm-eval": [str(lm_eval_python), *me[1:], "--child", "lm-eval", "--batch-size", str(args.batch_size)],
    }
    results, rows = {}, []
    for name in ["mergemix", *args.peers]:
        child = run_child(name, commands[name], env=OFFLINE)
        result = mergemix_result(folder / "mergemix.csv") if name == "mergemix" else \
            json.loads((folder / f"{name}.json").read_text())
        result["child"] = child
        result["ppl"] = math.exp(result["nll_sum"] / result["n_tokens"])
        results[name] = result
    reference = results["mergemix"]
    for name, r in results.items():
        rows.append({"contender": name, "wall s": round(r["child"].wall_s, 2), "tokens": r["n_tokens"],
                     "tokens/s": round(r["n_tokens"] / r["child"].wall_s), "peak RSS MiB": round(r["child"].peak_rss / MiB),
                     "perplexity": f"{r['ppl']:.6f}", "rel. diff vs mergemix": f"{r['ppl'] / reference['ppl'] - 1:+.2e}"})
    print(driver_rss_line())
    print()
    print(markdown_table(rows, ["contender", "wall s", "tokens", "tokens/s", "peak RSS MiB", "perplexity",
                                "rel. diff vs mergemix"]))
    print("(wall time of the whole child process: interpreter start, imports and model loading included)")
    print()
    for name in args.peers:
        r = results[name]
        print(f"ratio: mergemix / {name} tokens per second: {r['child'].wall_s / reference['child'].wall_s:.3f}")
    if "hf" in results and "lm-eval" in results:
        hf, le = results["hf"]["per_doc"], results["lm-eval"]["per_doc"]
        texts_fit = _one_window_mask(folder, args.context)
        same = [abs(a / b - 1) for a, b, fit in zip(le, hf, texts_fit, strict=True) if fit and b > 0]
        print(f"agreement: lm-eval vs the HF loop on the {len(same)} documents of one window: "
              f"max relative NLL difference {max(same, default=0.0):.2e}")
    print()
    if "hf" in results:
        rel = abs(reference["ppl"] / results["hf"]["ppl"] - 1)
        goal(f"mergemix perplexity equals the plain HF loop's to 1e-5 relative (difference {rel:.2e}, "
             f"tokens {reference['n_tokens']} vs {results['hf']['n_tokens']})",
             rel <= 1e-5 and reference["n_tokens"] == results["hf"]["n_tokens"])
    return 0


def _one_window_mask(folder: Path, context: int) -> list[bool]:
    """Which documents fit one window (tokens counted from the shard, as mergemix reads it)."""
    import numpy as np

    meta = json.loads((folder / "docs.json").read_text())
    index = np.fromfile(folder / "docs.idx", dtype=np.int64).reshape(-1, 2)
    starts = index[:, 0]
    lengths = np.append(starts[1:], meta["n_tokens"]) - starts - 1  # without the trailing EOS
    return [int(n) <= context for n in lengths]


if __name__ == "__main__":
    sys.exit(main())
