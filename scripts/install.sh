#!/usr/bin/env bash
# Create .venv (once) and install mergemix with the workflow and test tools into it.
# torch is pinned in the same pip command as deepspeed (an extra of the package) so that
# deepspeed cannot pull another torch. Which build of 2.13.0 pip takes depends on the
# index: PyPI's Linux wheel is the CUDA build (GBs); on a machine without a GPU, set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first (README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[workflow,test]"
