"""W8A8 linear vs bf16 cuBLAS on Qwen2.5-VL-3B LM shapes (H100).

Times, for each shape and M, with activation quantization included:
  bf16     F.linear (cuBLAS)
  triton   vlmq.runtime.kernels.triton_w8a8.w8a8_linear (config from pick_config)
  int_mm   the eager chain quantize_per_token -> torch._int_mm -> dequant (W8A8Linear "int_mm")

Each timing captures R calls on R different input/weight sets (R chosen so the weights
exceed L2) in one CUDA graph and reports the median replay time / R (do_bench), so
launch overhead and cache reuse stay out; `*_eager` columns time the same loop without
a graph (the harness: bench_timing.py). `--sweep` instead times candidate kernel configs per shape
and M (sweep_w8a8_tiles.py).

  PYTHONPATH=src python benchmarks/bench_w8a8_linear.py --out $OUT/bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import triton
from bench_timing import make_sets, n_rot, precompile, time_eager, time_graph
from triton.testing import do_bench

from vlmq.runtime.kernels.triton_w8a8 import (
    pick_config,
    quantize_rows,
    w8a8_gemm_prequant,
    w8a8_linear,
)
from vlmq.runtime.linear import W8A8Linear

# name: (N, K, has_bias) -- Qwen2.5-VL-3B language model (q/k/v carry a bias)
SHAPES: dict[str, tuple[int, int, bool]] = {
    "q_proj": (2048, 2048, True),
    "k_proj/v_proj": (256, 2048, True),
    "o_proj": (2048, 2048, False),
    "gate/up_proj": (11008, 2048, False),
    "down_proj": (2048, 11008, False),
    "qkv_fused": (2560, 2048, True),
    "gate_up_fused": (22016, 2048, False),
}
MS = [1, 16, 32, 64, 2048, 4096, 8192]


def methods(sets: dict[str, list]) -> dict[str, Callable[[int], Any]]:
    x, wb, wq, ws, b = (sets[k] for k in ("x", "w_bf16", "w_q", "w_s", "b"))
    chain = []
    for i in range(len(x)):
        layer = W8A8Linear.from_quantized(wq[i], ws[i], b[i], backend="int_mm")
        chain.append(layer)
    return {
        "bf16": lambda i: F.linear(x[i], wb[i], b[i]),
        "triton": lambda i: w8a8_linear(x[i], wq[i], ws[i], b[i]),
        "int_mm": lambda i: chain[i](x[i]),
    }


def ceilings() -> dict[str, float]:
    a = torch.empty(1 << 29, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    copy_tbs = 2 * a.numel() / (ms * 1e-3) / 1e12
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ y, warmup=10, rep=200, return_mode="median")
    bf16_tflops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    xi = torch.randint(-128, 128, (8192, 8192), device="cuda", dtype=torch.int8)
    yi = torch.randint(-128, 128, (8192, 8192), device="cuda", dtype=torch.int8).t()
    ms = do_bench(lambda: torch._int_mm(xi, yi), warmup=10, rep=200, return_mode="median")
    int8_tops = 2 * 8192**3 / (ms * 1e-3) / 1e12
    return {"copy_TBps": copy_tbs, "bf16_mm_TFLOPs": bf16_tflops, "int8_int_mm_TOPs": int8_tops}


# -- table -------------------------------------------------------------------------------


def run_table(shapes: dict, ms: list[int], jobs: int, rep: int, eager: bool) -> list[dict]:
    items = [(m, n, k, b, pick_config(m, n, k)) for (n, k, b), m in itertools.product(shapes.values(), ms)]
    if jobs > 1:
        precompile(items, jobs)
    rows = []
    for name, (n, k, bias) in shapes.items():
        for m in ms:
            r = n_rot(m, n, k)
            sets = make_sets(m, n, k, bias, r, seed=m)
            fns = methods(sets)
            row: dict[str, Any] = {"shape": name, "M": m, "N": n, "K": k, "bias": bias, "R": r}
            for meth, fn in fns.items():
                row[f"{meth}_us"] = time_graph(fn, r, rep)
                if eager and meth != "int_mm":
                    row[f"{meth}_eager_us"] = time_eager(fn, r, rep)
            row["triton_x"] = row["bf16_us"] / row["triton_us"]
            row["int_mm_x"] = row["bf16_us"] / row["int_mm_us"]
            # bytes a W8A8 call must move: int8 W + bf16 x in + bf16 y out
            row["triton_GBps"] = (n * k + 2 * m * k + 2 * m * n) / (row["triton_us"] * 1e-6) / 1e9
            row["triton_TOPs"] = 2 * m * n * k / (row["triton_us"] * 1e-6) / 1e12
            row["config"] = dataclasses.asdict(pick_config(m, n, k))
            rows.append(row)
            print(
                f"{name:14s} M={m:5d} bf16 {row['bf16_us']:8.2f}  w8a8 {row['triton_us']:8.2f} "
                f"(x{row['triton_x']:.2f})  int_mm {row['int_mm_us']:8.2f} (x{row['int_mm_x']:.2f})",
                flush=True,
            )
            del sets, fns
    return rows


def model_shape_table(cfg: Any, ms: list[int], rep: int = 30) -> list[dict]:
    """bf16 cuBLAS vs W8A8 (activation quant included) vs W8A8 GEMM on pre-quantized input (what
    the fused loop runs), per LM linear shape; CUDA graphs over rotating weight sets. At decode M
    the W8A8 kernels run as a chain of programmatic dependent launches, as in the loop (each GEMM
    launches while its predecessor runs); ``w8a8_prequant_serial_us`` is the same GEMM without."""
    h, i, nq, nkv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or h // nq
    shapes = {"qkv (fused)": (hd * (nq + 2 * nkv), h, True), "o_proj": (h, h, False),
              "gate_up (fused)": (2 * i, h, False), "down_proj": (h, i, False)}
    rows = []
    for name, (n, k, bias) in shapes.items():
        for m in ms:
            r = n_rot(m, n, k)
            st = make_sets(m, n, k, bias, r)
            x, wb, wq, ws, b = (st[key] for key in ("x", "w_bf16", "w_q", "w_s", "b"))
            pre = [quantize_rows(xi) for xi in x]
            fns = {
                "bf16_us": lambda j, x=x, wb=wb, b=b: F.linear(x[j], wb[j], b[j]),
                "w8a8_us": lambda j, x=x, wq=wq, ws=ws, b=b: w8a8_linear(x[j], wq[j], ws[j], b[j]),
                "w8a8_prequant_us": lambda j, p=pre, wq=wq, ws=ws, b=b: w8a8_gemm_prequant(
                    p[j][0], p[j][1], wq[j], ws[j], b[j]),
            }
            cfg_m = pick_config(m, n, k)
            if cfg_m.pdl:  # the same GEMM launched only after its predecessor has finished
                serial = dataclasses.replace(cfg_m, pdl=False)
                fns["w8a8_prequant_serial_us"] = lambda j, p=pre, wq=wq, ws=ws, b=b, c=serial: w8a8_gemm_prequant(
                    p[j][0], p[j][1], wq[j], ws[j], b[j], config=c)
            row: dict[str, Any] = {"shape": name, "N": n, "K": k, "M": m}
            for key, fn in fns.items():
                row[key] = time_graph(fn, r, rep)
            row["speedup"] = row["bf16_us"] / row["w8a8_us"]
            row["speedup_prequant"] = row["bf16_us"] / row["w8a8_prequant_us"]
            rows.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    eager = "bf16_eager_us" in rows[0]
    hdr = "| shape | M | bf16 us | W8A8 triton us | x bf16 | int_mm chain us | x bf16 | W8A8 GB/s | TOP/s |"
    if eager:
        hdr += " eager bf16 / triton us | eager x |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for r in rows:
        line = (
            f"| {r['shape']} | {r['M']} | {r['bf16_us']:.2f} | {r['triton_us']:.2f} | {r['triton_x']:.2f} | "
            f"{r['int_mm_us']:.2f} | {r['int_mm_x']:.2f} | {r['triton_GBps']:.0f} | {r['triton_TOPs']:.0f} |"
        )
        if eager:
            line += (
                f" {r['bf16_eager_us']:.1f} / {r['triton_eager_us']:.1f} |"
                f" {r['bf16_eager_us'] / r['triton_eager_us']:.2f} |"
            )
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON output path")
    ap.add_argument("--sweep", action="store_true", help="time candidate configs instead")
    ap.add_argument("--only", choices=("all", "tma"), default="all",
                    help="sweep: every candidate, or pick_config's choice against the TMA kernel's")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms) per timing")
    ap.add_argument("--no-eager", action="store_true")
    ap.add_argument("--no-ceilings", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_w8a8_linear needs a CUDA GPU")
    shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
    ms = [int(v) for v in args.ms.split(",")]
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if not args.no_ceilings:
        meta["ceilings"] = ceilings()
        print("ceilings:", {k: round(v, 2) for k, v in meta["ceilings"].items()}, flush=True)
    if args.sweep:
        from sweep_w8a8_tiles import run_sweep  # benchmarks/ is sys.path[0] when run as a script

        rows = run_sweep(shapes, ms, args.jobs, args.rep, args.only)
    else:
        rows = run_table(shapes, ms, args.jobs, args.rep, eager=not args.no_eager)
        print_table(rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
