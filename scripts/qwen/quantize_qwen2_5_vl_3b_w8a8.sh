#!/usr/bin/env bash
# Quantize Qwen2.5-VL-3B-Instruct to W8A8 INT8 SmoothQuant: the original plan's single command.
# A thin wrapper over `vlmq quantize`: runs from the repository root (so the default paths
# models/... and tmp/... land there) and passes every argument through, e.g.
#   scripts/qwen/quantize_qwen2_5_vl_3b_w8a8.sh --force calib.num_samples=512 quant.alpha=0.8
# Without a snapshot under models/, vlmq runs its built-in demo model and says so.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root"

if [[ -x "$repo_root/.venv/bin/vlmq" ]]; then
    vlmq="$repo_root/.venv/bin/vlmq"
elif command -v vlmq >/dev/null 2>&1; then
    vlmq="$(command -v vlmq)"
else
    echo "quantize_qwen2_5_vl_3b_w8a8.sh: error: vlmq not found (no $repo_root/.venv/bin/vlmq and none on PATH; run: pip install -e .)" >&2
    exit 127
fi

exec "$vlmq" quantize "$@"
