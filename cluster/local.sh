#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine, for trying rayft's cluster path locally:
#   cluster/local.sh up      head (ray start --head) + worker node(s) (ray start --address), each its
#                            own raylet with its own CPU count; an MLflow tracking server; a shared
#                            storage folder. Everything listens on 127.0.0.1.
#   cluster/local.sh status  what runs, and the addresses to use
#   cluster/local.sh down    stops exactly the processes `up` started (by their recorded pids)
#   cluster/local.sh kill-node worker-1   simulates a node failure (SIGKILL); `up` restarts it
# Settings (environment): RAYFT_CLUSTER_DIR (state, logs, storage; default .rayft-cluster),
# RAY_TEMP_DIR (/tmp/ray-rayft-$RAY_PORT), RAY_PORT (6390), DASHBOARD_PORT (8265), MLFLOW_PORT (5000),
# AGENT_PORT (52365: each node's dashboard agent; a second cluster on this machine needs its own, else
# its head's agent cannot bind and Ray's job server answers "No available agent"), HEAD_CPUS (2), WORKER_CPUS (2),
# WORKERS (1). Uses the ray and mlflow of .venv when there is one.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${RAYFT_CLUSTER_DIR:-$ROOT/.rayft-cluster}"
BIN="$ROOT/.venv/bin"; [ -x "$BIN/ray" ] || BIN="$(dirname "$(command -v ray)")"
RAY_PORT="${RAY_PORT:-6390}"; DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"; MLFLOW_PORT="${MLFLOW_PORT:-5000}"
AGENT_PORT="${AGENT_PORT:-52365}"
# Ray's own session files: a short path, since its unix socket paths must stay under 108 bytes.
# Each node has its own (worker i: $RAY_TEMP-wi), as on separate machines: nodes sharing one would
# delete each other's job working directories when cleaning up.
RAY_TEMP="${RAY_TEMP_DIR:-/tmp/ray-rayft-$RAY_PORT}"
HEAD_CPUS="${HEAD_CPUS:-2}"; WORKER_CPUS="${WORKER_CPUS:-2}"; WORKERS="${WORKERS:-1}"
# With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 Ray keeps the head on 127.0.0.1 (with 1 it swaps 127.0.0.1
# for the machine's public address); a worker node needs 1 (else `ray start --address` refuses), so
# worker node i gets its own loopback address 127.0.0.(i+1), which Ray leaves as it is, and reaches the
# head as [::ffff:127.0.0.1] (the same loopback address, in a spelling Ray does not swap). Drivers on
# this machine need RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 too (`status` prints it). Each node's processes
# get RAY_ADDRESS: with several nodes' processes on one machine, Ray's own address discovery (used by
# Ray Train's placement-group cleaner) finds two GCS addresses and refuses to pick one.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
# job entrypoints (`python -m rayft ...`) run with this environment's python, as on an image with rayft
export PATH="$BIN:$PATH"

started() { [ -f "$STATE/pids" ] && while read -r pid _; do alive "$pid" && return 0; done < "$STATE/pids"; return 1; }

wait_for() {  # wait_for LOGFILE PATTERN PID: until the process logs PATTERN (or dies)
  for _ in $(seq 1 600); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    alive "$3" || { echo "failed, see $1" >&2; tail -20 "$1" >&2; return 1; }
    sleep 0.2
  done
  echo "timed out waiting for '$2' in $1" >&2; return 1
}

pid_of() { [ -f "$STATE/pids" ] && awk -v role="$1" '$2 == role {print $1}' "$STATE/pids"; }
alive() { kill -0 "$1" 2>/dev/null && [ "$(ps -o stat= -p "$1" | cut -c1)" != Z ]; }  # a zombie is gone
running() { local pid; pid="$(pid_of "$1")"; [ -n "$pid" ] && alive "$pid"; }
record() {  # record PID ROLE, replacing the role's old line
  { [ -f "$STATE/pids" ] && awk -v role="$2" '$2 != role' "$STATE/pids"; echo "$1 $2"; } > "$STATE/pids.new"
  mv "$STATE/pids.new" "$STATE/pids"
}

start_worker() {  # start_worker I: worker node I joins the head
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_ADDRESS="[::ffff:127.0.0.1]:$RAY_PORT" \
  setsid "$BIN/ray" start --block --address="[::ffff:127.0.0.1]:$RAY_PORT" --node-ip-address="127.0.0.$(($1 + 1))" \
    --dashboard-agent-listen-port="$AGENT_PORT" --num-cpus="$WORKER_CPUS" --temp-dir="$RAY_TEMP-w$1" --disable-usage-stats > "$STATE/logs/worker-$1.log" 2>&1 &
  record "$!" "worker-$1"
  wait_for "$STATE/logs/worker-$1.log" "Ray runtime started" "$!"
}

