#!/usr/bin/env bash
# The GPU path end to end, on a CUDA machine that reaches package registries but not the
# Hugging Face hub (docs/gpu.md):
#   1. installs the tested GPU dependency set (make install-gpu, which runs pip check);
#   2. builds the dataset of a synthetic workspace's most active person;
#   3. trains the bundled SmolLM2 on CUDA through the real recipe (the 7B recipe's
#      settings: gradient checkpointing, paged 8-bit AdamW, the small-data schedule), once
#      with QLoRA and once with LoRA, evaluating and registering each (the gate promotes);
#   4. serves production with vLLM and asks the persona, streamed, timing the first token;
#   5. runs benchmarks/train.py and benchmarks/serve.py --people 20 --engine vllm;
#   6. prints one table: tokens/s, peak GPU memory, time to first token, cold and warm
#      adapter switch, and 20-vs-1-adapter throughput.
#
#   scripts/gpu-check.sh            run it (not yet timed: no GPU was available)
#   scripts/gpu-check.sh --dry-run  print the steps without running any
#
# Everything lands in GPU_CHECK_DIR (default: .doppel/gpu-check-<time>): logs, the JSON of
# each step, and table.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "usage: scripts/gpu-check.sh [--dry-run]" >&2; exit 2 ;;
esac

WORK="$(realpath -m "${GPU_CHECK_DIR:-$REPO/.doppel/gpu-check-$(date +%Y%m%d-%H%M%S)}")"
BIN="$REPO/.venv/bin"
PORT="${GPU_CHECK_PORT:-8090}"  # doppel serve; benchmarks/serve.py uses 8097 and 8098
SERVE="http://127.0.0.1:$PORT"
export DOPPEL_HOME="$WORK/home"
export PATH="$BIN:$PATH"
export HF_HUB_OFFLINE=1  # no hub here: everything must come from the bundled model
export PREFECT_SERVER_ANALYTICS_ENABLED=false VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1

SERVER="" WATCHER=""
trap 'kill $SERVER $WATCHER 2>/dev/null || true' EXIT  # what this script started, only

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
# Print a command, then run it unless --dry-run.
run() {
  printf '  $ %s\n' "$*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}
# The same, with stdout into a file.
run_to() {
  local out=$1
  shift
  printf '  $ %s > %s\n' "$*" "$out"
  if [ "$DRY_RUN" = 0 ]; then "$@" >"$out"; fi
}
# The last line of a command's output that is JSON (doppel prints tables before it).
last_json() { python -c 'import sys; print(sys.stdin.read().strip().splitlines()[-1])'; }

# The GPU, the versions installed, and the dtype training and serving will use.
show_gpu() {
  python - <<'EOF'
import bitsandbytes, torch, transformers, vllm

from doppel.train.device import model_dtype

assert torch.cuda.is_available(), "no CUDA GPU visible to torch"
print(torch.cuda.get_device_name(), "| torch", torch.__version__, "| transformers",
      transformers.__version__, "| vllm", vllm.__version__, "| bitsandbytes",
      bitsandbytes.__version__, "| computes in", model_dtype())
EOF
}

# The real recipe for the 7B models, on the bundled base: what differs on a GPU
# (checkpointing, the paged 8-bit optimizer, the schedule) is exercised; the hub is not.
write_recipe() {
  python - "$1" "$2" <<'EOF'
import sys

import yaml

quantization, out = sys.argv[1:]
recipe = yaml.safe_load(open("configs/qwen2.5-7b-qlora.yaml"))
recipe |= {"base_model": "smollm2-135m-instruct", "quantization": quantization}
with open(out, "w") as file:
    yaml.safe_dump(recipe, file)
EOF
}

# Sample the GPU's used memory (MiB) every half second into a file, in the background.
watch_gpu_memory() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 >"$1" &
  WATCHER=$!
}

# Production exists after evaluation unless the gate kept both versions out: then the
# newest is promoted by hand (and said so), so that serving has something to serve.
ensure_production() {
  doppel models --json | last_json | python -c '
import json, subprocess, sys
user = sys.argv[1]
(model,) = [m for m in json.load(sys.stdin) if m["name"].endswith("." + user)]
if model["production"] is None:
    newest = str(model["versions"][-1]["version"])
    print(f"the gate promoted neither version: promoting v{newest} by hand to serve it")
    subprocess.run(["doppel", "promote", "--user", user, "--version", newest], check=True)
' "$1"
}

