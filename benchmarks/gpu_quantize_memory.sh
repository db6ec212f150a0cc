#!/usr/bin/env bash
# On the lent GPU: `vlmq quantize` of the random 3B-shape snapshot (512 synthetic COCO samples) in several
# variants, each with /usr/bin/time -v (peak host RSS) and its manifest (stage timings, peak GPU memory,
# per-format fidelity). VARIANTS picks them (default: default noscore sq_only):
#   default       the default recipe (rotate, calibrate, smooth, gptq, round), compressed_tensors, scored
#   noscore       the same, export.score=false
#   sq_only       the SmoothQuant-only recipe of earlier versions, quant.steps=[calibrate,smooth,round]
#   hessian_cpu   the default with GPTQ Hessians summed in host RAM (quant.gptq.hessian_device=cpu)
#   both_formats  the SmoothQuant-only recipe with ModelOpt's format too (modelopt_hf refuses rotate/gptq)
# Each variant is cut at T_RUN seconds (default 240). Results under $OUT (default ./tmp/gpu_out).
# Needs .whl/ (../shared/tools/gpu-wheels.sh).
set -uo pipefail
OUT=${OUT:-tmp/gpu_out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
PY=python3; W=/tmp/vlmq_gpu; mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, modelopt, compressed_tensors as ct; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'modelopt', modelopt.__version__, 'compressed-tensors', ct.__version__)" | tee -a "$OUT/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$OUT/gpu.txt"
$PY benchmarks/make_random_snapshot.py --shape 3b --out $W/snap3b 2>&1 | tail -1
du -sb $W/snap3b/*.safetensors | tee "$OUT/snapshot.txt"
$PY benchmarks/make_synthetic_coco.py --out $W/coco --num ${NUM:-512} > /dev/null
run() {  # name, overrides...
  local name=$1; shift
  echo "== $name $(date +%T)"
  timeout ${T_RUN:-240} /usr/bin/time -v $PY -m vlmq quantize arch.snapshot=$W/snap3b calib.root=$W/coco calib.num_samples=${NUM:-512} \
    export.dir=$W/export_$name log_root=$W/logs run_name=$name --force "$@" > "$OUT/quantize_$name.txt" 2>&1
  echo "rc=$?" >> "$OUT/quantize_$name.txt"
  cp $W/export_$name/manifest.json "$OUT/manifest_$name.json" 2>/dev/null
  grep -E "Maximum resident|Elapsed \(wall|^rc=" "$OUT/quantize_$name.txt"
  $PY -c "import json,sys; m=json.load(open('$OUT/manifest_$name.json')); print(m['timings_s'], m['peak_memory']);
[print(f, e.get('fidelity')) for f, e in m['exports'].items()]" 2>/dev/null
  $PY -m vlmq verify $W/export_$name | tail -1
  rm -rf $W/export_$name
}
SQ_ONLY='quant.steps=[calibrate,smooth,round]'
for variant in ${VARIANTS:-default noscore sq_only}; do
  case $variant in
    default) run default ;;
    noscore) run noscore export.score=false ;;
    sq_only) run sq_only "$SQ_ONLY" ;;
    hessian_cpu) run hessian_cpu quant.gptq.hessian_device=cpu export.score=false ;;
    both_formats) run both_formats "$SQ_ONLY" 'export.formats=[compressed_tensors,modelopt_hf]' ;;
    *) echo "unknown variant $variant"; exit 2 ;;
  esac
done
echo "== done $(date +%T)"
