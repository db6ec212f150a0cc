#!/usr/bin/env python3
"""Sanity-check a Qwen2.5-VL-3B W8A8 checkpoint against bf16: the original plan's script.

A thin wrapper over `vlmq check`: runs from the repository root (so the default paths models/... and
tmp/qwen2_5_vl_3b_w8a8/<run>/ land there); every other argument passes through, e.g.
  scripts/qwen/run_qwen2_5_vl_3b_sanity.py \
      --model-dir models/qwen2_5_vl_3b_instruct/quantized/w8a8_int8_sq/modelopt_hf --label w8a8 \
      --max-kl 0.05 --min-top1 0.9 run_name=sanity
Exit code: 0 pass, 1 gate failed or checkpoint rejected, 2 usage/config error.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    venv_python = REPO_ROOT / ".venv" / "bin" / "python"
    if importlib.util.find_spec("torch") is None and venv_python.is_file():  # e.g. run as ./script by system python
        passed = sys.argv[1:] if argv is None else argv
        os.execv(venv_python, [str(venv_python), str(Path(__file__).resolve()), *passed])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--model-dir", type=Path, help="the W8A8 checkpoint (default: the configured export)")
    parser.add_argument("--label", default="w8a8", help="names the run: baseline / w8a8 / anything")
    known, rest = parser.parse_known_args(argv)
    args = ["check", "--label", known.label]
    if known.model_dir is not None:
        args += ["--model-dir", str(known.model_dir.absolute())]  # relative to the caller's directory
    os.chdir(REPO_ROOT)
    sys.path.insert(0, str(REPO_ROOT / "src"))
    from vlmq.cli import main as vlmq_main

    return vlmq_main(args + rest)


if __name__ == "__main__":
    sys.exit(main())
