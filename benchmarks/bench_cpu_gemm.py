"""What a CPU's GEMMs cost, for the choices vlmq makes on CPUs: float GEMMs by dtype (the model's own arithmetic)
and the W8A8 runtime's integer GEMM backends (`torch._int_mm`, `fp32_blocks`, `reference`), at SmolLM2-135M's
linear shapes, side by side in one process.

    python benchmarks/bench_cpu_gemm.py --out tmp/cpu_gemm.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmq.runtime.linear import cpu_has_int8_dot, int_gemm_fp32_blocks, int_gemm_int_mm, int_gemm_reference

# (tokens, in_features, out_features): SmolLM2-135M's q/k/v/o and MLP linears, a slice of its lm_head, and one
# token of decode
SHAPES = [(512, 576, 1536), (512, 1536, 576), (512, 576, 8192), (1, 576, 1536), (2, 576, 1536), (4, 576, 1536),
          (8, 576, 1536)]
INT_GEMMS = {"int_mm": int_gemm_int_mm, "fp32_blocks": int_gemm_fp32_blocks, "reference": int_gemm_reference}


def gflops(fn, flops: float, rounds: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return flops * rounds / (time.perf_counter() - start) / 1e9


def measure(rounds: int) -> dict:
    torch.manual_seed(0)
    rows = []
    for m, k, n in SHAPES:
        flops = 2.0 * m * k * n
        x, w = torch.randn(m, k), torch.randn(n, k) / k**0.5
        row = {"shape": [m, k, n]}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd, wd = x.to(dtype), w.to(dtype)
            rate = gflops(lambda xd=xd, wd=wd: F.linear(xd, wd), flops, rounds)
            row[f"linear_{str(dtype).removeprefix('torch.')}"] = round(rate, 2)
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        wq = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        exact = int_gemm_reference(a, wq)
        for name, gemm in INT_GEMMS.items():
            assert torch.equal(gemm(a, wq), exact), name
            row[f"int8_{name}"] = round(gflops(lambda g=gemm, a=a, wq=wq: g(a, wq), flops, rounds), 2)
        rows.append(row)
        print(row, flush=True)
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_has_int8_dot": cpu_has_int8_dot(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
            "unit": "GFLOP/s", "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = measure(args.rounds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
