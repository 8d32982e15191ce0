#!/usr/bin/env bash
# Create .venv (once) and install mergemix with the workflow and test tools into it.
# torch is pinned in the same pip command as deepspeed so that pip keeps the CPU build
# instead of resolving a CUDA one (GBs); on a GPU machine, drop the pin or pick your build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".[workflow,test]"
