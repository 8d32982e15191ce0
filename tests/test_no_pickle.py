"""No pickle is ever loaded from a path a user gives: checkpoints are safetensors.

Two checks: a scan of the package's source for every way Python code can unpickle, and
a booby-trapped checkpoint (a pickle that would create a file when loaded) that every
stage reading checkpoints must refuse without running it.
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from mergemix import model as mm
from tests.conftest import REPO, make_checkpoint

SOURCES = sorted((REPO / "src" / "mergemix").rglob("*.py")) + sorted((REPO / "scripts").rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(path: Path) -> list[str]:
    """Every place in `path` that could unpickle data, as 'file:line: what'."""
    found = []
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        where = f"{shown}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr = node.func.attr
            owner = ast.unparse(node.func.value)
            if attr == "load" and owner == "torch" and not _is_true(_keyword(node, "weights_only")):
                found.append(f"{where}: torch.load without weights_only=True")
            if attr == "load" and owner in ("np", "numpy") and _is_true(_keyword(node, "allow_pickle")):
                found.append(f"{where}: numpy.load with allow_pickle=True")
            if attr in ("read_pickle", "from_pickle"):
                found.append(f"{where}: {owner}.{attr}")
            if attr == "from_pretrained" and isinstance(_keyword(node, "use_safetensors"), ast.Constant) \
                    and _keyword(node, "use_safetensors").value is False:
                found.append(f"{where}: from_pretrained(use_safetensors=False)")
    return found


def test_the_scanner_catches_each_unsafe_form(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text("import pickle\nimport torch, numpy as np\nfrom dill import loads\n"
                      "torch.load('x')\ntorch.load('x', weights_only=False)\nnp.load('x', allow_pickle=True)\n"
                      "torch.load('x', weights_only=True)\nnp.load('x')\n")
    found = unsafe_loads(sample)
    assert [f.split(": ", 1)[1] for f in found] == [
        "import pickle", "from dill import ...", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "numpy.load with allow_pickle=True"], found


def test_package_source_never_unpickles():
    assert SOURCES, "no sources found"
    found = [hit for path in SOURCES for hit in unsafe_loads(path)]
    assert not found, "unsafe deserialisation:\n" + "\n".join(found)


class _Trap:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def trapped(tmp_path, tiny_model_config):
    """A checkpoint folder whose weights exist only as a booby-trapped pytorch_model.bin."""
    folder = tmp_path / "trapped"
    make_checkpoint(folder, tiny_model_config, 1)
    (folder / mm.WEIGHTS).unlink()
    marker = tmp_path / "pickle-was-loaded"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": _Trap(marker)}))
    return folder, marker


def test_stages_refuse_a_pickled_checkpoint(trapped, tmp_path, tiny_model_config):
    folder, marker = trapped
    make_checkpoint(tmp_path / "other", tiny_model_config, 2)
    commands = {
        "merge": ["-m", "mergemix.merge", "--method", "micro", "--model", f"a={folder}",
                  "--model", f"b={tmp_path / 'other'}", "--out", str(tmp_path / "merged")],
        "evaluate": ["-m", "mergemix.evaluate", "--model", str(folder), "--domain", f"d:ood:100:{tmp_path / 'none'}",
                     "--out", str(tmp_path / "rows.csv"), "--model-kind", "unit", "--model-id", "t"],
    }
    for stage, args in commands.items():
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode != 0, stage
        assert mm.WEIGHTS in done.stderr, (stage, done.stderr[-1500:])
        assert not marker.exists(), f"{stage} unpickled a user's file"


def test_loading_in_process_never_falls_back_to_pickle(trapped):
    folder, marker = trapped
    with pytest.raises(mm.CheckpointError, match=mm.WEIGHTS):
        mm.load(folder)
    assert not marker.exists()
