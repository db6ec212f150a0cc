"""On the GPU: what down_proj's online input Hadamard (R4, blocks of 128) costs the W8A8 decode loop, side by
side in one process on the 3B shape (random weights; lean loop, CUDA graphs):

- ``plain``: today's W8A8 (every LM linear dynamic per-token int8, no rotation);
- ``hadamard fused``: the same model with each down_proj holding W H and ``input_hadamard = 128``, its input
  from the fused SiLU·mul + block Hadamard + int8 kernel (``vlmq.runtime.fused_hadamard.silu_mul_hadamard``) in the
  split mode it picks (decode on Hopper: a row's blocks over the CTAs of one thread-block cluster, which
  exchange their maxima through the cluster's barrier, ``cluster``; elsewhere ``wait``);
- ``hadamard fused wait``: the same kernel with its parts exchanging their maxima through a barrier in global
  memory (the default before session 16, and the split mode off Hopper);
- ``hadamard fused row``: the same kernel forced to one program per row (session 12's kernel);
- ``hadamard fused signs in registers`` / ``hadamard fused 32 blocks per part`` / ``hadamard fused 2 warps``:
  the split kernel's tuning knobs (``silu_mul_hadamard``'s ``signs_in_kernel`` / ``part_blocks`` / ``warps``);
  each lost in the decode loop (sessions 15-16);
- ``hadamard unfused``: the same rotated model, SiLU·mul in bf16 then the linear's own eager
  ``block_hadamard`` + quantization (``FusedOps.fuse_hadamard = False``), to show what the fusion buys.

Variants alternate round by round (median per variant), so clock drift hits them alike. Then the three
activation producers alone (no GEMM) at M = 1/8/64 from CUDA graphs over input sets sized past L2. With
``--profile``, batch-1 decode steps of each variant under torch.profiler, each kernel charged with how far it
pushed the stream's latest end (``kernel_path``): the producer alone ranked two barriers the other way round
from the decode loop (BENCHMARKS.md, session 14), so R4's cost is read there.

    PYTHONPATH=src python benchmarks/bench_down_hadamard.py --out $OUT/down_hadamard.json

``--shape demo --device cpu`` is a smoke run of the script (no kernels, no meaningful speed).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
from pathlib import Path

import torch
from torch import nn

from vlmq.bench import make_inputs, quantize_language_model, random_model
from vlmq.numerics import block_hadamard, quantize_weight_per_channel
from vlmq.runtime.decode import LeanDecoder
from vlmq.runtime.linear import W8A8Linear
from vlmq.timing import decode_times

BLOCK = 128
# name -> (rotated down_proj, fused Hadamard, split mode, silu_mul_hadamard's tuning keywords)
VARIANTS = {"plain": (False, True, None, {}), "hadamard fused": (True, True, None, {}),
            "hadamard fused wait": (True, True, "wait", {}), "hadamard fused row": (True, True, "row", {}),
            "hadamard fused signs in registers": (True, True, None, {"signs_in_kernel": True}),
            "hadamard fused 32 blocks per part": (True, True, None, {"part_blocks": 32}),
            "hadamard fused 2 warps": (True, True, None, {"warps": 2}),
            "hadamard unfused": (True, False, None, {})}


def rotated(lin: W8A8Linear, block: int) -> W8A8Linear:
    """The linear on a rotated input: weight (W H) requantized per channel, ``input_hadamard = block``
    (y = (x H)(W H)^T = x W^T, H symmetric orthogonal)."""
    w = lin.weight.float() * lin.weight_scale[:, None]
    w_q, w_s = quantize_weight_per_channel(block_hadamard(w, block))
    out = W8A8Linear.from_quantized(w_q, w_s, lin.bias, backend=lin.backend)
    out.input_hadamard = block
    return out


def set_down(model: nn.Module, downs: list[nn.Module]) -> None:
    for layer, down in zip(model.model.language_model.layers, downs, strict=True):
        layer.mlp.down_proj = down


@contextlib.contextmanager
def hadamard_keywords(kwargs: dict):
    """The decode loop's ``silu_mul_hadamard`` with ``kwargs`` bound while the block runs (the CUDA graphs
    captured inside keep them)."""
    from vlmq.runtime import ops

    original = ops.silu_mul_hadamard
    ops.silu_mul_hadamard = functools.partial(original, **kwargs) if kwargs else original
    try:
        yield
    finally:
        ops.silu_mul_hadamard = original


def variant_decoder(model: nn.Module, downs: dict[str, list[nn.Module]], variant: str, batch: int,
                    tokens: int) -> tuple[LeanDecoder, dict]:
    """The lean decoder of ``variant`` (its down_proj set, its fused-op switches) for ``tokens`` positions, and
    the ``silu_mul_hadamard`` keywords to run it under (``hadamard_keywords``)."""
    rot, fuse, split, kwargs = VARIANTS[variant]
    set_down(model, downs["rotated" if rot else "plain"])
    dec = LeanDecoder(model, batch, (tokens + 63) // 64 * 64)
    if hasattr(dec.ops, "fuse_hadamard"):
        dec.ops.fuse_hadamard, dec.ops.hadamard_split = fuse, split
    return dec, kwargs


@torch.no_grad()
def decode_run(model: nn.Module, downs: dict[str, list[nn.Module]], inputs: dict, batch: int, new_tokens: int,
               variant: str, device: torch.device) -> tuple[float, list[int]]:
    """(decode tok/s of one timed generation after a warm one, the first greedy tokens of row 0)."""
    dec, kwargs = variant_decoder(model, downs, variant, batch, inputs["input_ids"].shape[1] + new_tokens)
    with hadamard_keywords(kwargs):
        times = decode_times(dec, inputs, new_tokens, device, rounds=2)   # the first warms up
    return batch * (new_tokens - 1) / times[-1], dec.tokens[0, :8].tolist()


def decode_table(model: nn.Module, downs: dict[str, list[nn.Module]], processor, batches: list[int],
                 args: argparse.Namespace, device: torch.device) -> dict:
    variants = ["plain", *(v for v in args.variants.split(",") if v and v != "plain")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out: dict = {}
    for batch in batches:
        inputs = {k: v.to(device) for k, v in make_inputs(processor, "text", batch, args.prompt_tokens,
                                                            (448, 336)).items()}
        runs: dict[str, list[float]] = {name: [] for name in variants}
        tokens: dict[str, list[int]] = {}
        for _ in range(args.rounds):
            for name in variants:
                tok_s, tokens[name] = decode_run(model, downs, inputs, batch, args.new_tokens, name, device)
                runs[name].append(round(tok_s, 1))
        med = {name: round(statistics.median(r), 1) for name, r in runs.items()}
        out[f"text_b{batch}"] = {"tok_s_runs": runs, "tok_s_median": med, "tokens": tokens,
                                 **{f"{n} / plain": round(med[n] / med["plain"], 4) for n in variants if n != "plain"}}
        ratios = ", ".join(f"{n} / plain {med[n] / med['plain']:.4f}" for n in variants if n != "plain")
        print(f"batch {batch}: " + ", ".join(f"{n} {med[n]:.1f} tok/s" for n in variants) + f"  ({ratios})",
              flush=True)
    return out


def producer_table(ms: list[int], width: int) -> dict:
    """Microseconds per call of the three ways to produce down_proj's int8 input from gate_up [M, 2I]."""
    from bench_timing import time_graph

    from vlmq.runtime.fused import silu_mul
    from vlmq.runtime.fused_hadamard import hadamard_split_mode, silu_mul_hadamard
    from vlmq.runtime.kernels.triton_w8a8 import quantize_rows

    def unfused(gu: torch.Tensor) -> None:
        quantize_rows(block_hadamard(silu_mul(gu, False), BLOCK), None, None)

    fns = {"silu_mul+quant (plain)": lambda gu: silu_mul(gu, True),
           "silu_mul_hadamard (fused)": lambda gu: silu_mul_hadamard(gu, BLOCK),
           "fused, row": lambda gu: silu_mul_hadamard(gu, BLOCK, "row"),
           "fused, wait": lambda gu: silu_mul_hadamard(gu, BLOCK, "wait"),
           "unfused": unfused}
    out = {}
    for m in ms:
        r = int(min(256, max(2, math.ceil(150e6 / (m * width * 4)))))  # inputs past the 50 MB L2
        sets = [torch.randn(m, 2 * width, device="cuda").bfloat16() for _ in range(r)]
        splits = hadamard_split_mode(m, width, BLOCK, sets[0].device) != "row"  # else "wait" may not be launched
        usable = {n: f for n, f in fns.items() if "wait" not in n or splits}
        out[f"M{m}"] = {name: round(time_graph(lambda i, f=fn, xs=sets: f(xs[i]), r), 2) for name, fn in usable.items()}
        print(f"M {m}: " + ", ".join(f"{k} {v} us" for k, v in out[f"M{m}"].items()), flush=True)
    return out


