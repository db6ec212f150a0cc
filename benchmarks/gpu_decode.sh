#!/usr/bin/env bash
# On the lent H100 (one self-contained call): GPU tests of the lean loop + fused kernels,
# `vlmq bench --shape 3b` (lean loop, linear table, bf16 vs W8A8 in one process), the 3B
# lean-vs-HF agreement check, and with EXTRA=1 the decode-variant / o_proj-input / read-floor
# benchmarks. Results under $OUT (default ./tmp/gpu_out).
set -uo pipefail
OUT=${OUT:-tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
step() { echo "== $1 $(date +%T)"; }
step tests
timeout ${T_TESTS:-150} $PY -m pytest -q -p no:cacheprovider tests/gpu/test_decode_gpu.py 2>&1 | tail -40 | tee "$OUT/tests.txt"
step bench
timeout ${T_BENCH:-260} $PY -m vlmq bench --shape 3b --batch-sizes ${BATCHES:-1,8} --new-tokens ${NEW:-64} \
  --prompt-tokens ${PROMPT:-512} --iters ${ITERS:-3} --linear-ms ${LINEAR_MS:-1,8,2048,8192} \
  ${BENCH_EXTRA:-} --out "$OUT/bench_3b.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
step check3b
timeout ${T_CHECK:-120} $PY benchmarks/check_decode_3b.py --profile --out "$OUT/check_3b.json" 2>&1 | grep -v Warn | tail -50 | tee "$OUT/check.txt"
if [ -n "${EXTRA:-}" ]; then  # EXTRA=1: the decode-variant, o_proj-input and read-floor benchmarks too
  step variants
  timeout ${T_VARIANTS:-300} $PY benchmarks/decode_variants.py 2>&1 | grep -v Warn | tail -20 | tee "$OUT/decode_variants.txt"
  step o_proj_input
  (cd benchmarks && timeout 120 $PY bench_o_proj_input.py --out "$OUT/o_proj_input.json") 2>&1 | tail -5
  step read_floor
  (cd benchmarks && timeout 120 $PY bench_read_floor.py --out "$OUT/read_floors.json") 2>&1 | tail -5
fi
step done
