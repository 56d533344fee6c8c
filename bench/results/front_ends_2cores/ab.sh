#!/bin/bash
# Alternated A/B of --front-ends 1 and 2 on this machine: the tiny random model (bench.random_model
# --shape tiny) on the CPU, bursts of 32 through gRPC with 32 client connections (specdec-bench).
# Usage: bash bench/results/front_ends_2cores/ab.sh MODEL_DIR OUT_DIR PAIRS
set -u
MODEL=$1; OUT=$2; PAIRS=${3:-3}
mkdir -p "$OUT"
cd "$(dirname "$0")/../../.."
for pair in $(seq "$PAIRS"); do
  for fe in 1 2; do
    port=$((50600 + pair * 10 + fe))
    .venv/bin/specdec-server --model "$MODEL" --device cpu --dtype float32 --listen 127.0.0.1:$port \
      --max-batch-size 32 --max-queue-size 64 --telemetry-target "" --front-ends $fe --log-level WARNING \
      > "$OUT/server_fe${fe}_pair${pair}.log" 2>&1 &
    pid=$!
    for i in $(seq 120); do
      sleep 0.5
      .venv/bin/python -c "import grpc;grpc.channel_ready_future(grpc.insecure_channel('127.0.0.1:$port')).result(timeout=0.5)" 2>/dev/null && break
    done
    sleep 2  # the second front end's start
    .venv/bin/specdec-bench --target 127.0.0.1:$port --modes burst --concurrency 32 --burst-rounds 4 \
      --max-tokens 64 --connections 32 --prompts builtin:grounded --methods none --warmup 8 \
      --out "$OUT/bench_fe${fe}_pair${pair}.json" 2>> "$OUT/bench.log"
    kill -TERM $pid; wait $pid
  done
done
