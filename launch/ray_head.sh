#!/usr/bin/env bash
# Start a Ray head node by hand (then ray_worker.sh on the other nodes, then ray_submit.sh).
#   launch/ray_head.sh                 # binds the dashboard / Jobs API to 127.0.0.1 (reach it through an SSH tunnel)
#   DASHBOARD_HOST=0.0.0.0 launch/ray_head.sh   # only on a trusted network: the Jobs API runs any code it is sent
# Token authentication is on: clients need the head's ~/.ray/auth_token (copy it, or set RAY_AUTH_TOKEN).
# Stop it with Ctrl-C (it runs in the foreground); never `ray stop`, which ends every Ray process on the machine.
set -euo pipefail
export RAY_AUTH_MODE=token
exec ray start --head --block --port="${PORT:-6379}" \
  --dashboard-host="${DASHBOARD_HOST:-127.0.0.1}" --dashboard-port="${DASHBOARD_PORT:-8265}" \
  --ray-client-server-port="${CLIENT_PORT:-20001}" ${NUM_CPUS:+--num-cpus=$NUM_CPUS} ${NUM_GPUS:+--num-gpus=$NUM_GPUS}
