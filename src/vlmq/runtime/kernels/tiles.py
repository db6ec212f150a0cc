"""Tile configurations for the W8A8 GEMM kernels, chosen per (M bucket, N, K) from the H100 sweeps
(`benchmarks/sweep_w8a8_tiles.py`, run as `bench_w8a8_linear.py --sweep`; docs/KERNEL_NOTES.md), and
the launch environment (Triton interpreter, programmatic dependent launch)."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

H100_SMS = 132  # the sweeps' card; pick_config's round counting assumes it
GEMV_MAX_M = 4  # w8a8_gemv.py's row limit; from M = 8 the tensor-core kernel won every LM shape on the H100

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
    tail_m: int = 0  # persistent: rows after the last full round of big tiles use tail_m x tail_n tiles
    tail_n: int = 0
    gemv: bool = False  # int8 A, M <= 4: CUDA-core GEMV (w8a8_gemv.py), block_n columns per program
    swap_ab: bool = False  # block_n weight rows as the MMA's M side, the tokens as its N side (pointer and TMA)
    tma: bool = False  # int8 A, M <= 64, sm90: weights by TMA before the PDL wait (w8a8_tma_decode.py)


TMA_BLOCK_K = 128  # w8a8_tma_decode's K step: one 128-byte-swizzled TMA row of int8
TMA_MIN_M = 2  # at one token the dp4a GEMV: decode at batch 1 ran 488 tok/s with the TMA kernel there, 492 without
TMA_MAX_M = 64
SM90_SMEM = 232448  # opt-in shared memory per block on every sm90 card (227 KB)
TMA_TRITON = ((3, 6), (3, 8))  # the Triton releases w8a8_tma_decode's Gluon code was checked with


def tma_token_block(m: int, tokens_m: bool = False) -> int:
    """Token rows the TMA kernel copies per K step: a wgmma N size when the tokens are its N side,
    its 64-row M side otherwise."""
    return 64 if tokens_m else max(8, next_pow2(m))


def tma_k_ok(k: int, split_k: int) -> bool:
    """K splits into a power-of-two number of 128-wide steps per program (Gluon's shared-memory
    shapes are powers of two)."""
    steps = k // (split_k * TMA_BLOCK_K) if k % (split_k * TMA_BLOCK_K) == 0 else 0
    return steps > 0 and steps & (steps - 1) == 0


def tma_smem_bytes(m: int, k: int, rows: int, split_k: int, tokens_m: bool) -> int:
    """Shared memory of w8a8_tma_decode for these operands: every K step of the program's slice
    at once (weights and tokens), plus barriers and the epilogue's layout conversion."""
    k_slice = k // split_k
    bt = tma_token_block(m, tokens_m)
    return k_slice * (rows + bt) + 64 * max(rows, bt) * 4 + 64


def tma_config(m: int, n: int, k: int, pdl: bool) -> KernelConfig | None:
    """The TMA decode kernel's tile for qkv/o_proj-sized GEMMs at M = 2-64 (sweep_tma3.json: 1.63-1.90x
    cuBLAS bf16), or None: 64 weight rows as the wgmma's M side up to 32 tokens, 64 token rows as the
    M side and 32 weight rows per program above. gate/up and down_proj stayed faster on the other kernels."""
    if not (TMA_MIN_M <= m <= TMA_MAX_M and k < 8192 and n < 8192 and tma_k_ok(k, 1)):
        return None
    swap = m <= 32
    rows = 64 if swap else 32
    if tma_smem_bytes(m, k, rows, 1, not swap) > SM90_SMEM:
        return None
    return KernelConfig(tma_token_block(m, not swap), rows, TMA_BLOCK_K, 1, 8, 4, 1, False, pdl, tma=True,
                        swap_ab=swap)  # fmt: skip


def tma_addressable(*tensors: torch.Tensor) -> bool:
    """2-D tensors a TMA descriptor can address: contiguous last dim, 16-byte aligned base and row stride."""
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in tensors)


def tma_decode_usable(a: torch.Tensor, w: torch.Tensor, cfg: KernelConfig) -> bool:
    """Whether the TMA kernel can run ``cfg`` on these operands: sm90, 16-byte aligned bases and row
    strides, M <= 64, K a power-of-two number of 128-wide steps per split, 64 weight rows per program
    when they are the MMA's M side, and its shared memory (all K steps at once) fitting."""
    m, k = a.shape
    if interpreting() or not a.is_cuda or m > TMA_MAX_M or not tma_k_ok(k, cfg.split_k) or not tma_supported():
        return False
    if not tma_addressable(a, w):
        return False
    if cfg.block_n not in (16, 32, 64) or (cfg.swap_ab and cfg.block_n != 64):
        return False
    return tma_smem_bytes(m, k, cfg.block_n, cfg.split_k, not cfg.swap_ab) <= max_shared_memory(device_index(a.device))


def next_pow2(v: int) -> int:
    return 1 << max(v - 1, 0).bit_length()


