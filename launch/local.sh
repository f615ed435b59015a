#!/usr/bin/env bash
# One machine, Ray launcher: an embedded Ray cluster starts scaling.num_workers DDP ranks.
#   launch/local.sh [CONFIG] [KEY=VALUE ...]      (no CONFIG: the bundled quickstart)
set -euo pipefail
exec shoal train "$@"
