#!/usr/bin/env bash
# DoppelBot's production topology on one machine, each part a process of its own on
# 127.0.0.1 (README, "Running in production"):
#   postgres      one cluster: the message store, MLflow's and Prefect's databases
#   mlflow        the tracking server and registry, on PostgreSQL, serving artifacts
#   prefect       the server (API and UI) on PostgreSQL, with the process work pool
#                 `doppel` and the deployments of prefect.yaml
#   worker        a Prefect worker on `doppel`: it runs training, evaluation and the gate
#   emulator      the Slack Web API emulator, playing Slack
#   serve-1..N    `doppel serve` model API replicas, keyed, with an admin token
#   slack-app     `doppel slack-app`, calling every replica, spread and failed over
#
#   scripts/stack.sh up       start what is not running; return once every part is healthy
#   scripts/stack.sh down     stop what `up` started, and nothing else
#   scripts/stack.sh status   which parts run
#   scripts/stack.sh env      the stack's settings: eval "$(scripts/stack.sh env)"
#
# Everything lives in DOPPEL_STACK_DIR (default: .stack in the repo): logs/<part>.log,
# run/<part>.pid, the databases, MLflow's artifacts, and stack.env (mode 600), which keeps
# the ports and secrets of the first `up` for the next ones: edit it to change them.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="$(realpath -m "${DOPPEL_STACK_DIR:-$REPO/.stack}")"
BIN="${DOPPEL_STACK_BIN:-$REPO/.venv/bin}"  # doppel, mlflow, prefect and python
SETTINGS="$STACK/stack.env"
LOGS="$STACK/logs"
RUN="$STACK/run"
WAIT="${DOPPEL_STACK_WAIT_SECONDS:-300}"  # the longest any one part may take to be healthy
POOL=doppel
WORKER=doppel-stack

say() { printf 'stack: %s\n' "$*"; }
die() {
  printf 'stack: %s\n' "$1" >&2
  if [ -n "${2:-}" ] && [ -f "$2" ]; then
    printf -- '--- the end of %s:\n' "$2" >&2
    tail -n 25 "$2" >&2
  fi
  exit 1
}

# -- settings: what the first `up` saved, else the caller's environment, else the default --
# (a running part keeps its port and secrets: change them in stack.env, between down and up)

setting() {
  local name=$1 default=$2 value=""
  if [ -f "$SETTINGS" ]; then
    value="$(unset "$name" && . "$SETTINGS" && printf '%s' "${!name:-}")"
  fi
  value="${value:-${!name:-}}"
  printf '%s' "${value:-$default}"
}

secret() { "$BIN/python" -c 'import secrets; print(secrets.token_urlsafe(32))'; }

resolve_settings() {
  POSTGRES_PORT="$(setting DOPPEL_STACK_POSTGRES_PORT 5433)"
  MLFLOW_PORT="$(setting DOPPEL_STACK_MLFLOW_PORT 5000)"
  PREFECT_PORT="$(setting DOPPEL_STACK_PREFECT_PORT 4200)"
  EMULATOR_PORT="$(setting DOPPEL_STACK_EMULATOR_PORT 8765)"
  SERVE_PORTS="$(setting DOPPEL_STACK_SERVE_PORTS 8001,8002)"  # one replica per port
  SLACK_APP_PORT="$(setting DOPPEL_STACK_SLACK_APP_PORT 3000)"
  EXPORT="$(setting DOPPEL_STACK_EXPORT "$STACK/slack/workspace.zip")"  # what Slack holds
  MODEL_CACHE="$(setting DOPPEL_MODEL_CACHE "$STACK/models")"
  API_KEYS="$(setting DOPPEL_SERVE__API_KEYS "")"
  ADMIN_TOKEN="$(setting DOPPEL_SERVE__ADMIN_TOKEN "")"
  SIGNING_SECRET="$(setting SLACK_SIGNING_SECRET "")"
  API_KEYS="${API_KEYS:-$(secret)}"
  ADMIN_TOKEN="${ADMIN_TOKEN:-$(secret)}"
  SIGNING_SECRET="${SIGNING_SECRET:-$(secret)}"
  IFS=, read -ra REPLICA_PORTS <<<"$SERVE_PORTS"
  local urls=() port
  for port in "${REPLICA_PORTS[@]}"; do urls+=("http://127.0.0.1:$port"); done
  SERVING_URLS="$(IFS=,; printf '%s' "${urls[*]}")"
  PG="doppel@127.0.0.1:$POSTGRES_PORT"
  MLFLOW_URL="http://127.0.0.1:$MLFLOW_PORT"
  PREFECT_URL="http://127.0.0.1:$PREFECT_PORT/api"
  EMULATOR_URL="http://127.0.0.1:$EMULATOR_PORT"
}

