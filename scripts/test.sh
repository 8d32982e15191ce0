#!/usr/bin/env bash
# The test suite: unit tests, the bad-input checks, and the workflow end to end on a tiny config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
snakemake --lint
snakefmt --check Snakefile rules/
python -m pytest "$@"
