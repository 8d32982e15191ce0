"""What the peer benchmarks share: the machine record, child processes measured one by
one, the page cache, the peers' virtualenv and the printed tables.

Each contender runs in a fresh child process, so its peak memory is its own (the
child's `ru_maxrss` from `wait4`) and no contender profits from another's imports or
warmed-up allocator. Wall time is measured around the whole child: interpreter start
and imports included, which is what a workflow job pays too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MERGEMIX_CACHE", REPO / ".cache" / "mergemix"))
# Peers live in their own virtualenv so that nothing they pull in changes the project's.
PEER_VENV = CACHE / "bench-venv"
PEER_PACKAGES = ["mergekit==0.1.5", "lm-eval==0.4.13"]
# pip must never resolve a CUDA torch (GBs) for the peers: the project's CPU build is the
# only torch they may use. A constraint makes pip fail instead of downloading another.
TORCH_PIN = "torch==2.13.0"
MiB = 1 << 20
# Standard-library modules whose docstrings are the benchmarks' real English text.
MODULES = ["argparse", "subprocess", "typing", "inspect", "pathlib", "tarfile", "collections/__init__",
           "functools", "threading", "logging/__init__", "email/message", "zipfile", "unittest/case",
           "asyncio/events", "datetime", "decimal", "fractions", "statistics", "shutil", "tempfile"]
# Hugging Face libraries must not try the network from the children (there is none to reach).
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


class BenchError(RuntimeError):
    """A benchmark that cannot run here, with the reason and what to do."""


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return float("nan")


def torch_facts() -> dict:
    """torch's version, threads and GPU, asked of a child so that this process stays small.

    A child's ru_maxrss starts from its parent's resident size at fork (Linux keeps the
    high-water mark across exec), so a benchmark that imported torch would add some
    300 MiB to every contender's peak. The driving process therefore never imports it
    before the measurements are done.
    """
    code = ("import json, torch; print(json.dumps({'version': torch.__version__, 'threads': torch.get_num_threads(), "
            "'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))")
    return json.loads(subprocess.check_output([sys.executable, "-c", code], text=True))


def machine_line() -> str:
    """One line to paste with every result: the machine and how busy it was."""
    facts = torch_facts()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {cpu_name()}, {os.cpu_count()} CPUs, {memory_gib():.0f} GiB, GPU: {facts['gpu'] or 'none'}; "
            f"load average (1, 5, 15 min): {load}; torch {facts['version']} ({facts['threads']} threads), "
            f"Python {platform.python_version()}; {datetime.date.today().isoformat()}")


@dataclass
class Child:
    """One measured child process."""

    name: str
    wall_s: float
    peak_rss: int  # bytes: the child's ru_maxrss (resident set high-water mark)
    output: str
    peak_anon: int = 0  # bytes: the most anonymous memory seen (RssAnon), when sampled


def _sample_anon(pid: int, stop: threading.Event, peak: list[int]) -> None:
    """Poll /proc/PID/status every 20 ms for RssAnon: the child's own memory, without the
    file pages it maps (a memory-mapped cache's pages count in ru_maxrss, though the kernel
    may drop them at any time)."""
    status = Path(f"/proc/{pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        except OSError:
            return
        stop.wait(0.02)


def run_child(name: str, cmd: list[str], env: dict[str, str] | None = None, keep_output: bool = True,
              sample_anon: bool = False) -> Child:
    """Run `cmd` to completion; its wall time and peak RSS, or BenchError with its output's tail.

    keep_output=False sends stdout to /dev/null (`cat FILES > /dev/null`): reading a
    large output back would grow this process, and with it every later child's peak.
    sample_anon=True also samples its anonymous memory (`Child.peak_anon`; Linux only).
    """
    import tempfile

    with tempfile.TemporaryFile() as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sink if keep_output else subprocess.DEVNULL, stderr=sink,
                                env={**os.environ, **(env or {})}, cwd=REPO)
        stop, anon = threading.Event(), [0]
        sampler = threading.Thread(target=_sample_anon, args=(proc.pid, stop, anon), daemon=True)
        if sample_anon:
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        wall = time.perf_counter() - start
        stop.set()
        if sample_anon:
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        sink.seek(0)
        output = sink.read().decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"{name} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{output[-3000:]}")
    return Child(name, wall, usage.ru_maxrss * 1024, output, anon[0])


def driver_rss_line() -> str:
    """This process's own peak: every child's ru_maxrss starts from at least this much."""
    import resource

    return f"driver process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (a floor under every child's peak)"


def scratch(prefix: str) -> Path:
    """A fresh folder under the cache folder (on the repository's disk: the merge benchmark
    writes gigabytes, more than a RAM-backed /tmp may hold). The caller removes it."""
    import tempfile

    CACHE.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"bench-{prefix}-", dir=CACHE))


def drop_page_cache() -> bool:
    """Write dirty pages and drop the page cache (root only); False where not allowed."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def peer_python(packages: list[str] | None = None) -> Path:
    """The peers' interpreter: a virtualenv under the cache folder, made on first use.

    It sees the project's environment (torch, transformers, safetensors) through a
    `.pth` file, the way `--system-site-packages` would if the project's interpreter were
    not itself a virtualenv, and installs the peers beside it with torch pinned to the
    build already there. Packages the peers need in other versions land in the peer
    venv and shadow the project's there only.
    """
    import site

    packages = packages or PEER_PACKAGES
    python = PEER_VENV / "bin" / "python"
    stamp = PEER_VENV / "mergemix-peers.txt"
    wanted = "\n".join(sorted(packages)) + "\n"
    if python.is_file() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    from importlib.metadata import version

    installed = version("torch")
    if installed.split("+")[0] != TORCH_PIN.split("==")[1]:
        raise BenchError(f"the project's torch is {installed}, the peers are pinned to {TORCH_PIN}: "
                         "edit TORCH_PIN in benchmarks/_common.py to the installed version")
    print(f"installing {', '.join(packages)} into {PEER_VENV} (once; torch pinned to the project's {TORCH_PIN})",
          flush=True)
    done = subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"cannot create the peers' virtualenv {PEER_VENV}: {done.stderr.strip()[-500:]}")
    purelib = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                           text=True).strip())
    (purelib / "_mergemix_project.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    constraints = PEER_VENV / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")
    log = PEER_VENV / "pip-install.log"
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints), *packages]
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError(f"pip could not install {', '.join(packages)} into {PEER_VENV} (log: {log}); "
                         f"last lines:\n  " + "\n  ".join(tail) +
                         "\nIf it wanted another torch, the peers need a torch this project does not use: "
                         "rerun with their packages pinned to older versions, or leave that peer out (--peers).")
    stamp.write_text(wanted)
    return python


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub table; numbers right-aligned."""
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("--:" if n else ":--" for n in numeric) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def goal(text: str, met: bool) -> bool:
    print(f"goal {'PASS' if met else 'FAIL'}: {text}")
    return met


def stdlib_docstrings(modules: list[str]) -> dict[str, list[str]]:
    """Real English text shipped with Python: the docstrings (over 80 characters) of stdlib modules.

    The same source as the tests' fixture (tests/conftest.py), so benchmarks need no download.
    """
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[str]] = {}
    for name in modules:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        out[name] = [d for d in docs if d and len(d) > 80]
    return out
