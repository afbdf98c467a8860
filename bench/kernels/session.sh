#!/usr/bin/env bash
# Issue 11's device call: the kernel GPU tests, then the measurements that answer its table, in
# stages (each fits one 600 s call with the others left out):
#   RUN_NAME=kernels-run5 bash bench/kernels/session.sh tests layers
#   RUN_NAME=kernels-run5b bash bench/kernels/session.sh model ncu
# Carry the wheels (WHEELS, default .gpu-wheels-lean) and .gpu-debs. Everything lands in
# $OUT/$RUN_NAME, packed into $OUT/$RUN_NAME.tar.gz (the device tool returns at most 8 files).
#   tests   pytest tests/kernels tests/engine -m gpu (~4 min with the fp16 cases)
#   layers  escort bench layers: fp32 and fp16 kernels against cuDNN fp16/TF32 and the lowerings,
#           90% and 95%, batch 1, 16, 64 (LAYERS_ARGS overrides; ~5 min)
#   model   escort bench model: resnet50-uniform90, fp32 and fp16 configs, batch 1 and 64 (~4 min)
#   ncu     Nsight Compute (--set detailed) on suite layers (NCU_SPECS, layer:batch), each shape's
#           default fp32 and fp16 configs, three launches each (~1 min a shape)
#   sass    ncu's per-SASS-instruction counts (source page) for SASS_LAYER at batch 16 (~1 min)
#   TESTS overrides the tests stage's paths.
set -uo pipefail
: "${OUT:=gpu-out}" "${RUN_NAME:=kernels}"
R="$OUT/$RUN_NAME"
mkdir -p "$R"
WHEELS=${WHEELS:-.gpu-wheels-lean}
source bench/device_env.sh

status=0
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)" | tee -a "$R/stages.log"
  case "$stage" in
    tests)
      python3 -m pytest ${TESTS:-tests/kernels tests/engine} -m gpu -q -p no:cacheprovider \
        >"$R/gpu-tests.log" 2>&1
      tail -5 "$R/gpu-tests.log" ;;
    layers)
      python3 -m bench.kernels.layers --out "$R" --quiet \
        ${LAYERS_ARGS:---sparsity 0.9,0.95 --batch 1,16,64 --reps 30} 2>"$R/layers.err" | tail -30 ;;
    model)
      python3 -m bench.model.run --out "$R" --cache-dir /tmp/escort-cache --no-progress \
        --models resnet50-uniform90 --batches 1,64 \
        --configs ${MODEL_CONFIGS:-dense-fp32,dense-tf32,dense-fp16,sparse-fp32,auto-fp32,sparse-fp16,auto-fp16} \
        2>&1 | tail -30 ;;
    ncu)
      for spec in ${NCU_SPECS:-resnet50.l3.3x3:16 vgg16.conv4_2:16 resnet50.l3.3x3:1}; do
        layer=${spec%:*} batch=${spec#*:}
        ncu --target-processes all --kernel-name regex:'escort_(conv|direct)' --launch-count 6 \
          --set detailed --csv \
          python3 -m bench.kernels.layers --profile --layers "$layer" --batch "$batch" \
            --sparsity 0.9 --methods escort,escort_fp16 >"$R/ncu-$layer-b$batch.csv" 2>>"$R/ncu.err"
      done
      ls -la "$R"/ncu-* ;;
    sass)
      # Per-instruction counts (where the issued instructions go) for one shape's kernels.
      layer=${SASS_LAYER:-vgg16.conv4_2}
      ncu --target-processes all --kernel-name regex:'escort_(conv|direct)' --launch-count 6 \
        --set detailed -o "$R/sass" -f \
        python3 -m bench.kernels.layers --profile --layers "$layer" --batch 16 --sparsity 0.9 \
          --methods escort,escort_fp16 >"$R/sass-run.log" 2>&1
      ncu -i "$R/sass.ncu-rep" --page source --csv --print-source sass >"$R/sass-$layer.csv" \
        2>>"$R/sass-run.log" || ncu -i "$R/sass.ncu-rep" --page source --csv \
        >"$R/sass-$layer.csv" 2>>"$R/sass-run.log"
      python3 -m bench.kernels.sass_summary "$R/sass-$layer.csv" --out "$R"
      rm -f "$R/sass.ncu-rep"; ls -la "$R"/sass-* ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
tar -czf "$OUT/$RUN_NAME.tar.gz" -C "$OUT" "$RUN_NAME" && rm -rf "$R"
exit $status
