#!/usr/bin/env bash
# The test suite against real servers on loopback (Orthanc, Prefect's ephemeral backend, the BIDS validator).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH" NIPYPE_NO_ET=1 PREFECT_HOME="${PREFECT_HOME:-$(mktemp -d)}"
exec .venv/bin/python -m pytest "$@"
