"""Which W8A8 recipe pieces close the gap to bf16 on the real model: a pure-PyTorch fp32 simulation.

Every LM linear gets int8 per-channel weights (round-to-nearest or GPTQ) and int8 per-token dynamic
activations (fake-quantized in fp32), after optional rotations (vlmq.quantize.rotate: R1 residual, R2 values,
R4 online block Hadamard on down_proj's input) and SmoothQuant (vlmq.quantize.fold). Scored against the fp32
model on the real held-out text. This is a probe for choosing the recipe, not the product: the figures
that count come from the real exports (benchmarks/real_fidelity.py).

    python benchmarks/probe_recipes.py sq rot+sq rot+sq+r4 rot+sq+r4+gptq --calib 64 --samples 24
A recipe name is '+'-joined pieces: rot (R1; with 'orth' a random orthogonal R1 instead of the Hadamard), r2, r4
(block 'r4:256'), sq (alpha 'sq:0.6'), gptq, seq (GPTQ layer by layer, each layer's Hessians from the model whose
earlier layers are already quantized), wonly / aonly (quantize only the weights / only the activations: where the
error sits). `--val N` scores on N records of calib.jsonl that no calibration here reads (records 400.., seeded
order) instead of the held-out test file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))



def parse(name: str) -> dict:
    pieces = dict(p.split(":", 1) if ":" in p else (p, "") for p in name.split("+"))
    return {"rot": "rot" in pieces, "r2": "r2" in pieces, "r4": int(pieces["r4"] or 128) if "r4" in pieces else 0,
            "alpha": float(pieces["sq"] or 0.5) if "sq" in pieces else None, "gptq": "gptq" in pieces,
            "down_sq": "dsq" in pieces, "orth": "orth" in pieces, "seed": int(pieces.get("seed") or 0),
            "seq": "seq" in pieces,
            "weights": "aonly" not in pieces, "acts": "wonly" not in pieces}


class _Stop(Exception):
    pass


def _stop_forward(*_) -> None:
    raise _Stop


@torch.no_grad()
def build(base: torch.nn.Module, family, recipe: dict, calib: list[dict]) -> torch.nn.Module:
    from vlmq.models.families import quantized_linear_names
    from vlmq.numerics import fake_quant_activations, quantize_weight_per_channel
    from vlmq.quantize import rotate
    from vlmq.quantize.fold import fold_smoothquant
    from vlmq.quantize.gptq import HessianCollector, gptq_round

    model = copy.deepcopy(base)
    if recipe["rot"]:
        rotate.fold_norm_gains(model, family)
        hidden = model.config.hidden_size
        matrix = "orthogonal" if recipe["orth"] else "hadamard"
        rotate.rotate_residual(model, family, rotate.rotation_matrix(hidden, recipe["seed"], matrix))
    if recipe["r2"]:
        _, _, head_dim = rotate.text_geometry(model)
        rotate.rotate_values(model, family, rotate.rotation_matrix(head_dim, recipe["seed"] + 1, "hadamard"))
    if recipe["r4"]:
        rotate.rotate_mlp_input(model, family, recipe["r4"])
    names = quantized_linear_names(family, len(model.get_submodule(family.layers)))
    modules = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}

    def track(name):
        def hook(_m, args):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return hook

    handles = [modules[n].register_forward_pre_hook(track(n)) for n in names]
    for batch in calib:
        model(**batch)
    for h in handles:
        h.remove()
    if recipe["alpha"] is not None:
        stats = {n: a for n, a in amax.items()
                 if not (recipe["r4"] and n.endswith("down_proj") and not recipe["down_sq"])}
        fold_smoothquant(model, family, stats, recipe["alpha"])
    layers = model.get_submodule(family.layers)
    # one pass for every layer's Hessians, or (seq) one pass per layer, stopped after it, over the model whose
    # earlier layers are already quantized
    groups = ([[n for n in names if n.startswith(f"{family.layers}.{i}.")] for i in range(len(layers))]
              if recipe["seq"] else [names])
    for i, group in enumerate(groups):
        hessians = None
        if recipe["gptq"] and recipe["weights"]:
            hessians = HessianCollector(model, {n: modules[n] for n in group})
            stop = layers[i].register_forward_hook(_stop_forward) if recipe["seq"] else None
            for batch in calib:
                try:
                    model(**batch)
                except _Stop:
                    pass
            hessians.remove()
            if stop is not None:
                stop.remove()
        for name in group:
            linear = modules[name]
            if recipe["weights"]:
                if hessians:
                    q, scale = gptq_round(linear.weight, hessians.hessians[name])
                else:
                    q, scale = quantize_weight_per_channel(linear.weight)
                linear.weight.data = q.float() * scale[:, None]
            if recipe["acts"]:
                linear.register_forward_pre_hook(lambda _m, args: (fake_quant_activations(args[0], "dynamic").to(
                    args[0].dtype), *args[1:]))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--val", type=int, default=0, help="score on N validation records of calib.jsonl")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from make_real_snapshot import build as build_snapshot
    from real_fidelity import CALIB, heldout_batches, validation_batches

    from vlmq.calib.batches import make_batches
    from vlmq.calib.jsonl import load_jsonl
    from vlmq.evaluate.fidelity import score_models
    from vlmq.models.load import inspect_snapshot, load_model, load_processor

    snapshot = build_snapshot()
    snap = inspect_snapshot(snapshot)
    processor = load_processor(snapshot)
    family = snap.family
    ref = load_model(snap, "float32", "cpu")
    records, _ = load_jsonl(CALIB, None, args.calib, 0)
    calib = make_batches(processor, records, 8, 1024)
    held = validation_batches(processor, args.val) if args.val else heldout_batches(processor, samples=args.samples)
    results = {}
    for name in args.recipes:
        started = time.perf_counter()
        model = build(ref, family, parse(name), calib)
        built = time.perf_counter() - started
        fid = score_models(ref, {name: model}, held)[name]
        results[name] = {**fid.to_dict(), "build_s": round(built, 1)}
        print(f"{name:<32} KL {fid.kl_mean:.4f}  top1 {fid.top1:.3f}  ppl {fid.ppl_delta_pct:+.2f}%  "
              f"({built:.0f}s)", flush=True)
        del model
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
