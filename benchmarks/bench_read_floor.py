"""Floor for the small-N decode GEMMs (H100): how fast can a kernel that does nothing but stream a
weight matrix run, in the same rotating-set CUDA-graph harness as bench_w8a8_linear.py?

For qkv (fused) and o_proj at int8 and bf16 sizes: the best time over a few grid shapes for a
kernel that reads the bytes and writes one int32 per program, launched normally and as a chain
of programmatic-dependent launches (each launch overlaps the previous kernel, as in the decode
loop). The read kernel waits before its first load, so a kernel that starts streaming its weights
before the PDL wait (the decode GEMV) can come in under the PDL floor; the plain floor holds for any
kernel launched on its own.

  PYTHONPATH=src python benchmarks/bench_read_floor.py --out $OUT/floors.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time

import torch
import triton
import triton.language as tl
from bench_timing import L2_BYTES_TARGET, time_graph
from bench_w8a8_linear import SHAPES

from vlmq.runtime.kernels.tiles import pdl_enter, pdl_launch


@triton.jit
def _read_kernel(w_ptr, out_ptr, per_prog, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_enter(USE_PDL)
    base = tl.program_id(0).to(tl.int64) * per_prog
    acc = tl.zeros([BLOCK], tl.int32)
    for off in range(0, per_prog, BLOCK):
        acc += tl.load(w_ptr + base + off + tl.arange(0, BLOCK))
    tl.store(out_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def read_floor(nbytes: int, rep: int) -> dict[str, float]:
    """Fastest time, over a few grid shapes, for a kernel that only streams ``nbytes`` of weights
    (the part of a decode GEMM that no kernel can skip), in the same rotating-set graph harness,
    launched normally and as a PDL chain."""
    words = nbytes // 4
    r = int(min(256, max(2, math.ceil(L2_BYTES_TARGET / nbytes))))
    sets = [torch.randint(-(2**31), 2**31 - 1, (words,), device="cuda", dtype=torch.int32) for _ in range(r)]
    best: dict[str, float] = {}
    for pdl, progs, block in itertools.product((False, True), (128, 256, 512, 1024), (512, 1024, 2048)):
        if words % (progs * block):
            continue
        out = torch.empty(progs, dtype=torch.int32, device="cuda")

        def call(i: int, progs: int = progs, block: int = block, pdl: bool = pdl, out: torch.Tensor = out) -> None:
            _read_kernel[(progs,)](sets[i], out, words // progs, BLOCK=block, USE_PDL=pdl, **pdl_launch(pdl))

        key = "read_pdl_us" if pdl else "read_us"
        best[key] = min(best.get(key, float("inf")), time_graph(call, r, rep))
    return best


def run_floors(rep: int) -> list[dict]:
    """Pure weight-read time for the decode GEMMs' int8 and bf16 weight sizes (qkv, o_proj)."""
    rows = []
    for name, (n, k, _) in {"qkv_fused": SHAPES["qkv_fused"], "o_proj": SHAPES["o_proj"]}.items():
        for dtype_bytes in (1, 2):
            row = {"shape": name, "bytes": n * k * dtype_bytes, **read_floor(n * k * dtype_bytes, rep)}
            print(row, flush=True)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON output path")
    ap.add_argument("--rep", type=int, default=40, help="do_bench rep (ms) per timing")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_read_floor needs a CUDA GPU")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    rows = run_floors(args.rep)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
