"""Tile configurations for the W8A8 GEMM kernels, chosen per (M bucket, N, K) from the H100 sweeps
(`benchmarks/bench_w8a8_linear.py --sweep`, docs/KERNEL_NOTES.md), and the launch environment
(Triton interpreter, programmatic dependent launch)."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4
    fused: bool = True  # quantize activations in the GEMM prologue (else a separate row kernel)
    pdl: bool = False  # unfused only: launch the GEMM early with programmatic dependent launch
    persistent: bool = False  # int8 A only: one program per SM, TMA loads (w8a8_persistent.py)


def next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


@functools.lru_cache(maxsize=4096)
def pick_config(m: int, n: int, k: int, static: bool = False) -> KernelConfig:
    """Config per (M bucket, N, K), from the H100 sweep in benchmarks/bench_w8a8_linear.py
    (docs/KERNEL_NOTES.md). Prologue-fused quantization lost everywhere there (the in-loop
    bf16 -> int8 conversion costs more than the separate row kernel), so it stays opt-in."""
    del static  # same tiles for static and dynamic activation scales
    pdl = pdl_supported()
    if m <= 64:
        bm = max(16, next_pow2(m))
        if k >= 8192:  # down_proj: few N tiles, long K -> split-K keeps all SMs streaming
            if m <= 16:
                return KernelConfig(16, 32, 256, 4, 8, 4, 5, False, pdl)
            return KernelConfig(bm, 16, 512, 1, 8, 4, 4, False, pdl)
        if n >= 8192:  # gate/up: wide N tiles
            bn = 128 if n <= 12288 or m == 1 else 64
            stages = 5 if bn == 64 else (3 if bm == 64 else 4)
            return KernelConfig(bm, bn, 256, 1, 8, 4, stages, False, pdl)
        bn = 16 if (n <= 1024 or bm > 16) and n <= 2048 else 32
        bk = 512 if (bm == 16 and n > 1024) or bm == 64 else 256
        return KernelConfig(bm, bn, bk, 1, 8, 4, 5 if bm < 64 else 4, False, pdl)
    if m < 512:
        return KernelConfig(64, 128, 128, 1, 8, 4, 4, False)
    if n <= 512:
        return KernelConfig(128, 128, 128, 1, 8, 4, 4, False)
    # prefill: the persistent TMA kernel wins once there are >= 1.5 rounds of 128x256 tiles per SM,
    # or for a long K (down_proj); else more, smaller tiles balance the SMs better (qkv/o at M=2048)
    if k >= 4096 or triton.cdiv(m, 128) * triton.cdiv(n, 256) >= 198:
        return KernelConfig(128, 256, 128, 1, 8, 8, 4, False, persistent=True)
    return KernelConfig(128, 128, 64, 1, 4, 4, 5, False)


@functools.lru_cache(maxsize=1)
def pdl_supported() -> bool:
    """Programmatic dependent launch needs Hopper or newer (and real hardware)."""
    if interpreting() or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