def pick_config(m: int, n: int, k: int, static: bool = False) -> KernelConfig:
    """Config per (M bucket, N, K) on the current device, from the H100 sweeps
    (benchmarks/sweep_w8a8_tiles.py, docs/KERNEL_NOTES.md): on sm90 the Gluon TMA kernel for
    qkv/o_proj at M = 2-64, the dp4a GEMV at M = 1-4, the pointer kernel with decode tiles up to
    M = 64, the persistent TMA kernel for prefill. Prologue-fused quantization lost everywhere (the
    in-loop bf16 -> int8 conversion costs more than the separate row kernel), so it stays opt-in."""
    return _pick_config(m, n, k, static, pdl_supported(), tma_supported())


@functools.lru_cache(maxsize=4096)
def _pick_config(m: int, n: int, k: int, static: bool, pdl: bool, tma: bool) -> KernelConfig:
    if not static and tma:
        tma_tile = tma_config(m, n, k, pdl)
        if tma_tile is not None:
            return tma_tile
    gemv = _gemv_tile(m, n, k) if not static else None  # the GEMV takes per-token scales only
    if gemv is not None:
        return KernelConfig(16, gemv[0], gemv[1], 1, 8, gemv[2], 1, False, pdl, gemv=True)
    if m <= 64:
        bm = max(16, next_pow2(m))
        # from M = 5 (past the GEMV) gate/up and down_proj at M <= 16 swap AB: 64 weight rows on the
        # MMA's M side, the tokens on its N side (sweep_swap_ab.json: 1.7-4.1% faster; qkv/o_proj within 1%)
        swap = m > GEMV_MAX_M
        if k >= 8192:  # down_proj: few N tiles, long K -> split-K keeps all SMs streaming
            if swap and m <= 16:
                return KernelConfig(16, 64, 512, 4 if m <= 8 else 2, 8, 4, 4, False, pdl, swap_ab=True)
            if m <= 16:
                return KernelConfig(16, 32, 256, 4, 8, 4, 5, False, pdl)
            return KernelConfig(bm, 16, 512, 1, 8, 4, 4, False, pdl)
        if n >= 8192:  # gate/up: wide N tiles
            if swap:
                return KernelConfig(bm, 64, 256 if bm == 16 else 128, 1, 8, 4, 5, False, pdl, swap_ab=True)
            bn = 128 if n <= 12288 or m == 1 else 64
            stages = 5 if bn == 64 else (3 if bm == 64 else 4)
            return KernelConfig(bm, bn, 256, 1, 8, 4, stages, False, pdl)
        bn = 16 if (n <= 1024 or bm > 16) and n <= 2048 else 32
        return KernelConfig(bm, bn, 256, 1, 8, 4, 5, False, pdl)  # 256-deep K steps: PDL-chain sweep
    if m < 2048 and n < 8192:  # mid M (qkv/o/down; sweep_mid_m.json): 64-row tiles, split-K never won
        if k >= 8192 and m <= 512:
            return KernelConfig(64, 128, 256, 1, 4, 4, 3, False, pdl)
        return KernelConfig(64, 128, 128, 1, 4, 4, 4, False, pdl)
    if m < 512:  # gate/up below two rounds of 128x256 tiles
        return KernelConfig(128, 64, 128, 1, 8, 4, 4, False, pdl)
    if n <= 512:
        return KernelConfig(128, 128, 128, 1, 8, 4, 4, False, pdl)
    # prefill (H100 sweeps, 132 SMs): the persistent TMA kernel with 128x256 tiles, where a short last
    # round (qkv at M = 2048/4096) is done in smaller tail tiles; the pointer kernel's 128x128 tiles
    # only where all 128x256 tiles fit in one round and K is short (o_proj at M = 2048)
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 256)
    rounds = tiles / H100_SMS
    tail = (64, 128) if rounds < 2 else (128, 128)
    # PDL saved 0.6-1.2 us per call for qkv/o_proj; the persistent gate/up at 2048-8192 and down_proj at
    # 8192 were 2-2.5% slower with it (bench_3b_prefill_pdl.json; down_proj 2048 2% faster, 4096 even)
    pdl = pdl and n < 8192 and k < 8192
    if 1 < rounds < 4 and rounds % 1 <= 0.5:
        return KernelConfig(128, 256, 128, 1, 4, 8, 4, False, pdl, persistent=True, tail_m=tail[0], tail_n=tail[1])
    if k >= 4096 or rounds >= 1.5:
        return KernelConfig(128, 256, 128, 1, 8, 8, 4, False, pdl, persistent=True)
    return KernelConfig(128, 128, 64, 1, 4, 4, 5, False, pdl)