def kernel_path(kernels: list[tuple[str, float, float]]) -> dict[str, dict[str, float]]:
    """Per kernel name, over a timeline of (name, start, end) in µs: calls, busy time, and the *end increment*:
    how far each call's end pushed the latest end so far. Under programmatic dependent launch a kernel starts
    early and waits for its predecessor, so its duration overstates what it costs; the increments instead sum
    to the timeline's span, each kernel charged with the time the stream spent finishing it."""
    out: dict[str, dict[str, float]] = {}
    latest: float | None = None
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        increment = end - start if latest is None else max(0.0, end - latest)
        latest = end if latest is None else max(latest, end)
        row = out.setdefault(name, {"calls": 0, "busy_us": 0.0, "end_increment_us": 0.0})
        row["calls"] += 1
        row["busy_us"] += end - start
        row["end_increment_us"] += increment
    return out


def profile_decode(model: nn.Module, downs: dict[str, list[nn.Module]], processor, variants: list[str],
                   args: argparse.Namespace, steps: int = 8) -> dict:
    """Batch-1 decode steps (CUDA graphs) of each variant under torch.profiler: each kernel's end increment per
    step (``kernel_path``), so R4's cost splits into the producer's share and its neighbours'."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    inputs = {k: v.to(device) for k, v in make_inputs(processor, "text", 1, args.prompt_tokens, (448, 336)).items()}
    out: dict = {}
    for name in ["plain", *(v for v in variants if v != "plain")]:
        dec, kwargs = variant_decoder(model, downs, name, 1, inputs["input_ids"].shape[1] + steps + 4)
        with torch.no_grad(), hadamard_keywords(kwargs):
            dec.prefill(**inputs)
            for _ in range(4):
                dec.step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    dec.step()
                torch.cuda.synchronize()
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA]
        path = kernel_path(kernels)
        span = sum(r["end_increment_us"] for r in path.values()) / steps
        rows = {k: {"calls_per_step": r["calls"] / steps, "busy_us_per_step": round(r["busy_us"] / steps, 2),
                    "end_increment_us_per_step": round(r["end_increment_us"] / steps, 2)}
                for k, r in sorted(path.items(), key=lambda kv: -kv[1]["end_increment_us"])}
        out[name] = {"step_us": round(span, 2), "kernels": rows}
        print(f"profile {name}: {span:.1f} us per step; end increments per step:", flush=True)
        for k, r in list(rows.items())[:10]:
            print(f"  {r['end_increment_us_per_step']:8.2f} us  busy {r['busy_us_per_step']:8.2f} us  "
                  f"{r['calls_per_step']:5.1f}x  {k[:80]}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="3b", choices=("3b", "small", "demo"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--variants", default="hadamard fused,hadamard fused wait,hadamard fused row,hadamard unfused",
                   help=f"decode variants besides plain, comma-separated, from {list(VARIANTS)}")
    p.add_argument("--producer-ms", default="1,8,64", help="M values of the producer table (CUDA); '' = skip")
    p.add_argument("--profile", action="store_true",
                   help="also profile batch-1 decode steps of plain and each variant (CUDA): per-kernel end increments")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, processor = random_model(args.shape, device)
    quantize_language_model(model, backend="triton" if device.type == "cuda" else "auto")
    plain = [layer.mlp.down_proj for layer in model.model.language_model.layers]
    downs = {"plain": plain, "rotated": [rotated(d, BLOCK) for d in plain]}
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "shape": args.shape, "block": BLOCK, "args": vars(args) | {"out": None}}
    if device.type == "cuda":
        import triton

        result["triton"] = triton.__version__
    result["decode"] = decode_table(model, downs, processor, batches, args, device)
    ms = [int(m) for m in args.producer_ms.split(",") if m]
    if device.type == "cuda" and ms:
        result["producers_us"] = producer_table(ms, plain[0].in_features)
    if device.type == "cuda" and args.profile:
        result["profile_b1"] = profile_decode(model, downs, processor, args.variants.split(","), args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
