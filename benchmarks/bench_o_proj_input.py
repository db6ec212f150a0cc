"""What o_proj's input costs at prefill (H100): SDPA returns [B, H, T, D] and o_proj wants token
rows [B*T, H*D]. Times torch's transpose copy (what the loop ran before) and the quant pass that W8A8
paid after it, `heads_to_rows` (the loop's pass now: bf16 rows, or int8 rows + per-token scales for
W8A8), and the whole o_proj op as each model runs it: bf16 = `heads_to_rows` + cuBLAS, W8A8 =
`heads_to_rows(quant=True)` + int8 GEMM. CUDA graph over rotating inputs and weights, µs per call.

    PYTHONPATH=src python benchmarks/bench_o_proj_input.py --out $OUT/o_proj_input.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
from bench_w8a8_linear import time_graph

from vlmq.runtime.attention import heads_to_rows
from vlmq.runtime.kernels.triton_w8a8 import quantize_rows, w8a8_gemm_prequant


def rows(attn: torch.Tensor) -> torch.Tensor:
    b, h, t, d = attn.shape
    return attn.transpose(1, 2).reshape(b * t, h * d)


def measure(m: int, r: int = 8) -> dict:
    attn = [torch.randn(1, 16, m, 128, device="cuda").bfloat16() for _ in range(r)]
    w_bf16 = [(torch.randn(2048, 2048, device="cuda") * 0.02).bfloat16() for _ in range(r)]
    w_q = [torch.randint(-128, 128, (2048, 2048), device="cuda", dtype=torch.int8) for _ in range(r)]
    w_s = [torch.rand(2048, device="cuda") * 1e-3 + 1e-4 for _ in range(r)]
    row = {
        "M": m,
        "torch_transpose_copy_us": time_graph(lambda i: rows(attn[i]), r),
        "torch_copy_then_quant_us": time_graph(lambda i: quantize_rows(rows(attn[i])), r),
        "heads_to_rows_bf16_us": time_graph(lambda i: heads_to_rows(attn[i], quant=False), r),
        "heads_to_rows_int8_us": time_graph(lambda i: heads_to_rows(attn[i], quant=True), r),
        "o_proj_bf16_us": time_graph(lambda i: F.linear(heads_to_rows(attn[i], quant=False), w_bf16[i]), r),
        "o_proj_w8a8_us": time_graph(
            lambda i: w8a8_gemm_prequant(*heads_to_rows(attn[i], quant=True), w_q[i], w_s[i]), r),
    }
    row["o_proj_x"] = row["o_proj_bf16_us"] / row["o_proj_w8a8_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--tokens", default="512,2048,4096,8192")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_o_proj_input needs a CUDA GPU")
    out = []
    for m in (int(v) for v in args.tokens.split(",")):
        out.append(measure(m))
        print(out[-1], flush=True)
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": out}, f, indent=1)


if __name__ == "__main__":
    main()
