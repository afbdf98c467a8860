#!/usr/bin/env bash
# gRPC beside REST on one server, on the GPU (issue 12): bash bench/grpc_speed.sh
# A null-engine server (its gRPC rate is the generator's ceiling) and the real one; gRPC steps
# by loadtest.grpc_load, REST steps by loadtest.run with wrk (its own ceilings), then the
# comparison table. Carry .gpu-wheels, or where it no longer fits the 64 MiB carry beside the
# tree, a smaller set named by WHEELS (for example .gpu-wheels without the efficientnet wheel,
# which resnet50 does not need; it must keep Locust's and gevent's: loadtest.run imports them),
# and .gpu-debs. Everything lands in $OUT/results-$RUN_NAME.tgz.
set -uo pipefail
OUT=${OUT:-gpu-out}
RUN_NAME=${RUN_NAME:-grpc}
R=$OUT/$RUN_NAME
mkdir -p "$R"
. bench/device_env.sh
MODEL=${SERVICE_MODEL:-resnet50-uniform90}
USERS=${GRPC_USERS:-64 128}
STEP_S=${STEP_S:-15}
export ESCORT_MODELS=$MODEL ESCORT_BACKENDS=${SERVICE_BACKENDS:-sparse} ESCORT_CACHE_DIR=/tmp/escort-cache
stamp() { echo "=== $1 $(date -u +%H:%M:%S)"; }
ready() {  # ready PORT SECONDS
  python3 - "$1" "$2" <<'PY'
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v2/health/ready", timeout=2).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(1)
PY
}
stamp servers
ESCORT_ENGINE=null ESCORT_PORT=8010 ESCORT_GRPC_PORT=8011 python3 -m service.app >"$R/null-server.log" 2>&1 &
null=$!
ESCORT_DEVICE=cuda ESCORT_PORT=8000 ESCORT_GRPC_PORT=8001 python3 -m service.app >"$R/server.log" 2>&1 &
server=$!
ready 8010 60 || { tail -20 "$R/null-server.log"; exit 1; }
ready 8000 240 || { tail -20 "$R/server.log"; exit 1; }
# After the real server is up: while it loads it tunes kernels on every core, and a ceiling
# measured then is the host's leftovers (run grpc-r1: 1,752 req/s, under the real model's rate).
stamp grpc-ceiling
python3 -m loadtest.grpc_load --target 127.0.0.1:8011 --model "$MODEL" --users 128 --duration 8 \
  --out "$R/grpc-ceiling.json"
for users in $USERS; do
  stamp "grpc $users"
  python3 -m loadtest.grpc_load --target 127.0.0.1:8001 --model "$MODEL" --users "$users" \
    --duration "$STEP_S" --out "$R/grpc-$users.json"
done
stamp rest
n=$(echo $USERS | wc -w)
LOADTEST_DRIVER=wrk LOADTEST_SINK=1 LOADTEST_CEILING_URL=http://127.0.0.1:8010 \
  LOADTEST_PROTOCOLS=v2 LOADTEST_V2_INPUT=tensor LOADTEST_USERS=$(echo $USERS | tr ' ' ,) \
  LOADTEST_DURATION_S=$(( (STEP_S + 2) * n )) LOADTEST_MAX_REQUESTS=10000000 \
  LOADTEST_OUT="$R/rest" timeout 300 python3 -m loadtest.run >"$R/rest.log" 2>&1
echo "loadtest exit $?"; grep "step \|ceiling" "$R/rest.log"
python3 -m loadtest.grpc_load report "$R"
kill -TERM $server $null
wait $server; echo "server exit $?"
wait $null
stamp done
tar czf "$OUT/results-$RUN_NAME.tgz" -C "$OUT" "$RUN_NAME"
