#!/usr/bin/env bash
# The DoppelBot demo, on a fresh machine with no accounts and no GPU:
# a synthetic Slack workspace -> the Slack Web API emulator -> incremental ingest
# through the real slack-sdk -> a persona dataset for the most active person ->
# a LoRA adapter trained, evaluated against the base model and promoted in MLflow ->
# `doppel serve` (model API + Slack app) -> a signed @mention answered in the thread.
# DOPPEL_EXPORT=path.zip uses your own Slack export instead of the synthetic one.
set -euo pipefail

export DOPPEL_HOME="${DOPPEL_HOME:-$PWD/.doppel}"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
DEMO="$DOPPEL_HOME/demo"
EXPORT="${DOPPEL_EXPORT:-$DEMO/synthco.zip}"
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
SERVE_PORT="$(free_port)"
API="http://127.0.0.1:$PORT/api/"
SERVE="http://127.0.0.1:$SERVE_PORT"
SECRET="demo-signing-secret"  # the emulator plays Slack, so we sign as Slack would
mkdir -p "$DEMO"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
last_json() { python -c 'import json, sys; print(json.dumps(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])))' "$1"; }

step "1/8 Installed (make install): $(python -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)')"

step "2/8 A Slack workspace to learn from"
if [ -n "${DOPPEL_EXPORT:-}" ]; then
  echo "using your export $EXPORT"
else
  doppel synth --out "$EXPORT" --users 8 --days 30 --seed 0
fi

step "3/8 The Slack Web API emulator serves it on $API"
doppel slack-emulator --export "$EXPORT" --port "$PORT" >"$DEMO/emulator.log" 2>&1 &
EMULATOR=$!
SERVER=""
trap 'kill $EMULATOR $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS -X POST "${API}api.test" >/dev/null 2>&1 && break
  kill -0 "$EMULATOR" 2>/dev/null || { cat "$DEMO/emulator.log"; exit 1; }
  sleep 0.3
done

step "4/8 Ingest through the Web API (incremental, resumable, one Prefect task per channel)"
# The emulator is local, so we may go faster than Slack's Tier 3 (50 requests/min).
SLACK_API_URL="$API" SLACK_BOT_TOKEN=xoxb-emulator DOPPEL_SLACK__RATES__HISTORY_PER_MINUTE=3000 \
  doppel ingest slack

step "5/8 The most active person's persona: consent, dataset, then the Prefect pipeline"
doppel users --json >"$DEMO/users.json"
USER_ID="$(last_json "$DEMO/users.json" | python -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')"
# Consent collected outside Slack (in Slack, they would type /doppel optin).
doppel consent grant "$USER_ID"
doppel dataset build --user "$USER_ID" --json >"$DEMO/dataset.json"
last_json "$DEMO/dataset.json" | python -c '
import json, sys
from datasets import load_from_disk
built = json.load(sys.stdin)
print("one sample, as the model will see it:")
for message in load_from_disk(built["path"])["train"][0]["messages"]:
    print("  [%s] %r" % (message["role"], message["content"][:160]))
'
# Train, evaluate against the base model (and production), and gate to `production`.
doppel pipeline --user "$USER_ID" --json >"$DEMO/pipeline.json"
doppel models

step "6/8 doppel serve: the model API and the Slack app, on $SERVE"
SLACK_API_URL="$API" SLACK_BOT_TOKEN=xoxb-emulator SLACK_SIGNING_SECRET="$SECRET" \
  DOPPEL_SLACK_APP__MAX_TOKENS=80 doppel serve --port "$SERVE_PORT" >"$DEMO/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 600); do
  curl -fsS "$SERVE/readyz" >/dev/null 2>&1 && break
  kill -0 "$SERVER" 2>/dev/null || { tail -50 "$DEMO/serve.log"; exit 1; }
  sleep 0.5
done
curl -fsS "$SERVE/readyz"; echo

step "7/8 Someone @mentions DoppelBot: Slack sends the signed app_mention to /slack/events"
step "8/8 What the bot posted in the thread, read back from Slack"
python scripts/demo_mention.py --slack-api "$API" --app "$SERVE" --secret "$SECRET"
MODEL="$(curl -fsS "$SERVE/v1/models" | python -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')"
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true

cat <<EOF

Done. Everything is in $DOPPEL_HOME. To look around:
  MLflow UI:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server --workers 1 \\
                --backend-store-uri sqlite:///$DOPPEL_HOME/mlflow.db --host 127.0.0.1 --port 5000
  Prefect UI: PREFECT_HOME=$DOPPEL_HOME/prefect PREFECT_SERVER_ANALYTICS_ENABLED=false \\
                .venv/bin/prefect server start
  Chat:       .venv/bin/doppel serve --port 8000     # then, from another shell:
              curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
                -d '{"model": "$MODEL", "max_tokens": 64,
                     "messages": [{"role": "user", "content": "Sam: how is the release going?"}]}'
  Retrain:    .venv/bin/doppel pipeline --user $USER_ID
EOF
