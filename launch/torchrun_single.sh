#!/usr/bin/env bash
# One machine, torchrun launcher: NPROC ranks (default 2) run the same job as `shoal train`.
#   NPROC=4 launch/torchrun_single.sh CONFIG [KEY=VALUE ...]
set -euo pipefail
exec torchrun --standalone --nproc_per_node="${NPROC:-2}" -m shoal worker "$@"