up() {
  # starts whatever is not running: the whole cluster, or a node that was killed (kill-node)
  mkdir -p "$STATE/logs" "$STATE/storage" "$STATE/mlartifacts"; touch "$STATE/pids"
  # the tracking server starts beside the nodes (its database set-up takes seconds of its own)
  local mlflow_starting=""
  if ! running mlflow; then
    # MLflow's server-side jobs (GenAI evaluation, prompt optimisation) start nine idle processes
    # that poll; rayft only logs runs to it
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    setsid "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "sqlite:///$STATE/mlflow.db" --artifacts-destination "$STATE/mlartifacts" \
      > "$STATE/logs/mlflow.log" 2>&1 &
    record "$!" mlflow
    mlflow_starting=1
  fi
  # --block keeps each node's `ray start` in the foreground of its own session: killing that
  # process group stops exactly that node.
  if ! running head; then
    RAY_ADDRESS="127.0.0.1:$RAY_PORT" \
    setsid "$BIN/ray" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" --num-cpus="$HEAD_CPUS" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --dashboard-agent-listen-port="$AGENT_PORT" --temp-dir="$RAY_TEMP" --disable-usage-stats > "$STATE/logs/head.log" 2>&1 &
    record "$!" head
    wait_for "$STATE/logs/head.log" "Ray runtime started" "$!"
  fi
  for i in $(seq 1 "$WORKERS"); do
    running "worker-$i" && continue
    # A raylet can die while it registers when the machine is loaded (seen once: a failed check in
    # Ray's NodeManager start-up on a busy 2-core machine): one more try before giving up.
    start_worker "$i" || {
      kill -KILL -- "-$(pid_of "worker-$i")" 2>/dev/null || true
      mv "$STATE/logs/worker-$i.log" "$STATE/logs/worker-$i.failed.log"
      echo "worker-$i did not start (logs/worker-$i.failed.log); trying again" >&2
      start_worker "$i" || return 1
    }
  done
  [ -z "$mlflow_starting" ] || wait_for "$STATE/logs/mlflow.log" "Listening at\|Uvicorn running\|Application startup complete" "$(pid_of mlflow)"
  status
}

kill_node() {  # a node failure: SIGKILL to the node's whole process group (raylet, its workers)
  local pid; pid="$(pid_of "$1")"
  [ -n "$pid" ] && [ "$1" != mlflow ] || { echo "kill-node: no node named '$1' (see status)" >&2; return 2; }
  kill -KILL -- "-$pid" 2>/dev/null || true
  # until it is gone: an `up` right after this must see the node down and start it again
  for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
  echo "$1 killed (cluster/local.sh up brings it back)"
}

status() {
  if ! started; then echo "down"; return 0; fi
  while read -r pid role; do
    alive "$pid" && echo "$role: running (pid $pid)" || echo "$role: stopped"
  done < "$STATE/pids"
  cat <<EOF
RAY_ADDRESS=127.0.0.1:$RAY_PORT RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
RAYFT_JOBS_ADDRESS=http://127.0.0.1:$DASHBOARD_PORT     # rayft submit / rayft jobs
tracking.mlflow_uri: http://127.0.0.1:$MLFLOW_PORT
distributed.storage_path: $STATE/storage                # shared by every node
EOF
}

down() {
  [ -f "$STATE/pids" ] || { echo "down"; return 0; }
  # each process group gets SIGTERM (a `ray start --block` then stops its node), all at once; what
  # still runs after 10 s gets SIGKILL
  while read -r pid _; do kill -TERM -- "-$pid" 2>/dev/null || true; done < "$STATE/pids"
  for _ in $(seq 1 50); do started || break; sleep 0.2; done
  while read -r pid role; do
    alive "$pid" && { kill -KILL -- "-$pid" 2>/dev/null || true; echo "$role killed"; } || echo "$role stopped"
  done < "$STATE/pids"
  rm -f "$STATE/pids"
}

case "${1:-}" in
  up) up ;; down) down ;; status) status ;; kill-node) kill_node "${2:-}" ;;
  *) echo "usage: cluster/local.sh up|down|status|kill-node ROLE" >&2; exit 2 ;;
esac
