"""Persistent int8 GEMM for prefill shapes (Hopper TMA), activations already quantized.

One program per SM walks the output tiles in grouped order; A and W tiles arrive through TMA
descriptors (the copy engine fills shared memory, no address math in the main loop), and the
flattened tile loop lets the compiler overlap one tile's epilogue with the next tile's loads.
Where the big tiles would leave a short last round, the rows after the last full round are done
in smaller tail tiles (a plain, unflattened loop: at most a round or two of them).
The epilogue is the same per-token x per-channel dequantization (+ bias) as the pointer kernel
in ``triton_w8a8``, so both give identical results for the same int32 accumulators.

Only for int8 A with per-row scales (``A_INT8_ROWSCALE``) or the raw int32 output; prologue-fused
quantization stays on the pointer kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmq.runtime.kernels.tiles import (
    SMEM_RESERVE_INT8_A,
    device_index,
    max_shared_memory,
    pdl_enter,
    pdl_launch,
    sm_count,
    tma_addressable,
)


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    num_in_group = GROUP_M * num_pid_n
    first_m = (tile // num_in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % num_in_group) % group_m, (tile % num_in_group) // group_m


@triton.jit
def _tile(a_desc, w_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, off_m, off_n, M, N, k_tiles, stride_om,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
          OUT_INT32: tl.constexpr):  # fmt: skip
    """One output tile at (off_m, off_n): int32 main loop over K, then the dequant epilogue."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for ki in range(k_tiles):
        a = a_desc.load([off_m, ki * BLOCK_K])  # out-of-range rows/cols read as 0
        w = w_desc.load([off_n, ki * BLOCK_K])
        acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        y = acc.to(tl.float32) * tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
        y = y * tl.load(w_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _w8a8_persistent_kernel(
    a_desc, w_desc, a_tail_desc, w_tail_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_MAIN, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TAIL_M: tl.constexpr, TAIL_N: tl.constexpr,
    NUM_PROGS: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(USE_PDL)  # one program per SM: a successor's programs can only start as these exit
    pid = tl.program_id(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # rows [0, M_MAIN): big tiles, every program the same number of full rounds (plus the remainder)
    num_pid_m = tl.cdiv(M_MAIN, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    main_tiles = num_pid_m * num_pid_n
    for tile in tl.range(pid, main_tiles, NUM_PROGS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        _tile(a_desc, w_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N,
              M, N, k_tiles, stride_om, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, OUT_INT32)  # fmt: skip
    # rows [M_MAIN, M): the rest in smaller tiles, which would otherwise be a last round of big tiles
    # leaving most SMs idle; programs idle at the end of the main part take the first ones
    if TAIL_M > 0:
        tail_m = tl.cdiv(M - M_MAIN, TAIL_M)
        tail_n = tl.cdiv(N, TAIL_N)
        first = (pid + NUM_PROGS - main_tiles % NUM_PROGS) % NUM_PROGS
        for tile in tl.range(first, tail_m * tail_n, NUM_PROGS):
            pid_m, pid_n = _tile_coords(tile, tail_m, tail_n, GROUP_M)
            _tile(a_tail_desc, w_tail_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, M_MAIN + pid_m * TAIL_M,
                  pid_n * TAIL_N, M, N, k_tiles, stride_om, TAIL_M, TAIL_N, BLOCK_K, HAS_BIAS, OUT_INT32)  # fmt: skip


def num_programs(device: torch.device) -> int:
    """One program per SM on CUDA; a few on the CPU (Triton interpreter, tests)."""
    if device.type != "cuda":
        return 3
    return sm_count(device)


def smem_bytes(device: torch.device) -> int:
    """Opt-in shared memory per block (the interpreter has no limit: plan as for an H100)."""
    if device.type != "cuda":
        return 232448
    return max_shared_memory(device_index(device))


def supported(a: Tensor, w: Tensor) -> bool:
    """TMA needs Hopper+, a Triton with host-side tensor descriptors (3.4+), 16-byte aligned bases and
    row strides, and a contiguous last dim."""
    if not (a.is_cuda and torch.cuda.get_device_capability(a.device) >= (9, 0) and _has_tensor_descriptors()):
        return False
    return tma_addressable(a, w)


@functools.lru_cache(maxsize=1)
def _has_tensor_descriptors() -> bool:
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return True


def main_rows(m: int, n: int, block_m: int, block_n: int, progs: int) -> int:
    """Rows covered by whole rounds of big tiles; the rows after them go to the small-tile tail
    (all of ``m`` when the big tiles fill their last round or fit in one)."""
    per_row_block = triton.cdiv(n, block_n)
    tiles = triton.cdiv(m, block_m) * per_row_block
    if tiles <= progs or tiles % progs == 0:
        return m
    return min(m, (tiles // progs * progs) // per_row_block * block_m)


def stages_that_fit(
    num_stages: int, block_m: int, block_n: int, block_k: int, out_bytes: int, capability: tuple[int, int],
    smem: int,
) -> int:  # fmt: skip
    """Pipeline stages once the epilogue's output tile has its shared memory. An fp32/int32 tile always
    goes through shared memory; so does the bf16 tile on Blackwell (compiled for sm100, 128x256x128 at
    4 stages needed 262,192 B of 232,448: 4 x 48 KB of operands + the 64 KB tile + 48 B). On Hopper
    the bf16 epilogue fits ``fit_to_smem``'s reserve."""
    tile = block_m * block_n * out_bytes
    if out_bytes == 4:
        budget = smem - SMEM_RESERVE_INT8_A - tile
    elif capability[0] >= 10:
        budget = smem - tile - 1024
    else:
        return num_stages
    return max(1, min(num_stages, budget // (block_k * (block_m + block_n))))


def launch_persistent(
    a: Tensor, w: Tensor, out: Tensor, a_scale: Tensor, w_scale: Tensor, bias: Tensor | None,
    out_int32: bool, block_m: int, block_n: int, block_k: int, group_m: int, num_warps: int, num_stages: int,
    tail: tuple[int, int] | None = None, pdl: bool = False,
) -> None:  # fmt: skip
    """``tail=(TAIL_M, TAIL_N)``: the rows after the last full round of big tiles use that tile;
    ``pdl``: launched while the producer of ``a`` still runs (programmatic dependent launch)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    m, k = a.shape
    n = w.shape[0]
    progs = min(triton.cdiv(m, block_m) * triton.cdiv(n, block_n), num_programs(a.device))
    m_main = main_rows(m, n, block_m, block_n, progs) if tail else m
    # a tail tile never larger than the main one (fit_to_smem may have shrunk the main tile)
    tail_m, tail_n = (min(tail[0], block_m), min(tail[1], block_n)) if tail and m_main < m else (0, 0)
    capability = torch.cuda.get_device_capability(a.device) if a.is_cuda else (9, 0)
    num_stages = stages_that_fit(num_stages, block_m, block_n, block_k, out.element_size(), capability,
                                 smem_bytes(a.device))  # fmt: skip
    a_desc = TensorDescriptor.from_tensor(a, [block_m, block_k])
    w_desc = TensorDescriptor.from_tensor(w, [block_n, block_k])
    if tail_m:
        tails = (TensorDescriptor.from_tensor(a, [tail_m, block_k]), TensorDescriptor.from_tensor(w, [tail_n, block_k]))
    else:
        tails = (a_desc, w_desc)
    _w8a8_persistent_kernel[(progs,)](
        a_desc, w_desc, *tails, out, a_scale, w_scale, bias if bias is not None else w_scale,
        m, n, k, m_main, out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, TAIL_M=tail_m, TAIL_N=tail_n,
        NUM_PROGS=progs, HAS_BIAS=bias is not None, OUT_INT32=out_int32, USE_PDL=pdl, num_warps=num_warps,
        num_stages=num_stages, **pdl_launch(pdl),
    )  # fmt: skip
