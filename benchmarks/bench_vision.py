"""Qwen2.5-VL-3B vision tower (random weights, bf16, one GPU): transformers' forward vs vlmq's.

Times, per batch of same-size images, the merged features of:
  hf        transformers' tower (one SDPA call per window, host index loops every forward)
  batched   the same forward with each layer's windows in one SDPA call (vision.batched_window_attention)
  lean      vision.LeanVision eager (index work cached per grid, the HF blocks' modules in a loop)
  graphed   vision.LeanVision replayed from a CUDA graph per grid
and with --profile the most expensive CUDA kernels of one LeanVision forward (into --out as well).

  PYTHONPATH=src python benchmarks/bench_vision.py --out $OUT/vision.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from triton.testing import do_bench

from vlmq.runtime import vision


def build_tower(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Qwen2.5-VL-3B's vision tower with random weights (seed 0), SDPA attention."""
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    cfg = Qwen2_5_VLConfig(vision_config={"hidden_size": 1280, "intermediate_size": 3420, "out_hidden_size": 2048,
                                          "num_heads": 16, "depth": 32}).vision_config  # the 3B's tower  # fmt: skip
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2_5_VisionTransformerPretrainedModel._from_config(cfg).to(device, dtype).eval()


@torch.no_grad()
def measure(visual: torch.nn.Module, batch: int, h: int, w: int, profile: bool) -> dict:
    grid = torch.tensor([[1, h, w]] * batch, device="cuda")
    pixels = torch.randn(batch * h * w, 3 * 2 * 14 * 14, device="cuda", dtype=torch.bfloat16)
    lean, graphed = vision.LeanVision(visual, graphs=False), vision.LeanVision(visual, graphs=True)

    def hf() -> torch.Tensor:
        return visual(pixels, grid_thw=grid).pooler_output

    def batched() -> torch.Tensor:
        with vision.batched_window_attention(visual):
            return visual(pixels, grid_thw=grid).pooler_output

    fns = {"hf": hf, "batched": batched, "lean": lambda: lean(pixels, grid), "graphed": lambda: graphed(pixels, grid)}
    row: dict = {"batch": batch, "grid": [1, h, w], "tokens": batch * h * w}
    ref = hf().float()
    for name, fn in fns.items():
        row[f"{name}_ms"] = do_bench(fn, warmup=3, rep=200, return_mode="median")
        row[f"{name}_rel"] = float((fn().float() - ref).norm() / ref.norm())
    if profile:  # the eager forward of the graphed variant (same kernels, fused norm/SiLU included)
        eager_fused = vision.LeanVision(visual, graphs=False, fused=graphed.fused)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            eager_fused(pixels, grid)
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in events) or 1.0
        row["profile"] = [{"kernel": e.key[:120], "calls": e.count, "gpu_us": round(e.self_device_time_total, 1),
                           "share": round(e.self_device_time_total / total, 3)} for e in events[:12]]  # fmt: skip
        for p in row["profile"]:
            print(f"  {p['share']:6.1%} {p['gpu_us']:10.1f} us {p['calls']:5d}x  {p['kernel']}", flush=True)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "profile"}),
          flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--grid", default="34,46", help="patch grid h,w (a 640x480 image: 34,46)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_vision needs a CUDA GPU")
    visual = build_tower()
    h, w = (int(v) for v in args.grid.split(","))
    rows = [measure(visual, int(b), h, w, args.profile) for b in args.batches.split(",")]
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "argv": sys.argv,
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
