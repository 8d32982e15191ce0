#!/usr/bin/env bash
# The test suite: unit tests, the bad-input checks, the workflow end to end on a tiny config,
# and (for the full suite, i.e. without pytest arguments) the same workflow through a real
# one-node Slurm cluster that scripts/test_slurm.sh starts and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
snakemake --lint
snakefmt --check Snakefile rules/
python -m pytest "$@"
if [[ $# -eq 0 ]]; then
    bash scripts/test_slurm.sh
fi
