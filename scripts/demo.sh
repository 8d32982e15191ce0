#!/usr/bin/env bash
# The built-in demo, end to end: download real text, train, merge, evaluate, analyse.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
time snakemake --profile profiles/local "$@"
