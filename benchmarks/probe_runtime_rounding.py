"""Where a real export's error sits between the checkpoint and the bf16 runtime (SmolLM2, validation records).

The export runs in vlmq's runtime with fp32 float arithmetic (the checkpoint's own error: int8 GEMMs are exact
either way), then with bf16 rounding put back at one place at a time (each place's output rounded to bf16 and
widened again), then fully in bf16 as deployed. Scored against the fp32 model.

    python benchmarks/probe_runtime_rounding.py tmp/real_bench/default/compressed_tensors --val 48
Places: linear_in / linear_out (every W8A8 linear's input / output), norms, act (SiLU), attn / mlp (each block's
output), residual (each decoder layer's output), head (the logits), all (every place above together).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

PLACES = ("none", "linear_in", "linear_out", "norms", "act", "attn", "mlp", "residual", "head", "all", "bf16")


def _round_bf16(t):
    return t.to(torch.bfloat16).to(t.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _round_output(_module, _args, out):
    return (_round_bf16(out[0]), *out[1:]) if isinstance(out, tuple) else _round_bf16(out)


def _round_input(_module, args):
    return (_round_bf16(args[0]), *args[1:])


def _matches(place: str, name: str, module: torch.nn.Module) -> bool:
    from vlmq.runtime.linear import W8A8Linear

    parts = name.split(".")
    tests = {
        "linear_out": isinstance(module, W8A8Linear), "norms": name.endswith("layernorm"),
        "act": name.endswith("act_fn"), "attn": name.endswith("self_attn"), "mlp": name.endswith(".mlp"),
        "residual": len(parts) == 3 and parts[1] == "layers", "head": name == "lm_head",
    }
    return any(tests.values()) if place == "all" else tests.get(place, False)


def with_rounding(export: Path, place: str) -> torch.nn.Module:
    from vlmq.runtime.linear import W8A8Linear
    from vlmq.runtime.loader import load_w8a8

    model = load_w8a8(export, "cpu", torch.bfloat16 if place == "bf16" else torch.float32)[0]
    for name, module in model.named_modules():
        if _matches(place, name, module):
            module.register_forward_hook(_round_output)
        if place in ("linear_in", "all") and isinstance(module, W8A8Linear):
            module.register_forward_pre_hook(_round_input)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--val", type=int, default=48)
    parser.add_argument("--places", default=",".join(PLACES))
    args = parser.parse_args()

    from make_real_snapshot import build
    from real_fidelity import validation_batches

    from vlmq.evaluate.fidelity import score_models
    from vlmq.models.load import inspect_snapshot, load_model, load_processor

    snapshot = build()
    batches = validation_batches(load_processor(snapshot), args.val)
    ref = load_model(inspect_snapshot(snapshot), "float32", "cpu")
    models = {place: with_rounding(args.export, place) for place in args.places.split(",")}
    for place, fid in score_models(ref, models, batches).items():
        print(f"{place:<12} KL {fid.kl_mean:.5f}  top1 {fid.top1:.4f}  ppl {fid.ppl_delta_pct:+.2f}%", flush=True)


if __name__ == "__main__":
    main()
