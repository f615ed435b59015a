#!/usr/bin/env bash
# Join a Ray cluster started with ray_head.sh:   HEAD=node0.example launch/ray_worker.sh
# Needs the head's auth token (RAY_AUTH_TOKEN, or ~/.ray/auth_token copied from the head).
set -euo pipefail
export RAY_AUTH_MODE=token
exec ray start --block --address="${HEAD:?set HEAD}:${PORT:-6379}" ${NUM_CPUS:+--num-cpus=$NUM_CPUS} ${NUM_GPUS:+--num-gpus=$NUM_GPUS}
