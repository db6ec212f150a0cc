"""The tile sweep behind pick_config's table: every candidate kernel config per (shape, M),
timed as the lean loop runs it (the GEMM on activations quantized upstream, CUDA graphs over
rotating weight sets). Run through ``bench_w8a8_linear.py --sweep [--only tma]``."""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.nn.functional as F
import triton
from bench_timing import make_sets, n_rot, precompile, time_graph

from vlmq.runtime.kernels import triton_w8a8 as tk
from vlmq.runtime.kernels.tiles import GEMV_MAX_M, SM90_SMEM, TMA_BLOCK_K, tma_k_ok, tma_smem_bytes, tma_token_block
from vlmq.runtime.kernels.triton_w8a8 import KernelConfig, pick_config, quantize_rows


def candidates(m: int, n: int, k: int) -> list[KernelConfig]:
    if m <= 64:  # int8 activations from the producer, PDL chain
        out = []
        tiles_bn = [(16, 256), (16, 512), (16, 1024), (32, 256), (32, 512), (32, 1024), (64, 256), (64, 512),
                    (128, 256)]
        # BLOCK_M = 64 even for M = 1: Hopper's wgmma needs 64 rows per warpgroup, below that Triton
        # falls back to mma.sync (rows past M re-read row M-1 from cache: no extra DRAM traffic)
        for bm, (bn, bk) in itertools.product(sorted({16, 64, max(16, triton.next_power_of_2(m))}), tiles_bn):
            if bk > k:
                continue
            tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
            s0 = 1
            while tiles * s0 < 132 and s0 < 16:
                s0 *= 2
            for split in sorted({1, s0}):
                if k // bk < split:
                    continue
                stages = max(2, min(5, (160 * 1024) // (bk * (bm + bn))))
                out.append(KernelConfig(bm, bn, bk, split, 8, 4, stages, False, True))
        # swap AB: 64/128 weight rows on the MMA's M side (wgmma), the few tokens on its N side
        for bn, bk, split in itertools.product((64, 128), (128, 256, 512), (1, 2, 4, 8)):
            bm = max(16, triton.next_power_of_2(m))
            if m < 4 or k // bk < split or triton.cdiv(n, bn) * split > 4 * 132:
                continue
            stages = max(2, min(5, (160 * 1024) // (bk * (bm + bn))))
            for warps in (4, 8) if bn == 128 else (4,):
                out.append(KernelConfig(bm, bn, bk, split, 8, warps, stages, False, True, swap_ab=True))
        # Hopper TMA kernel: all K steps of a program's weight rows streamed in before the wait;
        # 64 weight rows as the wgmma's M side (swap) or the tokens as its M side and 16-64 rows
        for (rows, swap), split in itertools.product(((64, True), (64, False), (32, False), (16, False)), (1, 2)):
            if tma_k_ok(k, split) and tma_smem_bytes(m, k, rows, split, not swap) <= SM90_SMEM:
                out.append(KernelConfig(tma_token_block(m, not swap), rows, TMA_BLOCK_K, split, 8, 4, 1, False, True,
                                        tma=True, swap_ab=swap))  # fmt: skip
        if m <= GEMV_MAX_M:  # CUDA-core GEMV: whole weight rows per program, in registers
            for bn, bk, warps in itertools.product((1, 2, 4, 8, 16), (512, 1024, 2048, 4096, 8192), (1, 2, 4, 8)):
                if triton.next_power_of_2(m) * bn * bk <= 512 * 32 * warps:  # <= 128 int32 words per thread
                    out.append(KernelConfig(16, bn, bk, 1, 8, warps, 1, False, True, gemv=True))
        return out
    pointer = [(128, 128, 64, 4, 5), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 256, 128, 8, 4),
               (64, 256, 128, 4, 4), (64, 256, 128, 8, 4), (128, 128, 128, 8, 3), (64, 128, 256, 4, 3)]
    persistent = [(128, 256, 128, 8, 4), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4), (128, 128, 64, 4, 5),
                  (128, 128, 128, 8, 4), (128, 256, 64, 8, 5), (64, 256, 128, 4, 4), (64, 256, 128, 8, 4)]  # fmt: skip
    out = [KernelConfig(bm, bn, bk, 1, g, w, st, False) for bm, bn, bk, w, st in pointer for g in (4, 8)]
    for (bm, bn, bk, w, st), g in itertools.product(persistent, (4, 8)):
        out.append(KernelConfig(bm, bn, bk, 1, g, w, st, False, persistent=True))
    for (tm, tn), g in itertools.product(((64, 128), (128, 128), (64, 256)), (4, 8)):  # small-tile tails
        out.append(KernelConfig(128, 256, 128, 1, g, 8, 4, False, persistent=True, tail_m=tm, tail_n=tn))
    if m < 2048:  # mid M: too few output tiles to fill the SMs without splitting K
        for (bm, bn, bk, w, st), split in itertools.product(((64, 128, 128, 4, 4), (128, 128, 128, 8, 3),
                                                             (64, 64, 256, 4, 4)), (2, 4)):  # fmt: skip
            out.append(KernelConfig(bm, bn, bk, split, 8, w, st, False))
    return out + [dataclasses.replace(c, pdl=True) for c in out]  # launched while the producer runs, or after


def sweep_candidates(m: int, n: int, k: int, only: str) -> list[KernelConfig]:
    """All candidates, or (``only="tma"``) pick_config's choice against the TMA kernel's variants."""
    if only == "tma":
        return [pick_config(m, n, k), *(c for c in candidates(m, n, k) if c.tma)]
    return candidates(m, n, k)


def run_sweep(shapes: dict, ms: list[int], jobs: int, rep: int, only: str = "all") -> list[dict]:
    items = [
        (m, n, k, False, c)
        for (n, k, _), m in itertools.product(shapes.values(), ms)
        for c in sweep_candidates(m, n, k, only)
    ]
    precompile(items, jobs)
    return [_sweep_one(name, n, k, m, rep, only) for name, (n, k, _) in shapes.items() for m in ms]


def _sweep_one(name: str, n: int, k: int, m: int, rep: int, only: str = "all") -> dict:
    r = n_rot(m, n, k)
    sets = make_sets(m, n, k, False, r)
    x, wb, wq, ws = sets["x"], sets["w_bf16"], sets["w_q"], sets["w_s"]
    t_bf16 = time_graph(lambda i: F.linear(x[i], wb[i]), r, rep)
    t_quant = time_graph(lambda i: quantize_rows(x[i]), r, rep)
    qs = [quantize_rows(xi) for xi in x]
    res = []
    # rank the GEMM on activations quantized upstream (the fused norm / SiLU / attention kernels),
    # what the lean loop runs; at decode M as a chain of programmatic dependent launches, as there
    for cfg in sweep_candidates(m, n, k, only):
        try:
            t = time_graph(lambda i, c=cfg: _gemm_only(qs[i], wq[i], ws[i], c), r, rep)
        except Exception as e:  # noqa: BLE001 - report and skip a failing config
            print(f"  {name} M={m} {cfg} failed: {e!r}"[:200], flush=True)
            continue
        res.append((t, cfg))
    res.sort(key=lambda tc: tc[0])
    best_t, best_c = res[0]
    t_gemm = time_graph(lambda i: _gemm_only(qs[i], wq[i], ws[i], dataclasses.replace(best_c, pdl=False)), r, rep)
    print(
        f"{name:14s} M={m:5d} bf16 {t_bf16:7.2f} best {best_t:7.2f} x{t_bf16 / best_t:.2f} quant {t_quant:6.2f}"
        f" gemm {t_gemm:7.2f} | {best_c}",
        flush=True,
    )
    for t, c in res[:3]:
        print(f"    {t:7.2f} {c}", flush=True)
    allr = [{"us": t, **dataclasses.asdict(c)} for t, c in res]
    return {
        "shape": name,
        "M": m,
        "N": n,
        "K": k,
        "bf16_us": t_bf16,
        "quant_us": t_quant,
        "gemm_us": t_gemm,
        "all": allr,
    }


def _gemm_only(q_s: tuple, wq: torch.Tensor, ws: torch.Tensor, cfg: KernelConfig) -> torch.Tensor:
    q, s = q_s
    out = torch.empty(q.shape[0], wq.shape[0], dtype=torch.bfloat16, device=q.device)
    tk._launch(q, wq, out, s, ws, None, None, tk.A_INT8_ROWSCALE, False, cfg, pdl=cfg.pdl)
    return out
