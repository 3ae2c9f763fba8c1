#!/usr/bin/env bash
# Load and soak test of graft-serve on loopback (issue #12's figures): 10,000 requests from 64
# clients over 8 adapters and the base, streamed and not, with disconnects and cancellations,
# and 100 adapter replacements and load-use-unload cycles during the run. Prints status counts,
# latency percentiles, the server's resident memory trend and the highest KV usage; fails on any
# 5xx, a 429 without Retry-After, a transport error the client did not cause, a response tagged
# with a version the server never had, or a failed adapter operation.
#
#   scripts/load.sh                      # 10,000 requests
#   scripts/load.sh --duration 1800      # a 30-minute soak (the same mix, for a time)
#
# Extra arguments go to `graft-serve load`; $GRAFT_LOAD_SERVE_ARGS adds server flags (e.g.
# "--prefix-cache-tokens 0"). The adapter is a one-step run of configs/bench.toml
# (r=16, all linear), kept in $GRAFT_LOAD_WORK (default /tmp/graft-load).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
bin=target/release
model=${GRAFT_CACHE:-$HOME/.cache/graft}/models/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || scripts/fetch-model.sh
work=${GRAFT_LOAD_WORK:-/tmp/graft-load}
mkdir -p "$work"
if [ ! -d "$work/adapter" ]; then
    out=$($bin/graft-train bench configs/bench.toml --steps 1 --set "output.runs_dir=$work/runs" 2>&1)
    run=$(sed -n 's/^run: //p' <<<"$out" | head -1)
    cp -r "$run/adapter" "$work/adapter.tmp" && mv "$work/adapter.tmp" "$work/adapter"
fi
rm -rf "$work/adapters"
mkdir -p "$work/adapters"
for n in a0 a1 a2 a3 a4 a5 a6 a7 r0 r1; do
    cp -r "$work/adapter" "$work/adapters/$n"
done
port=${GRAFT_LOAD_PORT:-8131}
if curl -s -o /dev/null "http://127.0.0.1:$port/health"; then
    echo "something already answers on port $port (an earlier server?); set GRAFT_LOAD_PORT" >&2
    exit 1
fi
$bin/graft-serve --model "$model" --port "$port" --adapters-dir "$work/adapters" \
    --max-batch 8 --max-queue 32 --kv-cache-tokens 4096 ${GRAFT_LOAD_SERVE_ARGS:-} \
    >"$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 $server 2>/dev/null || { tail -20 "$work/server.log"; exit 1; }
    sleep 0.1
done
base=$(curl -sf "http://127.0.0.1:$port/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
$bin/graft-serve load --url "http://127.0.0.1:$port" --clients 64 \
    --models "a0,a1,a2,a3,a4,a5,a6,a7,$base" \
    --replace-with "$work/adapters/r0,$work/adapters/r1" --replacements 100 \
    --server-pid $server "$@"
echo "server errors logged: $(grep -c '"level":"ERROR"' "$work/server.log" || true)"
