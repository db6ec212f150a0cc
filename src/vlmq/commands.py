"""Subcommands that run or inspect an exported checkpoint: generate, verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def generate_arguments(p: argparse.ArgumentParser) -> None:
    from vlmq.runtime import backend_choices

    p.add_argument("--model-dir", required=True, type=Path,
                   help="an export's format folder, the export root (its first format), or a bf16 snapshot")
    p.add_argument("--image", type=Path, help="an image for an image+text prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=backend_choices(), help="W8A8 GEMM backend")
    p.add_argument("prompt", help="the user's text")


def cmd_generate(args: argparse.Namespace) -> int:
    from vlmq.calib import load_rgb
    from vlmq.runtime.generate import generate_text, load_any

    image = None
    if args.image is not None:
        if not args.image.is_file():
            raise FileNotFoundError(f"image not found: {args.image}")
        image = load_rgb(args.image.absolute(), args.image.absolute().parent)
    model, processor, label = load_any(args.model_dir, args.device, args.backend)
    text, _ = generate_text(model, processor, args.prompt, image, args.max_new_tokens)
    print(f"[{label}] {text}")
    return 0


def verify_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="an export root (with manifest.json) or one format's directory")


def cmd_verify(args: argparse.Namespace) -> int:
    from vlmq.verify import verify_export

    verdict = verify_export(args.dir)
    for warning in verdict.warnings:   # another format's damage: not what was verified
        print(f"vlmq: warning: {warning}", file=sys.stderr)
    if verdict.problems:
        problems = verdict.problems
        print(f"FAIL {args.dir}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
        return 1
    print(f"OK {args.dir}: {verdict.summary}")
    return 0