quoted() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# stack.env: what every part and every operator shell of this stack shares.
write_settings() {
  mkdir -p "$STACK"
  local file="$SETTINGS.new"
  (umask 077 && : >"$file")
  {
    for pair in \
      DOPPEL_STACK_POSTGRES_PORT="$POSTGRES_PORT" DOPPEL_STACK_MLFLOW_PORT="$MLFLOW_PORT" \
      DOPPEL_STACK_PREFECT_PORT="$PREFECT_PORT" DOPPEL_STACK_EMULATOR_PORT="$EMULATOR_PORT" \
      DOPPEL_STACK_SERVE_PORTS="$SERVE_PORTS" DOPPEL_STACK_SLACK_APP_PORT="$SLACK_APP_PORT" \
      DOPPEL_STACK_EXPORT="$EXPORT" \
      DOPPEL_HOME="$STACK/home" DOPPEL_MODEL_CACHE="$MODEL_CACHE" \
      DATABASE_URL="postgresql+psycopg://$PG/doppel" \
      MLFLOW_TRACKING_URI="$MLFLOW_URL" \
      PREFECT_API_URL="$PREFECT_URL" PREFECT_HOME="$STACK/prefect" \
      PREFECT_SERVER_ANALYTICS_ENABLED=false \
      DOPPEL_SERVING_URL="$SERVING_URLS" \
      DOPPEL_SERVE__API_KEYS="$API_KEYS" DOPPEL_SERVE__ADMIN_TOKEN="$ADMIN_TOKEN" \
      SLACK_API_URL="$EMULATOR_URL/api/" SLACK_BOT_TOKEN=xoxb-emulator \
      SLACK_SIGNING_SECRET="$SIGNING_SECRET"; do
      printf '%s=%s\n' "${pair%%=*}" "$(quoted "${pair#*=}")"
    done
  } >>"$file"
  mv "$file" "$SETTINGS"
}

# -- processes: each in a session of its own, so that `down` stops it with its children --

pidfile() { printf '%s/%s.pid' "$RUN" "$1"; }
started_at() { sed -E 's/^.*\) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }

# The part's process runs, and is the one we started (not a recycled pid).
alive() {
  local file pid since
  file="$(pidfile "$1")"
  [ -f "$file" ] || return 1
  read -r pid since <"$file"
  [ -n "$pid" ] && [ "$(started_at "$pid")" = "$since" ]
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Start PART (on PORT, or - for none) unless it runs: COMMAND in a session of its own.
launch() {
  local part=$1 port=$2
  shift 2
  if alive "$part"; then
    say "$part: already running (pid $(cut -d' ' -f1 "$(pidfile "$part")"))"
    return
  fi
  if [ "$port" != - ] && listening "$port"; then
    die "$part: port $port is taken by a process this stack did not start; pick another \
with its DOPPEL_STACK_*_PORT"
  fi
  mkdir -p "$LOGS" "$RUN"
  setsid "$@" >>"$LOGS/$part.log" 2>&1 </dev/null &
  local pid=$!
  printf '%s %s\n' "$pid" "$(started_at "$pid")" >"$(pidfile "$part")"
  say "$part: started (pid $pid; log $LOGS/$part.log)"
}

# Wait until CHECK succeeds, while the part runs, for at most $WAIT seconds.
await() {
  local part=$1 deadline=$((SECONDS + WAIT))
  shift
  until "$@" >/dev/null 2>&1; do
    alive "$part" || die "$part exited before it was healthy" "$LOGS/$part.log"
    [ "$SECONDS" -lt "$deadline" ] ||
      die "$part is not healthy after $WAIT s (DOPPEL_STACK_WAIT_SECONDS)" "$LOGS/$part.log"
    sleep 0.5
  done
  say "$part: healthy"
}

# The process groups of a part: its own, and those its processes started in sessions of
# their own (the Prefect worker runs each flow run in one).
groups_of() {
  ps -e -o pid=,ppid=,pgid= | awk -v root="$1" '
    { parent[$1] = $2; group[$1] = $3 }
    END {
      for (p in parent) {
        q = p
        for (hops = 0; hops < 64 && (q in parent); hops++) {
          if (group[q] == root) { print group[p]; break }
          q = parent[q]
        }
      }
    }' | sort -u
}

any_alive() {
  local group
  for group in "$@"; do kill -0 -- "-$group" 2>/dev/null && return 0; done
  return 1
}

# Stop a part: SIGTERM to its process groups, SIGKILL to what is left after GRACE seconds.
stop() {
  local part=$1 grace=${2:-30} began=$SECONDS pid groups group
  if ! alive "$part"; then
    rm -f "$(pidfile "$part")"
    return
  fi
  pid="$(cut -d' ' -f1 "$(pidfile "$part")")"
  groups="$(groups_of "$pid")"
  for group in $groups; do kill -TERM -- "-$group" 2>/dev/null || true; done
  while [ $((SECONDS - began)) -lt "$grace" ] && any_alive $groups; do sleep 0.5; done
  for group in $groups; do kill -KILL -- "-$group" 2>/dev/null || true; done
  rm -f "$(pidfile "$part")"
  say "$part: stopped ($((SECONDS - began)) s)"
}

# Run a one-off step to its end, its output in logs/STEP.log.
step() {
  local name=$1
  shift
  mkdir -p "$LOGS"
  "$@" >>"$LOGS/$name.log" 2>&1 || die "$name failed" "$LOGS/$name.log"
}

http_ok() { curl -fsS -m 5 -o /dev/null "$@"; }

worker_online() {
  curl -fsS -m 5 -X POST -H 'content-type: application/json' -d '{}' \
    "$PREFECT_URL/work_pools/$POOL/workers/filter" |
    "$BIN/python" -c 'import json, sys
workers = json.load(sys.stdin)
sys.exit(not any(w["name"] == sys.argv[1] and w["status"] == "ONLINE" for w in workers))' "$WORKER"
}

# -- the parts -------------------------------------------------------------------------------

up() {
  [ -x "$BIN/doppel" ] || die "no $BIN/doppel: run 'make install' (or set DOPPEL_STACK_BIN)"
  resolve_settings
  write_settings
  set -a
  . "$SETTINGS"
  set +a
  export DOPPEL_REPO="$REPO"  # prefect.yaml's pull step: where the worker runs flows from
  mkdir -p "$LOGS" "$RUN" "$DOPPEL_HOME"
  local python="$BIN/python" doppel="$BIN/doppel" prefect="$BIN/prefect" i

  say "postgres: 127.0.0.1:$POSTGRES_PORT (databases doppel, mlflow, prefect)"
  step postgres-start "$python" -m devtools.postgres start --root "$STACK/postgres" \
    --port "$POSTGRES_PORT" --log "$LOGS/postgres.log" \
    --database doppel --database mlflow --database prefect
  step db-upgrade "$doppel" db upgrade  # once here, not raced by every replica

  if [ ! -f "$EXPORT" ]; then
    mkdir -p "$(dirname "$EXPORT")"
    step synth "$doppel" synth --out "$EXPORT"
  fi
  # Each part gets the secrets it needs and no others.
  local plain=(env -u SLACK_SIGNING_SECRET -u DOPPEL_SERVE__API_KEYS -u DOPPEL_SERVE__ADMIN_TOKEN)
  launch emulator "$EMULATOR_PORT" "${plain[@]}" \
    "$doppel" slack-emulator --export "$EXPORT" --port "$EMULATOR_PORT"
  launch mlflow "$MLFLOW_PORT" "${plain[@]}" -u MLFLOW_TRACKING_URI \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "postgresql+psycopg://$PG/mlflow" \
    --serve-artifacts --artifacts-destination "$STACK/mlflow/artifacts"
  launch prefect "$PREFECT_PORT" "${plain[@]}" -u PREFECT_API_URL \
    PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://$PG/prefect" \
    "$prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"

  await prefect http_ok "$PREFECT_URL/health"
  http_ok "$PREFECT_URL/work_pools/$POOL" 2>/dev/null ||
    step work-pool "$prefect" work-pool create "$POOL" --type process
  # Registers (or updates) prefect.yaml's deployments; the worker runs them from this checkout.
  step deploy "$prefect" --no-prompt deploy --all
  launch worker - "${plain[@]}" \
    "$prefect" worker start --pool "$POOL" --name "$WORKER" --type process

  await mlflow http_ok "$MLFLOW_URL/health"
  for i in "${!REPLICA_PORTS[@]}"; do  # each with its own adapter cache; no Slack app inside
    launch "serve-$((i + 1))" "${REPLICA_PORTS[$i]}" \
      env -u SLACK_SIGNING_SECRET DOPPEL_HOME="$STACK/serve-$((i + 1))" \
      "$doppel" serve --host 127.0.0.1 --port "${REPLICA_PORTS[$i]}"
  done

  await emulator http_ok "$EMULATOR_URL/api/api.test"
  await worker worker_online
  for i in "${!REPLICA_PORTS[@]}"; do
    await "serve-$((i + 1))" http_ok "http://127.0.0.1:${REPLICA_PORTS[$i]}/readyz"
  done
  launch slack-app "$SLACK_APP_PORT" \
    env -u DOPPEL_SERVE__API_KEYS -u DOPPEL_SERVE__ADMIN_TOKEN \
    DOPPEL_SLACK_APP__MODEL_API_KEY="${API_KEYS%%,*}" \
    "$doppel" slack-app --host 127.0.0.1 --port "$SLACK_APP_PORT"
  await slack-app http_ok "http://127.0.0.1:$SLACK_APP_PORT/healthz"

  cat <<EOF
stack: up. Settings and secrets: $SETTINGS (eval "\$(scripts/stack.sh env)")
  Prefect UI      http://127.0.0.1:$PREFECT_PORT
  MLflow UI       $MLFLOW_URL
  model API       $SERVING_URLS
  Slack events    http://127.0.0.1:$SLACK_APP_PORT/slack/events
  Slack emulator  $EMULATOR_URL/api/
  PostgreSQL      postgresql://$PG/doppel
EOF
}

PARTS=(slack-app serve-1 serve-2 worker prefect mlflow emulator)  # the order `down` stops them

down() {
  local part file
  for part in "${PARTS[@]}"; do
    case "$part" in
      # Prefect 3.8.8's worker never exits on SIGTERM alone; its flow runs got theirs.
      worker) stop "$part" 10 ;;
      # `doppel serve` gives in-flight completions 30 s.
      *) stop "$part" 30 ;;
    esac
  done
  for file in "$RUN"/*.pid; do  # more replicas than the default two
    [ -e "$file" ] && stop "$(basename "$file" .pid)"
  done
  if [ -d "$STACK/postgres" ]; then
    step postgres-stop "$BIN/python" -m devtools.postgres stop --root "$STACK/postgres"
    say "postgres: stopped"
  fi
}

status() {
  local part file
  for file in "$RUN"/*.pid; do
    [ -e "$file" ] || continue
    part="$(basename "$file" .pid)"
    if alive "$part"; then say "$part: running"; else say "$part: stopped"; fi
  done
  if [ -d "$STACK/postgres" ] &&
    "$BIN/python" -m devtools.postgres status --root "$STACK/postgres"; then
    say "postgres: running"
  else
    say "postgres: stopped"
  fi
}

show_env() {
  [ -f "$SETTINGS" ] || die "no $SETTINGS yet: run 'scripts/stack.sh up'"
  sed 's/^/export /' "$SETTINGS"
}

cd "$REPO"
case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) show_env ;;
  *) die "usage: scripts/stack.sh up|down|status|env" ;;
esac
