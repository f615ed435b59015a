#!/usr/bin/env bash
# Submit a job to a Ray cluster through its Jobs API and follow it:
#   HEAD=node0.example launch/ray_submit.sh CONFIG [KEY=VALUE ...] [--no-wait]
# Uploads the current directory (your model code); set run.dir to storage the cluster shares.
set -euo pipefail
exec shoal submit --address "http://${HEAD:-127.0.0.1}:${DASHBOARD_PORT:-8265}" "$@"
