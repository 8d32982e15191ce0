#!/usr/bin/env bash
# Create .venv (once) and install mergemix with the workflow and test tools into it.
# torch is pinned in the same pip command as deepspeed (a dependency of the package) so that
# deepspeed cannot pull another torch. Which build of 2.13.0 pip takes depends on the
# index: PyPI's Linux wheel is the CUDA build (GBs); on a machine without a GPU, set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first (README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: mergemix needs Python 3.11 or newer (Snakemake 9 does); python3 here is $(python3 -V 2>&1)" >&2
  exit 1
fi
# A .venv without pip is what a failed `python3 -m venv` leaves (Debian without
# python3-venv): venv is run on it again, which adds pip and removes nothing.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  if ! python3 -m venv .venv; then
    echo "error: python3 -m venv failed: on Debian or Ubuntu install the venv module (apt-get install python3-venv), then rerun" >&2
    exit 1
  fi
fi
# DeepSpeed compiles a small C++ op (its CPU communication backend) on the first training
# job: without a compiler and Python's headers every training job would fail there.
if ! command -v c++ >/dev/null || ! python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  echo "warning: no C++ compiler or no Python.h found: DeepSpeed needs both to train (apt-get install g++ python3-dev)" >&2
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[workflow,test]"
