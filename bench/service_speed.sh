#!/usr/bin/env bash
# One device run of the service-speed measurements (docs/service.md, "Measured"):
#   bash bench/service_speed.sh [fp32|fp16] [tensor|image]
# offline engine at batch 32, offline per-layer times, then a null-engine server and the real
# server side by side, and the wrk load test (sink and null-engine ceilings, compare mode).
# Carry .gpu-wheels (or the smaller set WHEELS names) and .gpu-debs. Everything lands in
# $OUT/results-$RUN_NAME.tgz.
set -uo pipefail
PRECISION=${1:-fp32}
V2_INPUT=${2:-tensor}
OUT=${OUT:-gpu-out}
RUN_NAME=${RUN_NAME:-r}  # several runs in one device call: a name each
R=$OUT/$RUN_NAME
mkdir -p "$R"
. bench/device_env.sh
df -h /dev/shm | tail -1 | tee -a "$R/device.txt"
nproc | tee -a "$R/device.txt"
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)" | tee -a "$R/device.txt"
python3 -c "import uvloop; print('uvloop', uvloop.__version__)" 2>&1 | tail -1 | tee -a "$R/device.txt"
lscpu | grep -E "^(Model name|Thread|Core|Socket|CPU\(s\)|CPU max MHz|NUMA node\(s\))" | tee -a "$R/device.txt"
MODEL=${SERVICE_MODEL:-resnet50-uniform90}
CACHE=/tmp/escort-cache
export ESCORT_MODELS=$MODEL ESCORT_BACKENDS=${SERVICE_BACKENDS:-sparse,dense} ESCORT_CACHE_DIR=$CACHE ESCORT_PRECISION=$PRECISION
stamp() { echo "=== $1 $(date -u +%H:%M:%S)"; }

if [ -n "${GPU_TESTS:-}" ]; then
  stamp gpu-tests
  timeout 300 python3 -m pytest ${GPU_TEST_PATHS:-tests/engine tests/core} -m gpu -q -p no:cacheprovider \
    >"$R/gpu-tests.log" 2>&1
  tail -3 "$R/gpu-tests.log"
fi

stamp bench-model
[ -n "${SKIP_BENCH_MODEL:-}" ] || timeout 200 python3 -m bench.model.run --models "$MODEL" \
  --configs "dense-$PRECISION,sparse-$PRECISION" --batches 32 --cache-dir $CACHE \
  --out "$R/bench" --no-progress >"$R/bench.log" 2>&1
[ -f "$R/bench.log" ] && tail -8 "$R/bench.log"

stamp layer-times
# Every bucket the server captures (ESCORT_MAX_BATCH_SIZE, ESCORT_BATCH_BUCKET_STEP): the load
# test weighs them by the batch sizes each step's sampled batches ran at. LAYER_BATCHES=32: one.
LAYER_BATCHES=${LAYER_BATCHES:-$(python3 -c "from service.config import Settings as S; from service.engine.runner import batch_buckets as b; s = S(); print(','.join(map(str, b(s.max_batch_size, s.batch_bucket_step))))")}
[ -n "${SKIP_LAYER_TIMES:-}" ] || timeout 300 python3 -m bench.layer_times --model "$MODEL" --backends sparse,dense --batch "$LAYER_BATCHES" \
  --precision "$PRECISION" --device cuda --out "$R/layer_times.json" --cache-dir $CACHE \
  >"$R/layer_times.log" 2>&1
tail -3 "$R/layer_times.log"

stamp servers
ESCORT_ENGINE=null ESCORT_PORT=8001 ESCORT_GRPC=false python3 -m service.app >"$R/null-server.log" 2>&1 &
null=$!
ESCORT_LAYER_PROFILE_EVERY=${LAYER_PROFILE_EVERY:-1000} ESCORT_SLOW_REQUEST_MS=${SLOW_REQUEST_MS:-40} ESCORT_DEVICE=cuda ESCORT_PORT=8000 ESCORT_GRPC_PORT=${GRPC_PORT:-8002} python3 -m service.app >"$R/server.log" 2>&1 &
server=$!
# PYSPY_AFTER_READY_S=N: N s after the engine is ready, py-spy samples the engine process and
# one HTTP worker for 10 s without pausing them (--nonblocking), into pyspy-*.txt.
if [ -n "${PYSPY_AFTER_READY_S:-}" ] && [ -x /tmp/site/bin/py-spy ]; then
  (
    until grep -q "engine ready" "$R/server.log" 2>/dev/null; do sleep 1; done
    sleep "$PYSPY_AFTER_READY_S"
    kids=$(pgrep -P $server -f spawn_main)
    engine=$(for p in $kids; do echo "$(awk '/VmRSS/{print $2}' /proc/$p/status) $p"; done | sort -n | tail -1 | cut -d' ' -f2)
    worker=$(for p in $kids; do [ "$p" != "$engine" ] && echo "$p"; done | head -1)
    echo "engine $engine worker $worker $(date -u +%H:%M:%S)" >"$R/pyspy.log"
    /tmp/site/bin/py-spy record --nonblocking -p "$engine" -d 10 -r 200 -f raw -o "$R/pyspy-engine.txt" >>"$R/pyspy.log" 2>&1 &
    /tmp/site/bin/py-spy record --nonblocking -p "$worker" -d 10 -r 200 -f raw -o "$R/pyspy-worker.txt" >>"$R/pyspy.log" 2>&1
    wait
    ps -L -o pid,tid,pcpu,comm -p "$engine" >>"$R/pyspy.log" 2>&1
  ) &
fi

# One load test per entry of PROTOCOL_RUNS (say "v1 v2": each protocol measured alone, against
# the same servers); by default one run over LOADTEST_PROTOCOLS.
for protocols in ${PROTOCOL_RUNS:-${LOADTEST_PROTOCOLS:-v2}}; do
  out="$R/loadtest"; [ -z "${PROTOCOL_RUNS:-}" ] || out="$R/loadtest-${protocols//,/-}"
  stamp "loadtest $protocols"
  LOADTEST_DRIVER=wrk LOADTEST_SINK=1 LOADTEST_CEILING_URL=http://127.0.0.1:8001 \
  LOADTEST_PROTOCOLS=$protocols LOADTEST_V2_INPUT=$V2_INPUT LOADTEST_COMPARE=1 \
  LOADTEST_USERS=${LOADTEST_USERS:-1,4,64} LOADTEST_MAX_REQUESTS=10000000 \
  LOADTEST_DURATION_S=${LOADTEST_DURATION_S:-90} \
  LOADTEST_LAYER_BENCH=$([ -f "$R/layer_times.json" ] && echo "$R/layer_times.json") \
  LOADTEST_OUT="$out" timeout 400 python3 -m loadtest.run >"$out.log" 2>&1
  echo "loadtest exit $?"
  tail -30 "$out.log"
done
kill -TERM $server $null
wait $server; echo "server exit $?"
wait $null
grep -i "error\|warning\|serving\|ready\|arena" "$R/server.log" | grep -v "health\|slow request" | head -20
grep -c "slow request" "$R/server.log"
stamp done
tar czf "$OUT/results-$RUN_NAME.tgz" -C "$OUT" "$RUN_NAME"
