"""Shared fixtures: real text (standard-library docstrings), a tiny tokenizer, tiny models."""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Downloads and compiled DeepSpeed ops are cached across test runs (and CI steps).
CACHE = Path(os.environ.get("MERGEMIX_CACHE", REPO / ".cache" / "mergemix"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))


def stdlib_docstrings(modules: list[str]) -> dict[str, list[str]]:
    """Real English text shipped with Python: docstrings of a few stdlib modules, by module."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[str]] = {}
    for name in modules:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        out[name] = [d for d in docs if d and len(d) > 80]
    return out


@pytest.fixture(scope="session")
def texts() -> dict[str, list[str]]:
    return stdlib_docstrings(["argparse", "subprocess", "typing", "inspect", "pathlib", "tarfile"])


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, texts) -> Path:
    from mergemix.tokenize import train_bpe

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe([t for docs in texts.values() for t in docs], 512, out)
    return out


@pytest.fixture(scope="session")
def tiny_model_config():
    from mergemix.config import ModelConfig

    return ModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, context_length=32)


def make_checkpoint(path: Path, cfg, seed: int, seed_sha: str = "s" * 64, vocab: int = 512):
    """A randomly initialised tiny checkpoint folder written by mergemix's own saver."""
    import torch

    from mergemix import model as mm

    torch.manual_seed(seed)
    model = mm.build(cfg, vocab, 0)
    mm.save(model, path, {"kind": "unit", "seed_sha256": seed_sha})
    return model


@pytest.fixture(scope="session")
def tiny_workflow(tmp_path_factory) -> Path:
    """The tiny study of tests/test_workflow.py, run once to the end (shared, read-only:
    tests that change it work on a copy)."""
    from tests.test_workflow import complete_run

    return complete_run(tmp_path_factory.mktemp("workflow"))
