#!/usr/bin/env bash
# The real-weights table (docs/BENCHMARKS.md "Real weights"): vlmq's recipes and llm-compressor's, on the
# same model (SmolLM2-135M-Instruct, benchmarks/make_real_snapshot.py), the same N calibration texts and
# the same held-out texts, in one run; then every export scored by vlmq's runtime against fp32 and against
# bf16 (benchmarks/real_fidelity.py). Two more rows calibrate the default on more texts (256, 400: not the
# peers' data). Run it on a quiet machine: the wall times are part of the table.
#   bash benchmarks/real_weights.sh            # OUT=tmp/real_bench N=128 (calibration) H=32 (held-out records)
#   ONLY="default fp32_compute" EXTRA="old default=tmp/old/compressed_tensors" bash benchmarks/real_weights.sh
#     (only those vlmq rows, plus the peers, plus earlier exports scored in the same run)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tmp/real_bench}; N=${N:-128}; H=${H:-32}; ONLY=${ONLY:-}; EXTRA=${EXTRA:-}
PY=.venv/bin/python
mkdir -p "$OUT"
SNAP=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); from make_real_snapshot import build; print(build())")
CALIB=benchmarks/data/real_text/calib.jsonl
quantize() {  # name, overrides...
  local name=$1; shift
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  /usr/bin/time -f "%e s wall, %M KB max RSS" -o "$OUT/time_$name.txt" \
    .venv/bin/vlmq quantize "arch.snapshot=$SNAP" arch.family=llama calib.source=text_jsonl "calib.root=$CALIB" \
    "calib.num_samples=$N" "export.dir=$OUT/$name" "log_root=$OUT/logs" "run_name=$name" export.score=false --force "$@" \
    > "$OUT/quantize_$name.txt" 2>&1
  echo "$name: $(cat "$OUT/time_$name.txt")"
}
quantize default
quantize fp32_compute arch.dtype=float32
quantize no_r4 quant.rotate.mlp_input_block=0
quantize no_rotation 'quant.steps=[calibrate,smooth,gptq,round]'
quantize smoothquant 'quant.steps=[calibrate,smooth,round]' 'export.formats=[compressed_tensors,modelopt_hf]'
quantize smoothquant_alpha_search 'quant.steps=[calibrate,smooth,round]' quant.alpha_search=true
quantize default_256 calib.num_samples=256
quantize default_400 calib.num_samples=400
bash benchmarks/setup_llmcompressor.sh
/usr/bin/time -f "%e s wall, %M KB max RSS" -o "$OUT/time_peers.txt" \
  .venv-llmc/bin/python benchmarks/peer_llmcompressor.py --num-samples "$N" --out-root "$OUT/peers" \
  > "$OUT/peers.txt" 2>&1
tail -5 "$OUT/peers.txt"
EXPORTS=(
  "vlmq default (R1+R4, SQ 0.5, GPTQ)=$OUT/default/compressed_tensors"
  "vlmq default, fp32 compute (arch.dtype=float32)=$OUT/fp32_compute/compressed_tensors"
  "vlmq default without R4 (quant.rotate.mlp_input_block=0)=$OUT/no_r4/compressed_tensors"
  "vlmq SQ 0.5 + GPTQ, no rotation=$OUT/no_rotation/compressed_tensors"
  "vlmq SmoothQuant only (the previous default)=$OUT/smoothquant/compressed_tensors"
  "vlmq SmoothQuant only, alpha_search=$OUT/smoothquant_alpha_search/compressed_tensors"
  "vlmq modelopt_hf (static per-tensor)=$OUT/smoothquant/modelopt_hf"
  "llm-compressor SQ(0.8)+GPTQ=$OUT/peers/llmc_sq_gptq"
  "llm-compressor SQ(0.8)+RTN=$OUT/peers/llmc_sq_rtn"
  "vlmq default, 256 texts=$OUT/default_256/compressed_tensors"
  "vlmq default, 400 texts=$OUT/default_400/compressed_tensors"
)
PRESENT=()
for e in "${EXPORTS[@]}"; do [ -d "${e##*=}" ] && PRESENT+=("$e"); done
[ -n "$EXTRA" ] && PRESENT+=("$EXTRA")
for ref in fp32 bf16; do
  $PY benchmarks/real_fidelity.py --samples "$H" --reference $ref --json "$OUT/fidelity_$ref.json" "${PRESENT[@]}" \
    2>/dev/null | tee "$OUT/fidelity_$ref.txt"
done
# Like for like on the runtime: every export (the peers' bf16 checkpoints too) run in fp16.
$PY benchmarks/real_fidelity.py --samples "$H" --reference fp32 --runtime-dtype float16 \
  --json "$OUT/fidelity_fp32_all_fp16.json" "${PRESENT[@]}" 2>/dev/null | tee "$OUT/fidelity_fp32_all_fp16.txt"
