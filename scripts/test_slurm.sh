#!/usr/bin/env bash
# The Slurm tests for real: a one-node Slurm cluster on loopback (Debian packages installed
# with apt-get if missing), tests/test_slurm.py through profiles/slurm, and the cluster
# stopped again whatever happens. Needs root. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/python ]]; then
    export PATH="$PWD/.venv/bin:$PATH"
fi

bash scripts/slurm_cluster.sh install
base=$(mktemp -d "${TMPDIR:-/tmp}/mergemix-slurm.XXXXXX")
finish() {
    local rc=$?
    bash scripts/slurm_cluster.sh stop "$base" || rc=1
    if [[ $rc -eq 0 ]]; then
        rm -rf "$base"
    else
        echo "test_slurm: failed; the cluster's logs are in $base/log" >&2
    fi
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

bash scripts/slurm_cluster.sh start "$base"
# A missing or broken cluster is a failure here, not a skip.
MERGEMIX_REQUIRE_SLURM=1 SLURM_CONF="$base/etc/slurm.conf" python -m pytest tests/test_slurm.py "$@"