def _gemv_tile(m: int, n: int, k: int) -> tuple[int, int, int] | None:
    """(columns per program, K chunk, warps) where the dp4a GEMV beat the tensor-core kernel in the
    H100 sweep (`sweep_dp4a*.json`): M <= 2 for every LM shape, M <= 4 except gate/up; else None."""
    if m > GEMV_MAX_M or (m > 2 and n >= 8192) or k % 4:  # dp4a reads K as int32 words
        return None
    if k >= 8192:  # down_proj. At one token 4096-byte chunks: twice the weights in flight before the PDL wait,
        # while the SiLU·mul producer runs (3B decode loop on the H100: +2.1 % over the isolated sweep's 2048)
        return (2, 4096 if m == 1 else 2048, 4) if m <= 2 else (4, 2048, 4)
    if n >= 8192:  # gate/up
        return (2, 4096, 1)
    return (4, 2048, 4) if m <= 2 else (4, 1024, 2)


def gluon_version_checked(version: str = triton.__version__) -> bool:
    """Triton 3.6 (run and timed on the H100) to 3.8 (compiled for sm90 in CPU CI)."""
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    return TMA_TRITON[0] <= major_minor <= TMA_TRITON[1]


def tma_supported() -> bool:
    """The Gluon TMA decode kernel on the current device: sm90 (wgmma exists only there) and a Triton
    whose Gluon it was checked with (experimental, its API moves between releases; elsewhere the
    pointer kernel runs)."""
    return pdl_supported() and device_capability()[0] == 9 and _gluon_hopper_importable()


@functools.lru_cache(maxsize=1)
def _gluon_hopper_importable() -> bool:
    if not gluon_version_checked():
        return False
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError:
        return False
    return True


# griddepcontrol and the launch_pdl option came with Triton 3.4 (torch 2.6/2.7 ship 3.2/3.3)
TRITON_HAS_PDL = hasattr(tl.extra.cuda, "gdc_wait")


def pdl_supported() -> bool:
    """Programmatic dependent launch on the current device: Hopper or newer, real hardware, and a
    Triton that has it."""
    if interpreting() or not TRITON_HAS_PDL or not torch.cuda.is_available():
        return False
    return device_capability() >= (9, 0)


def device_capability() -> tuple[int, int]:
    """(major, minor) of the current CUDA device (where Triton launches); per device, so a process
    driving an H100 and an RTX 3090 asks each for its own."""
    return capability_of(torch.device("cuda"))


def capability_of(device: torch.device) -> tuple[int, int]:
    """(major, minor) of this CUDA device (``cuda`` alone: the current one)."""
    return _capability(device_index(device))


def device_index(device: torch.device) -> int:
    """This CUDA device's index (``cuda`` alone: the current device's)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def pdl_launch(enabled: bool) -> dict[str, bool]:
    """Launch options for a kernel that starts with ``pdl_enter`` (or its own ``gdc_wait``)."""
    return {"launch_pdl": True} if enabled else {}


def pdl_kwargs() -> dict[str, bool]:
    """``USE_PDL`` and the launch option that goes with it, for a kernel that starts with ``pdl_enter``:
    on wherever the GPU has programmatic dependent launch."""
    on = pdl_supported()
    return {"USE_PDL": on, **pdl_launch(on)}


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Programmatic dependent launch: this kernel was launched while its predecessor still ran.
    Let the next kernel launch now, then wait until the predecessor has finished and its writes are
    visible; nothing may touch activations (read or write) before this returns. Every kernel in a
    PDL chain waits, so a wait also covers everything that ran before the predecessor."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# shared memory kept free for the epilogue's layout conversion (and, for bf16/fp32 A, the in-register
# int8 conversion): the H100 sweeps compiled everything up to these budgets (227 KB per block there)
SMEM_RESERVE_INT8_A = 27 * 1024
SMEM_RESERVE_WIDE_A = 67 * 1024


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of this CUDA device (``cuda`` alone: the current one)."""
    return _sm_count(device_index(device))


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=8)
def max_shared_memory(index: int) -> int:
    """Opt-in shared memory per block on this CUDA device (what Triton checks a kernel against)."""
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


def fit_to_smem(cfg: KernelConfig, a_bytes: int, smem_bytes: int) -> KernelConfig:
    """Pipeline stages for this device's shared memory; where fewer than two stages would fit
    (e.g. H100 tiles on a 99 KB RTX 3090), halve BLOCK_K, then BLOCK_N, then BLOCK_M until two do."""
    if cfg.gemv:  # registers only
        return cfg
    budget = smem_bytes - (SMEM_RESERVE_INT8_A if a_bytes == 1 else SMEM_RESERVE_WIDE_A)
    while True:
        per_stage = cfg.block_k * (cfg.block_m * a_bytes + cfg.block_n)
        stages = min(cfg.num_stages, budget // per_stage)
        if stages >= 2 or at_smallest_tile(cfg):
            return dataclasses.replace(cfg, num_stages=max(1, stages))
        if cfg.block_k > 64:
            cfg = dataclasses.replace(cfg, block_k=cfg.block_k // 2)
        elif cfg.block_n > 32:
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
        else:
            cfg = dataclasses.replace(cfg, block_m=cfg.block_m // 2)


def at_smallest_tile(cfg: KernelConfig) -> bool:
    return cfg.block_k <= 64 and cfg.block_n <= 32 and cfg.block_m <= 16
