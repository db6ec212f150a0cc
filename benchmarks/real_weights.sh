#!/usr/bin/env bash
# The real-weights table (docs/BENCHMARKS.md "Real weights"): vlmq's recipes and llm-compressor's, on the
# same model (SmolLM2-135M-Instruct, benchmarks/make_real_snapshot.py), the same 128 calibration texts and
# the same held-out texts, in one run; then every export scored against fp32 by vlmq's runtime
# (benchmarks/real_fidelity.py). Run it on a quiet machine: the wall times are part of the table.
#   bash benchmarks/real_weights.sh            # OUT=tmp/real_bench N=128 (calibration) H=32 (held-out records)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tmp/real_bench}; N=${N:-128}; H=${H:-32}
PY=.venv/bin/python
mkdir -p "$OUT"
SNAP=$($PY -c "import sys; sys.path.insert(0, 'benchmarks'); from make_real_snapshot import build; print(build())")
CALIB=benchmarks/data/real_text/calib.jsonl
quantize() {  # name, overrides...
  local name=$1; shift
  /usr/bin/time -f "%e s wall, %M KB max RSS" -o "$OUT/time_$name.txt" \
    .venv/bin/vlmq quantize "arch.snapshot=$SNAP" arch.family=llama calib.source=text_jsonl "calib.root=$CALIB" \
    "calib.num_samples=$N" "export.dir=$OUT/$name" "log_root=$OUT/logs" "run_name=$name" --force "$@" \
    > "$OUT/quantize_$name.txt" 2>&1
  echo "$name: $(cat "$OUT/time_$name.txt")"
}
quantize default 'export.formats=[compressed_tensors,modelopt_hf]'
quantize alpha_search quant.alpha_search=true
quantize alpha0 quant.alpha=0
quantize static export.activations=static
bash benchmarks/setup_llmcompressor.sh
.venv-llmc/bin/python benchmarks/peer_llmcompressor.py --num-samples "$N" --out-root "$OUT/peers" \
  > "$OUT/peers.txt" 2>&1
tail -5 "$OUT/peers.txt"
$PY benchmarks/real_fidelity.py --samples "$H" --json "$OUT/fidelity.json" \
  "vlmq default (compressed_tensors)=$OUT/default/compressed_tensors" \
  "vlmq alpha_search=$OUT/alpha_search/compressed_tensors" \
  "vlmq alpha=0 (no smoothing)=$OUT/alpha0/compressed_tensors" \
  "vlmq activations=static=$OUT/static/compressed_tensors" \
  "vlmq modelopt_hf (static per-tensor)=$OUT/default/modelopt_hf" \
  "llm-compressor SQ(0.8)+GPTQ=$OUT/peers/llmc_sq_gptq" \
  "llm-compressor SQ(0.8)+RTN=$OUT/peers/llmc_sq_rtn" 2>/dev/null | tee "$OUT/fidelity.txt"
