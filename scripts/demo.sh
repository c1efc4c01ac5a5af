#!/usr/bin/env bash
# The demo: bundled Orthanc on loopback -> pseudonymised, validated BIDS dataset in ./pacs2bids-demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export NIPYPE_NO_ET=1
exec .venv/bin/pacs2bids demo "$@"
