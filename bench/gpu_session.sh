#!/usr/bin/env bash
# One device session: install the carried wheels, then run the stages named on the command line.
#   bash bench/gpu_session.sh kernel-tests engine-tests bench-layers bench-model service
# Results go under $OUT (set by the device tool; defaults to ./gpu-out).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .gpu-wheels/*.whl >"$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:.
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)"

status=0
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case "$stage" in
    kernel-tests) python3 -m pytest tests/kernels -m gpu -q -x -p no:cacheprovider 2>&1 | tail -15 ;;
    engine-tests) python3 -m pytest tests/engine -m gpu -q --maxfail=3 -p no:cacheprovider 2>&1 | tail -30 ;;
    service-tests) python3 -m pytest tests/service tests/api -q -x -p no:cacheprovider 2>&1 | tail -15 ;;
    bench-layers) python3 -m bench.kernels.layers --out "$OUT" ${BENCH_LAYERS_ARGS:-} 2>"$OUT/bench-layers.err" | tail -40 ;;
    bench-model) python3 -m bench.model.run --out "$OUT" --cache-dir /tmp/escort-cache --no-progress ${BENCH_MODEL_ARGS:-} 2>&1 | tail -40 ;;
    service)
      ESCORT_BACKENDS=${SERVICE_BACKENDS:-sparse,dense} ESCORT_MODELS=${SERVICE_MODEL:-resnet50-uniform90} \
      ESCORT_DEVICE=cuda ESCORT_CACHE_DIR=/tmp/escort-cache ESCORT_PORT=8000 \
        python3 -m service.app >"$OUT/server.log" 2>&1 &
      server=$!
      LOADTEST_URL=http://127.0.0.1:8000 LOADTEST_OUT="$OUT/loadtest" LOADTEST_COMPARE=1 \
      LOADTEST_DURATION_S=${LOADTEST_DURATION_S:-60} LOADTEST_USERS=${LOADTEST_USERS:-4,16,64} \
      LOADTEST_PROCESSES=${LOADTEST_PROCESSES:-6} LOADTEST_PROTOCOLS=${LOADTEST_PROTOCOLS:-v2} \
      LOADTEST_V2_INPUT=${LOADTEST_V2_INPUT:-tensor} \
        python3 -m loadtest.run 2>&1 | tail -40
      kill -TERM "$server"; wait "$server"; echo "server exit $?"; tail -5 "$OUT/server.log" ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
exit $status
