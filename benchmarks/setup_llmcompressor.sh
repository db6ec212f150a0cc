#!/usr/bin/env bash
# Build <repo>/.venv-llmc: a separate venv holding llm-compressor 0.14.0.1, the peer that
# benchmarks/peer_llmcompressor.py runs to quantize the same model on the same data as vlmq.
#
# llm-compressor 0.14.0.1 pins torch<=2.14.0, transformers<=5.17.0, compressed-tensors==0.19.0.
# This machine's pip is capped at torch<=2.14.1 (/etc/xdg/pip) and 2.14.1 is what lies on local
# disk, so llmcompressor goes in with --no-deps and its own requirements follow with the torch pin
# replaced by torch==2.14.1 (the CUDA build; it runs on CPU). Every other pin is kept.
#
# Idempotent: a marker file records what was installed; re-running with the same versions does
# nothing. Force a rebuild with VLMQ_LLMC_REBUILD=1. Venv path: VLMQ_LLMC_VENV (default .venv-llmc).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLMQ_LLMC_VENV:-$REPO/.venv-llmc}"
PYTHON="${PYTHON:-python3}"
LLMC_VERSION="0.14.0.1"
TORCH_VERSION="2.14.1"
MARKER="$VENV/.vlmq-llmc-setup"
WANT="llmcompressor==$LLMC_VERSION torch==$TORCH_VERSION"

t0=$SECONDS
log() { printf '[setup_llmcompressor %4ds] %s\n' "$((SECONDS - t0))" "$*"; }

if [[ "${VLMQ_LLMC_REBUILD:-0}" != "1" && -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]]; then
  log "up to date ($WANT) at $VENV; nothing to do"
  exit 0
fi

if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
  log "installing Debian package python3-venv"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv
fi

if [[ -d "$VENV" ]]; then
  log "removing stale $VENV"
  rm -rf "$VENV"
fi
# torch's CUDA build and its nvidia-* wheels are several GB; fail up front, not halfway.
free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
if ((free_gb < 10)); then
  echo "setup_llmcompressor: only ${free_gb} GB free beside $VENV; the llm-compressor venv needs about 10 GB" >&2
  exit 1
fi
log "creating venv $VENV with $("$PYTHON" --version)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
# pip's configured file:// indexes name folders that may not exist; drop that noise only.
pip_q() {
  "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location 'file://.*is ignored" >&2)
}

log "pip install --no-deps llmcompressor==$LLMC_VERSION"
pip_q install -q --no-deps "llmcompressor==$LLMC_VERSION"

# Its runtime requirements (no extras), torch's pin swapped for the local torch==2.14.1.
mapfile -t reqs < <("$VENV/bin/python" - "$TORCH_VERSION" <<'EOF'
import sys
from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement  # a fresh venv has pip's copy only

torch_version = sys.argv[1]
for line in requires("llmcompressor") or []:
    req = Requirement(line)
    if req.marker is not None and "extra" in str(req.marker):
        continue
    print(f"torch=={torch_version}" if req.name == "torch" else str(req))
EOF
)
log "pip install ${reqs[*]}"
pip_q install -q "${reqs[@]}"

# Dependencies may have pulled a different torch; make sure the wanted one is the one installed.
"$VENV/bin/python" - "$TORCH_VERSION" "$LLMC_VERSION" <<'EOF'
import sys
from importlib.metadata import version

torch_want, llmc_want = sys.argv[1], sys.argv[2]
got = version("torch").split("+")[0]
assert got == torch_want, f"torch {got} installed, wanted {torch_want}"
assert version("llmcompressor") == llmc_want, f"llmcompressor {version('llmcompressor')}, wanted {llmc_want}"
EOF

log "checking imports"
HF_HUB_OFFLINE=1 "$VENV/bin/python" - <<'EOF'
import compressed_tensors
import llmcompressor
import torch
import transformers
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: F401
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier  # noqa: F401

print(f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, compressed-tensors {compressed_tensors.__version__}")
EOF

echo "$WANT" > "$MARKER"
log "done: $VENV ($(du -sh "$VENV" | cut -f1))"
