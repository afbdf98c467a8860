#!/usr/bin/env bash
# p99 of a running load test while the repository API loads another model (docs/service.md):
# three 30 s runs at 5 users against efficientnet-lite0 (dense, CPU), the middle one with a load
# of resnet50-uniform90 15 s in. bash bench/repository_load.sh; results in $OUT.
cd "$(dirname "$0")/.." && . .venv/bin/activate
OUT=${OUT:-/tmp/repository-load}; rm -rf "$OUT"; mkdir -p "$OUT"
ESCORT_MODELS=efficientnet-lite0 ESCORT_BACKENDS=dense ESCORT_REPOSITORY_API=true ESCORT_DEVICE=cpu \
  ESCORT_WORKERS=2 ESCORT_GRPC=false ESCORT_PORT=18301 ESCORT_CACHE_DIR=/tmp/p99cache \
  python -m service.app >$OUT/server.log 2>&1 &
pid=$!
for i in $(seq 120); do curl -sf localhost:18301/v2/health/ready >/dev/null && break; sleep 1; done
run() {  # run NAME LOAD_MODEL_OR_EMPTY
  loader=""
  if [ -n "$2" ]; then
    ( sleep 15; curl -s -o /dev/null -w "load $2: %{http_code} in %{time_total} s\n" -X POST localhost:18301/v2/repository/models/$2/load >> $OUT/load.log ) &
    loader=$!
  fi
  LOADTEST_URL=http://127.0.0.1:18301 LOADTEST_DRIVER=wrk LOADTEST_USERS=5 LOADTEST_DURATION_S=32 \
    LOADTEST_PROTOCOLS=v2 LOADTEST_V2_INPUT=tensor LOADTEST_BACKENDS=dense \
    LOADTEST_OUT=$OUT/$1 python -m loadtest.run > $OUT/$1.log 2>&1
  [ -n "$loader" ] && wait $loader
  echo "$1: $(grep 'step ' $OUT/$1.log)"
}
run baseline ""
run during resnet50-uniform90
run after ""
cat $OUT/load.log
kill -TERM $pid; wait $pid
