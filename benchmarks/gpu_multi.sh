#!/usr/bin/env bash
# On a 2-GPU host: quantize the 3B shape sharded over both GPUs with a per-GPU cap (arch.max_memory)
# smaller than the model (7.5 GB), so it cannot sit on one GPU. Results under $OUT.
set -uo pipefail
OUT=${OUT:-tmp/gpu_multi}; mkdir -p "$OUT"
if [ -d .whl ] && [ -z "${NO_WHL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
PY=${PY:-python3}; W=/tmp/vlmq_multi; mkdir -p $W
nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpus.txt"
$PY benchmarks/make_random_snapshot.py --shape ${SHAPE:-3b} --out $W/snap 2>&1 | tail -1
$PY benchmarks/make_synthetic_coco.py --out $W/coco --num ${NUM:-64}
$PY -m vlmq quantize arch.snapshot=$W/snap calib.root=$W/coco calib.num_samples=${NUM:-64} \
  "arch.max_memory={0:${CAP:-5GiB},1:${CAP:-5GiB}}" export.dir=$W/export log_root=$OUT/logs run_name=multi \
  > "$OUT/quantize.txt" 2>&1; echo "rc=$?" | tee -a "$OUT/quantize.txt"; tail -25 "$OUT/quantize.txt"
grep -i "device_map\|hf_device_map\|placement" $OUT/logs/multi/quantize.log | head -5
$PY -m vlmq verify $W/export | tee "$OUT/verify.txt"
cp $W/export/manifest.json "$OUT/manifest.json" 2>/dev/null
