#!/usr/bin/env bash
# The DoppelBot demo, on a fresh machine with no accounts and no GPU:
# a synthetic Slack workspace -> the Slack Web API emulator -> incremental ingest
# through the real slack-sdk -> a persona dataset for the most active person ->
# a LoRA adapter trained, evaluated against the base model and promoted in MLflow.
# DOPPEL_EXPORT=path.zip uses your own Slack export instead of the synthetic one.
set -euo pipefail

export DOPPEL_HOME="${DOPPEL_HOME:-$PWD/.doppel}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
DEMO="$DOPPEL_HOME/demo"
EXPORT="${DOPPEL_EXPORT:-$DEMO/synthco.zip}"
PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
API="http://127.0.0.1:$PORT/api/"
mkdir -p "$DEMO"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
last_json() { python -c 'import json, sys; print(json.dumps(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])))' "$1"; }

step "1/7 A Slack workspace to learn from"
if [ -n "${DOPPEL_EXPORT:-}" ]; then
  echo "using your export $EXPORT"
else
  doppel synth --out "$EXPORT" --users 8 --days 30 --seed 0
fi

step "2/7 The Slack Web API emulator serves it on $API"
doppel slack-emulator --export "$EXPORT" --port "$PORT" >"$DEMO/emulator.log" 2>&1 &
EMULATOR=$!
trap 'kill $EMULATOR 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS -X POST "${API}api.test" >/dev/null 2>&1 && break
  kill -0 "$EMULATOR" 2>/dev/null || { cat "$DEMO/emulator.log"; exit 1; }
  sleep 0.3
done

step "3/7 Ingest through the Web API (incremental, resumable, one Prefect task per channel)"
# The emulator is local, so we may go faster than Slack's Tier 3 (50 requests/min).
SLACK_API_URL="$API" SLACK_BOT_TOKEN=xoxb-emulator DOPPEL_SLACK__RATES__HISTORY_PER_MINUTE=3000 \
  doppel ingest slack

step "4/7 Who writes enough to be learned?"
doppel users --json >"$DEMO/users.json"
USER_ID="$(last_json "$DEMO/users.json" | python -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')"

step "5/7 Build the persona dataset for $USER_ID"
doppel dataset build --user "$USER_ID" --json >"$DEMO/dataset.json"
last_json "$DEMO/dataset.json" | python -c '
import json, sys
from datasets import load_from_disk
built = json.load(sys.stdin)
print("one sample, as the model will see it:")
for message in load_from_disk(built["path"])["train"][0]["messages"]:
    print("  [%s] %r" % (message["role"], message["content"][:160]))
'

step "6/7 Train, evaluate and gate $USER_ID's persona (Prefect pipeline, MLflow registry)"
doppel pipeline --user "$USER_ID" --json >"$DEMO/pipeline.json"

step "7/7 The registry"
doppel models

cat <<EOF

Done. Everything is in $DOPPEL_HOME. To look around:
  MLflow UI:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --workers 1 \\
                --backend-store-uri sqlite:///$DOPPEL_HOME/mlflow.db --host 127.0.0.1 --port 5000
  Prefect UI: PREFECT_HOME=$DOPPEL_HOME/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \\
                .venv/bin/prefect server start
  Retrain:    .venv/bin/doppel pipeline --user $USER_ID
EOF
