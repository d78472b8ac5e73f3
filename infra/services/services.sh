#!/usr/bin/env bash
# Starts, stops and reports the `services` profile on this machine, without containers:
#   MLflow tracking server on PostgreSQL (artifacts on local disk) and a Prefect server,
# on the loopback addresses of core/recsys_core/profiles/services.yaml.
#
#   infra/services/services.sh start|stop|status
#
# Addresses, ports and the artifact root come from `load_settings("services")` (so RECSYS_*
# variables move them too). Pids and logs live in <data_dir>/services/. Environment:
#   PYTHON                 interpreter of the project's virtualenv (default: .venv/bin/python)
#   RECSYS_MLFLOW_DB_URI   MLflow's backend store
#                          (default: postgresql+psycopg://postgres@127.0.0.1:5432/recsys_mlflow)
#   SERVICES_TIMEOUT_S     seconds to wait for a server to answer (default: 120)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's GenAI job runner: seven huey consumers the
#                          platform does not use (default here: false)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
BIN="$(dirname "$PYTHON")"
MLFLOW_DB_URI="${RECSYS_MLFLOW_DB_URI:-postgresql+psycopg://postgres@127.0.0.1:5432/recsys_mlflow}"
TIMEOUT_S="${SERVICES_TIMEOUT_S:-120}"

config="$("$PYTHON" infra/services/services_config.py env)" || {
  echo "services: cannot read the services settings profile" >&2; exit 1; }
eval "$config"
STATE_DIR="$DATA_DIR/services"
MLFLOW_URL="http://$MLFLOW_HOST:$MLFLOW_PORT"

log() { echo "services: $*" >&2; }

pid_of() {  # prints the pid of a running service, or nothing
  local file="$STATE_DIR/$1.pid"
  [[ -f "$file" ]] || return 0
  local pid; pid="$(cat "$file")"
  if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

port_busy() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_healthy() {  # name url: polls until HTTP 200 or the deadline; shows the log on failure
  local name="$1" url="$2" deadline=$((SECONDS + TIMEOUT_S))
  until curl -fs -o /dev/null --max-time 2 "$url"; do
    if [[ -z "$(pid_of "$name")" ]]; then
      log "$name exited during start-up; last log lines:"; tail -n 30 "$STATE_DIR/$name.log" >&2
      return 1
    fi
    if (( SECONDS > deadline )); then
      log "$name not healthy at $url after ${TIMEOUT_S}s; last log lines:"
      tail -n 30 "$STATE_DIR/$name.log" >&2
      return 1
    fi
    sleep 0.5
  done
  log "$name is up at $url"
}

launch() {  # name command...: starts a command in its own process group, detached
  local name="$1"; shift
  if [[ -n "$(pid_of "$name")" ]]; then log "$name already running (pid $(pid_of "$name"))"; return 0; fi
  setsid "$@" >"$STATE_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE_DIR/$name.pid"
}

start() {
  mkdir -p "$STATE_DIR" "$MLFLOW_ARTIFACTS" "$STATE_DIR/prefect"
  for service in "mlflow $MLFLOW_HOST $MLFLOW_PORT" "prefect $PREFECT_HOST $PREFECT_PORT"; do
    set -- $service
    if [[ -z "$(pid_of "$1")" ]] && port_busy "$2" "$3"; then
      log "port $2:$3 for $1 is taken by another process"; exit 1
    fi
  done
  pg_isready -q -h 127.0.0.1 -p 5432 || { log "PostgreSQL does not answer on 127.0.0.1:5432"; exit 1; }
  "$PYTHON" infra/services/services_config.py create-db "$MLFLOW_DB_URI" $FEAST_REGISTRY

  MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
  launch mlflow "$BIN/mlflow" server \
    --backend-store-uri "$MLFLOW_DB_URI" \
    --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS" \
    --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers 1 \
    --allowed-hosts "$MLFLOW_HOST:$MLFLOW_PORT,localhost:$MLFLOW_PORT"
  PREFECT_HOME="$STATE_DIR/prefect" \
  PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:///$STATE_DIR/prefect/prefect.db" \
  PREFECT_SERVER_ANALYTICS_ENABLED=false \
  PREFECT_API_URL="$PREFECT_API" \
  launch prefect "$BIN/prefect" server start --host "$PREFECT_HOST" --port "$PREFECT_PORT"

  wait_healthy mlflow "$MLFLOW_URL/health" && wait_healthy prefect "$PREFECT_API/health" || {
    stop; exit 1; }
  log "ready: RECSYS_PROFILE=services (MLflow $MLFLOW_URL, Prefect $PREFECT_API)"
}

stop_one() {  # name: SIGTERM to the process group, SIGKILL after 20 s
  local name="$1" pid; pid="$(pid_of "$name")"
  if [[ -z "$pid" ]]; then rm -f "$STATE_DIR/$name.pid"; return 0; fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 -- "-$pid" 2>/dev/null; then
    log "$name did not stop in 20 s; killing"; kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$STATE_DIR/$name.pid"
  log "$name stopped"
}

stop() {  # both at once: each waits for its own process group
  stop_one prefect & local prefect_stop=$!
  stop_one mlflow
  wait "$prefect_stop"
}

status() {
  local code=0
  for name in mlflow prefect; do
    local url; [[ "$name" == mlflow ]] && url="$MLFLOW_URL/health" || url="$PREFECT_API/health"
    local pid; pid="$(pid_of "$name")"
    if [[ -n "$pid" ]] && curl -fs -o /dev/null --max-time 2 "$url"; then
      echo "$name: running (pid $pid) $url"
    elif [[ -n "$pid" ]]; then
      echo "$name: starting or unhealthy (pid $pid) $url"; code=1
    else
      echo "$name: stopped"; code=3
    fi
  done
  return $code
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
