"""What o_proj's input costs at prefill (H100). SDPA on GQA-grouped queries returns
[B, Hkv, G*T, D] (token-major in memory); o_proj wants token rows [B*T, H*D]. Times torch's reshape +
transpose copies (what the loop ran before) and the quant pass W8A8 paid after them; `heads_to_rows`
(the loop's pass now: bf16 rows, or int8 rows + per-token scales for W8A8); and the whole o_proj op as
each model runs it: bf16 = `heads_to_rows` + cuBLAS, W8A8 = int8 `heads_to_rows` + int8 GEMM. CUDA
graph over rotating inputs and weights, µs per call.

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
from bench_timing import time_graph

from vlmq.runtime.attention import heads_to_rows
from vlmq.runtime.kernels.triton_w8a8 import quantize_rows, w8a8_gemm_prequant

N_KV, GROUPS = 2, 8  # Qwen2.5-VL-3B: 16 query heads on 2 kv heads


def rows(attn: torch.Tensor) -> torch.Tensor:
    """The loop's old path: SDPA output [B, Hkv, G*T, D] -> [B, H, T, D] -> token rows (torch copies)."""
    b, n_kv, gt, d = attn.shape
    t = gt // GROUPS
    return attn.reshape(b, n_kv * GROUPS, t, d).transpose(1, 2).reshape(b * t, n_kv * GROUPS * d)


def measure(m: int, r: int = 8) -> dict:
    # SDPA's output layout on the GPU: logically [B, Hkv, G*T, D], token-major in memory
    attn = [torch.randn(1, GROUPS * m, N_KV, 128, device="cuda").bfloat16().transpose(1, 2) for _ in range(r)]
    w_bf16 = [(torch.randn(2048, 2048, device="cuda") * 0.02).bfloat16() for _ in range(r)]
    w_q = [torch.randint(-128, 128, (2048, 2048), device="cuda", dtype=torch.int8) for _ in range(r)]
    w_s = [torch.rand(2048, device="cuda") * 1e-3 + 1e-4 for _ in range(r)]
    row = {
        "M": m,
        "torch_transpose_copy_us": time_graph(lambda i: rows(attn[i]), r),
        "torch_copy_then_quant_us": time_graph(lambda i: quantize_rows(rows(attn[i])), r),
        "heads_to_rows_bf16_us": time_graph(lambda i: heads_to_rows(attn[i], quant=False, groups=GROUPS), r),
        "heads_to_rows_int8_us": time_graph(lambda i: heads_to_rows(attn[i], quant=True, groups=GROUPS), r),
        "o_proj_bf16_us": time_graph(
            lambda i: F.linear(heads_to_rows(attn[i], quant=False, groups=GROUPS), w_bf16[i]), r),
        "o_proj_w8a8_us": time_graph(
            lambda i: w8a8_gemm_prequant(*heads_to_rows(attn[i], quant=True, groups=GROUPS), w_q[i], w_s[i]), r),
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
