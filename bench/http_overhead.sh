#!/usr/bin/env bash
# The HTTP workers' CPU per request at two commits, on this host: a null-engine server (the
# serving path alone), 2 HTTP workers, wrk with V2 binary FP32 tensors of one 224 px image,
# 16 users for 20 s, each commit twice, alternating. bash bench/http_overhead.sh OLD [NEW]
# (NEW: the working tree); a git worktree of OLD under /tmp. Results in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.." && . .venv/bin/activate
OLD=$1; NEW=${2:-}
OUT=${OUT:-/tmp/http-overhead}; rm -rf "$OUT"; mkdir -p "$OUT"
trees=("old:/tmp/http-overhead-old" "new:$PWD")
rm -rf /tmp/http-overhead-old; git worktree add -f --detach /tmp/http-overhead-old "$OLD" >/dev/null 2>&1
[ -n "$NEW" ] && { rm -rf /tmp/http-overhead-new; git worktree add -f --detach /tmp/http-overhead-new "$NEW" >/dev/null 2>&1; trees[1]="new:/tmp/http-overhead-new"; }
for round in 1 2; do
  for entry in "${trees[@]}"; do
    name=${entry%%:*}; tree=${entry#*:}
    ( cd "$tree" && ESCORT_ENGINE=null ESCORT_MODELS=resnet50-uniform90 ESCORT_WORKERS=2 ESCORT_GRPC=false \
        ESCORT_PORT=18311 ESCORT_LOG_LEVEL=warning exec python -m service.app >"$OUT/$name-$round-server.log" 2>&1 ) &
    pid=$!
    for i in $(seq 120); do curl -sf localhost:18311/v2/health/ready >/dev/null && break; sleep 0.5; done
    LOADTEST_URL=http://127.0.0.1:18311 LOADTEST_DRIVER=wrk LOADTEST_USERS=16 LOADTEST_DURATION_S=20 \
      LOADTEST_PROTOCOLS=v2 LOADTEST_V2_INPUT=tensor LOADTEST_MAX_REQUESTS=10000000 \
      LOADTEST_OUT="$OUT/$name-$round" python -m loadtest.run >"$OUT/$name-$round.log" 2>&1
    kill -TERM $pid; wait $pid
    python - "$OUT/$name-$round/report.json" "$name" "$round" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
step = report["steps"][0]
rate, cores = step["throughput_rps"], step["server"]["cores_busy"]["worker"]
print(f"{sys.argv[2]} round {sys.argv[3]}: {rate:.0f} req/s, worker cores {cores:.2f}, "
      f"{cores / rate * 1e3:.3f} ms of worker CPU per request")
PY
  done
done | tee "$OUT/summary.txt"
git worktree remove --force /tmp/http-overhead-old
[ -n "$NEW" ] && git worktree remove --force /tmp/http-overhead-new
