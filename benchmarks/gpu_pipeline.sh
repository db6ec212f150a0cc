#!/usr/bin/env bash
# On the lent H100: random 3B-shape snapshot -> synthetic COCO -> `vlmq quantize` (512 samples) ->
# OOM back-off demo -> `vlmq bench` bf16 vs W8A8. Results under $OUT (default ./tmp/gpu_out).
# Needs the wheels the GPU image lacks in .whl/ (../shared/tools/gpu-wheels.sh .whl ...).
set -uo pipefail
OUT=${OUT:-tmp/gpu_out}; mkdir -p "$OUT"
if [ -d .whl ] && [ -z "${NO_WHL:-}" ]; then
  ${PY:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
PY=${PY:-python3}; VLMQ="$PY -m vlmq"
W=/tmp/vlmq_gpu; mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, modelopt; print('torch', torch.__version__, 'transformers', transformers.__version__, 'modelopt', modelopt.__version__)" | tee -a "$OUT/gpu.txt"
step() { echo "== $1 $(date +%T)"; }
step snapshot; $PY benchmarks/make_random_snapshot.py --shape ${SHAPE:-3b} --out $W/snap3b 2>&1 | tail -2 | tee "$OUT/snapshot.txt"
du -sb $W/snap3b | tee -a "$OUT/snapshot.txt"
step coco; $PY benchmarks/make_synthetic_coco.py --out $W/coco --num ${NUM:-512}
step quantize
/usr/bin/time -v $VLMQ quantize arch.snapshot=$W/snap3b calib.root=$W/coco calib.num_samples=${NUM:-512} \
  export.dir=$W/export log_root=$OUT/logs run_name=quantize_3b > "$OUT/quantize.txt" 2>&1
echo "rc=$?" >> "$OUT/quantize.txt"; tail -30 "$OUT/quantize.txt"
cp $W/export/manifest.json "$OUT/manifest_3b.json" 2>/dev/null
du -sb $W/export/* | tee "$OUT/export_sizes.txt"
step verify; $VLMQ verify $W/export | tee "$OUT/verify.txt"
for backend in ${BACKENDS:-int_mm triton}; do
  step "bench $backend"
  $VLMQ bench --baseline $W/snap3b --model-dir $W/export/compressed_tensors --backend $backend \
    --batch-sizes 1,8 --new-tokens 32 --prompt-tokens 512 --iters 2 --out "$OUT/bench_$backend.json" 2>&1 | tail -14
done
if [ "${SKIP_OOM:-0}" != 1 ]; then
  step oom
  $VLMQ quantize arch.snapshot=$W/snap3b calib.root=$W/coco calib.num_samples=128 calib.batch_size=64 \
    calib.gpu_memory_fraction=${OOM_FRACTION:-0.12} 'export.formats=[modelopt_hf]' export.dir=$W/export_oom \
    log_root=$OUT/logs run_name=oom_backoff > "$OUT/oom.txt" 2>&1; echo "rc=$?" >> "$OUT/oom.txt"
  $PY -c "import json; m=json.load(open('$W/export_oom/manifest.json')); print(m['calibration']['batch_size'], m['peak_memory'])" | tee -a "$OUT/oom.txt"
fi
step done
