#!/usr/bin/env bash
# Sidecar benchmark (design §8), side by side in one run against one afr-mock:
#   1. added latency, non-streaming, open loop at RATE req/s: direct to the mock vs through `afr serve`
#   2. added time to first content token for streams (open loop, 100 streams/s)
#   3. RSS idle, and with STREAMS concurrent streams held open
# Every process it starts is stopped on exit; every load loop is bounded by time.
# Usage: sidecar/bench/run.sh [RATE=1000] [SECONDS=10] [STREAMS=1000]
set -euo pipefail
RATE="${1:-1000}"; SECS="${2:-10}"; STREAMS="${3:-1000}"
cd "$(dirname "$0")/../.."
cargo build --release -q -p afr-sidecar -p afr-mock --bin afr --bin afr-mock --example loadgen
BIN=target/release; L="$BIN/examples/loadgen"
DIR="$(mktemp -d)"; PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT
wait_file() { for _ in $(seq 200); do [ -s "$1" ] && return 0; sleep 0.05; done; echo "timeout waiting for $1" >&2; exit 1; }

"$BIN/afr-mock" --port-file "$DIR/mock.port" --threads 1 --log-capacity 0 >/dev/null 2>&1 & PIDS+=($!)
MOCK_PID=$!; wait_file "$DIR/mock.port"; MP="$(cat "$DIR/mock.port")"
SECRET="bench-secret-$(od -An -tx1 -N8 /dev/urandom | tr -d ' \n')"
cat >"$DIR/sidecar.toml" <<TOML
[server]
listen = "127.0.0.1:0"
secret = "$SECRET"
[admin]
listen = "127.0.0.1:0"
[usage]
path = "$DIR/usage.db"
[providers.mock]
kind = "openai"
base_url = "http://127.0.0.1:$MP/v1"
[models.gpt-4o-mini]
tier = "Smart"
description = "bench"
[[models.gpt-4o-mini.routes]]
provider = "mock"
model = "gpt-4o-mini"
TOML
AFR_LOG=warn "$BIN/afr" serve --config "$DIR/sidecar.toml" --port-file "$DIR/afr.port" \
  --admin-port-file "$DIR/admin.port" --threads 1 2>"$DIR/afr.log" & PIDS+=($!)
AFR_PID=$!; wait_file "$DIR/afr.port"; P="$(cat "$DIR/afr.port")"
H=("X-Afr-Secret:$SECRET" "X-Afr-Key-Id:bench")
rss() { awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' "/proc/$AFR_PID/status"; }
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }

echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== RSS idle: $(rss)"
echo "== non-streaming at $RATE req/s for ${SECS}s (direct, gateway, direct, gateway)"
for _ in 1 2; do
  "$L" rate "http://127.0.0.1:$MP/v1/chat/completions" "$RATE" "$SECS"
  c0=$(cpu "$AFR_PID")
  "$L" rate "http://127.0.0.1:$P/v1/chat/completions" "$RATE" "$SECS" "${H[@]}"
  echo "   sidecar CPU: $(( ($(cpu "$AFR_PID") - c0) * 10000 / (RATE * SECS) )) us/request"
done
echo "== streams: time to first content delta at 100/s for ${SECS}s"
curl -s -X POST "http://127.0.0.1:$MP/_mock/config" -d '{"chunks":8,"chunk_interval_ms":5}' >/dev/null
"$L" ttft "http://127.0.0.1:$MP/v1/chat/completions" 100 "$SECS"
"$L" ttft "http://127.0.0.1:$P/v1/chat/completions" 100 "$SECS" "${H[@]}"
echo "== $STREAMS concurrent streams (each 200 chunks, 100 ms apart), held 12 s"
curl -s -X POST "http://127.0.0.1:$MP/_mock/config" -d '{"chunks":200,"chunk_interval_ms":100}' >/dev/null
"$L" streams "http://127.0.0.1:$P/v1/chat/completions" "$STREAMS" 12 "${H[@]}" & LG=$!
sleep 8; echo "   RSS with $STREAMS streams open: $(rss)"
wait "$LG"
echo "== RSS after: $(rss)"