# Streamed chat completions to the persona: the reply, and the median time to its first
# token over five requests.
ask_persona() {
  python - "$SERVE" "$WORK/ttft.json" <<'EOF'
import json, statistics, sys, time

import httpx

url, out = sys.argv[1:]
model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
body = {
    "model": model,
    "messages": [{"role": "user", "content": "Sam: how is the release going?"}],
    "max_tokens": 64,
    "stream": True,
}
firsts, reply = [], ""
for _ in range(5):
    start, first, text = time.perf_counter(), None, ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise SystemExit(f"the persona's stream failed: {event['error']}")
            delta = event["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter() - start
            text += delta
    firsts.append(first if first is not None else time.perf_counter() - start)
    reply = text
print(f"{model}: {reply!r}")
json.dump({"model": model, "ttft_ms": round(statistics.median(firsts) * 1000, 1)}, open(out, "w"))
EOF
}

serve_and_ask() {
  printf '  $ doppel serve --engine vllm --port %s > %s/serve.log &\n' "$PORT" "$WORK"
  printf '  (wait for %s/readyz, then stream five questions to the persona)\n' "$SERVE"
  if [ "$DRY_RUN" = 1 ]; then return; fi
  doppel serve --engine vllm --port "$PORT" >"$WORK/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 1 600); do
    curl -fsS "$SERVE/readyz" >/dev/null 2>&1 && break
    kill -0 "$SERVER" 2>/dev/null || { tail -50 "$WORK/serve.log"; exit 1; }
    sleep 1
  done
  curl -fsS "$SERVE/readyz"
  echo
  ask_persona
  kill "$SERVER"
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
}

print_table() {
  python - "$WORK" <<'EOF' | tee "$WORK/table.md"
import json, sys
from pathlib import Path

work = Path(sys.argv[1])


def read(name):
    """Every JSON object that starts a line of a step's output (none if it left no file)."""
    path = work / name
    text = path.read_text() if path.is_file() else ""
    found, decoder, at = [], json.JSONDecoder(), 0
    for line in text.splitlines(keepends=True):
        if line.startswith("{"):
            try:
                found.append(decoder.raw_decode(text, at)[0])
            except ValueError:
                pass
        at += len(line)
    return found


def get(data, *path):
    """A value by its keys, or 'n/a': benchmarks/serve.py's output may change."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return "n/a"
        data = data[key]
    return data


train = {run.get("quantization"): run for run in read("bench-train.jsonl")}
serve, ttft = (read(name)[-1:] or [{}] for name in ("bench-serve.json", "ttft.json"))
serve, ttft = serve[0], ttft[0]
samples = [int(v) for v in (work / "gpu-memory-serve.txt").read_text().split()] if (
    work / "gpu-memory-serve.txt"
).is_file() else []
device = get(train.get("none", {}), "device")
rows = [
    ("training tokens/s, LoRA", get(train.get("none", {}), "tokens_per_second"), "benchmarks/train.py"),
    ("training tokens/s, QLoRA", get(train.get("qlora", {}), "tokens_per_second"), "benchmarks/train.py"),
    ("peak GPU memory, LoRA training (GiB)", get(train.get("none", {}), "peak_memory_gib"), "torch peak allocation"),
    ("peak GPU memory, QLoRA training (GiB)", get(train.get("qlora", {}), "peak_memory_gib"), "torch peak allocation"),
    ("peak GPU memory, serving 20 people (GiB)", round(max(samples) / 1024, 1) if samples else "n/a", "nvidia-smi; vLLM reserves most of the GPU up front"),
    ("time to first token, streamed (ms)", get(ttft, "ttft_ms"), "doppel serve --engine vllm, median of 5"),
    ("1-token request, warm adapter (ms)", get(serve, "one_token_ms"), "benchmarks/serve.py"),
    ("cold adapter switch (ms)", get(serve, "cold_switch_ms"), "benchmarks/serve.py"),
    ("warm adapter switch (ms)", get(serve, "warm_switch_ms"), "benchmarks/serve.py"),
    ("serving tokens/s, 1 adapter", get(serve, "single_adapter", "tokens_per_s"), "benchmarks/serve.py"),
    ("serving tokens/s, 20 adapters", get(serve, "spread_over_all", "tokens_per_s"), "benchmarks/serve.py"),
    ("20-vs-1-adapter throughput", get(serve, "spread_vs_single"), "benchmarks/serve.py"),
]
print(f"GPU figures on {device}, bundled SmolLM2-135M (results in {work})\n")
print("| measure | value | from |\n| --- | --- | --- |")
for name, value, source in rows:
    print(f"| {name} | {value} | {source} |")
EOF
}

step "1/6 The GPU dependency set (make install-gpu: vLLM for CUDA, bitsandbytes, pip check)"
run make install-gpu
run mkdir -p "$WORK"
run show_gpu

step "2/6 A synthetic workspace, and the dataset of its most active person"
run doppel synth --out "$WORK/workspace.zip" --users 8 --days 30 --seed 0
run doppel ingest export "$WORK/workspace.zip"
if [ "$DRY_RUN" = 1 ]; then
  USER_ID="<the most active person>"
else
  USER_ID="$(doppel users --json | last_json | python -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')"
fi
echo "  the most active person: $USER_ID"
run doppel consent grant "$USER_ID"
run doppel dataset build --user "$USER_ID"

step "3/6 Train the bundled SmolLM2 on CUDA with the real recipe, QLoRA then LoRA; evaluate each"
for quantization in qlora none; do
  run write_recipe "$quantization" "$WORK/recipe-$quantization.yaml"
  run doppel train --user "$USER_ID" --config "$WORK/recipe-$quantization.yaml"
  # Against the base model and production; the gate promotes it when it is better.
  run_to "$WORK/evaluate-$quantization.json" doppel evaluate --user "$USER_ID" --json
done

step "4/6 Serve production with vLLM on CUDA and ask the persona"
run ensure_production "$USER_ID"
run doppel models
serve_and_ask

step "5/6 The benchmarks: training (LoRA and QLoRA) and serving 20 people with vLLM"
run_to "$WORK/bench-train.jsonl" python benchmarks/train.py --steps 20 --config "$WORK/recipe-none.yaml"
run watch_gpu_memory "$WORK/gpu-memory-serve.txt"
run_to "$WORK/bench-serve.json" python benchmarks/serve.py --people 20 --engine vllm \
  --home "$WORK/serve-bench"
if [ "$DRY_RUN" = 0 ]; then kill "$WATCHER"; fi

step "6/6 The GPU figures"
run print_table
