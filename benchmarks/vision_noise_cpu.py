"""How far bf16 alone moves Qwen2.5-VL-3B's vision tower (random weights, CPU): transformers' forward in
fp32 vs bf16, and vlmq's LeanVision against both, on one 640x480 image (grid 34x46, uneven windows).
Puts the GPU agreement figure of `vlmq bench` (LeanVision vs transformers, bf16) in proportion.

  cd benchmarks && PYTHONPATH=../src python vision_noise_cpu.py --out vision_bf16_noise_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from bench_vision import build_tower

from vlmq.runtime import vision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args()
    tower = build_tower("cpu", torch.float32)
    grid = torch.tensor([[1, 34, 46]])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    out: dict = {}
    with torch.no_grad():
        ref = tower(pixels, grid_thw=grid).pooler_output
        out["fp32_lean_vs_hf"] = rel(vision.LeanVision(tower, graphs=False)(pixels, grid), ref)
        tower.to(torch.bfloat16)
        hf16 = tower(pixels.bfloat16(), grid_thw=grid).pooler_output
        lean16 = vision.LeanVision(tower, graphs=False)(pixels.bfloat16(), grid)
    out.update(bf16_hf_vs_fp32_hf=rel(hf16, ref), bf16_lean_vs_fp32_hf=rel(lean16, ref),
               bf16_lean_vs_bf16_hf=rel(lean16, hf16))  # fmt: skip
    out["meta"] = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "grid": [1, 34, 46]}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
