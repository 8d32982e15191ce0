"""Makes a job see only what its rule's conda environment declares (tests/test_envs.py).

Python imports this module at start-up when its folder is on PYTHONPATH. If the process
was started as `python -m <module>` and MERGEMIX_ABSENT (JSON: module -> top-level
import names) lists that module, those packages become absent for it: importing one
raises ModuleNotFoundError and importlib.util.find_spec returns None, as in an
environment that lacks them. Every other process, Snakemake included, is left alone.
"""

import importlib.machinery
import json
import os
import sys


class _Without:
    """sys.meta_path's PathFinder, blind to some top-level packages."""

    def __init__(self, absent):
        self.absent = frozenset(absent)

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.absent:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()

    def find_distributions(self, *args, **kwargs):  # importlib.metadata asks the finders
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)


def _install():
    argv = getattr(sys, "orig_argv", [])
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    absent = json.loads(os.environ.get("MERGEMIX_ABSENT", "{}")).get(module)
    if absent:
        sys.meta_path[:] = [_Without(absent) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]


_install()
