"""int8 GEMM for decode on Hopper that streams its weights before the PDL wait (Gluon).

In the decode loop every linear is launched with programmatic dependent launch: it starts while
its producer (norm, SiLU, attention combine) still runs and waits (``griddepcontrol.wait``)
before it touches the activations. The pointer kernel in ``triton_w8a8`` can only start its
loads after that wait, because Triton's pipeliner issues A and W together. Here every program
issues one TMA copy for its whole weight slice into shared memory *first* (weights are static),
then waits, then copies the few token rows. As soon as its weights have landed it lets the next
kernel launch, so the next weight stream overlaps this kernel's MMA and epilogue.

Each program owns a block of weight rows and one K slice; all K steps of the slice sit in shared
memory at once (no ring buffer, each barrier used once), brought by a single 3-D TMA box per
operand. Either the 64 weight rows are the wgmma's M side and the tokens (<= 64) its narrow N
side ("swap AB": ``acc[rows, tokens] = W_tile @ x_tile^T``), or 64 token rows (those past M
arrive from TMA as zeros) are the M side and 16-64 weight rows the N side. With a K split the
int32 partial tiles are added into a workspace and the last program of a row block (an atomic
counter) runs the epilogue and zeroes the workspace: exact and deterministic, like the pointer
kernel's split-K. The epilogue is the same per-token x per-channel dequant (+ bias) in the same
fp32 order as the other kernels, so the outputs are bit-identical.

Gluon is Triton's explicit-layout dialect; this module is only imported on sm90+ CUDA.
"""

from __future__ import annotations

import functools

import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from vlmq.runtime.kernels import tiles

BLOCK_K = tiles.TMA_BLOCK_K
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # renamed after Triton 3.6


@gluon.jit
def _gdc_wait():
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _gdc_launch_dependents():
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)  # fmt: skip


@gluon.jit
def _tma_decode_kernel(
    w_desc, a_desc, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, ws_ptr, lock_ptr,
    M, N, stride_om,
    K_STEPS: gl.constexpr, SPLIT_K: gl.constexpr, TOKENS_M: gl.constexpr,
    HAS_BIAS: gl.constexpr,
    OUT_INT32: gl.constexpr, USE_PDL: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    BN: gl.constexpr = w_desc.block_type.shape[1]  # weight rows per program
    BK: gl.constexpr = w_desc.block_type.shape[2]
    BT: gl.constexpr = a_desc.block_type.shape[1]  # token rows per K step (64 when they are the M side)
    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * BN
    k0 = pid_k * K_STEPS

    # K_STEPS stacked [rows, 128] tiles; the copies see them as one [K_STEPS, rows, 128] box
    tile: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    w_smem = gl.allocate_shared_memory(gl.int8, [K_STEPS * BN, BK], tile)
    a_smem = gl.allocate_shared_memory(gl.int8, [K_STEPS * BT, BK], tile)
    w_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    a_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(w_bar, count=1)
    mbarrier.init(a_bar, count=1)
    # the weight slice does not depend on the previous kernel: stream it in before the wait
    mbarrier.expect(w_bar, w_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(w_desc, [k0, n0, 0], w_bar,
                                    w_smem._reinterpret(gl.int8, [K_STEPS, BN, BK], w_desc.layout))

    epi: gl.constexpr = gl.BlockedLayout([2, 1], [32, 1], [1, num_warps], [0, 1])
    rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, epi))
    toks = gl.arange(0, BT, layout=gl.SliceLayout(0, epi))
    row_ok = rows < N
    w_scale = gl.load(w_scale_ptr + rows, mask=row_ok, other=0.0)
    bias = gl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(gl.float32) if HAS_BIAS else w_scale
    if USE_PDL:
        _gdc_wait()

    mbarrier.expect(a_bar, a_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [k0, 0, 0], a_bar,  # token rows past M arrive as zeros
                                    a_smem._reinterpret(gl.int8, [K_STEPS, BT, BK], a_desc.layout))
    if TOKENS_M:
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BN, 32])  # fmt: skip
        acc = gl.zeros([BT, BN], gl.int32, layout=mma)
    else:
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BT, 32])  # fmt: skip
        acc = gl.zeros([BN, BT], gl.int32, layout=mma)
    mbarrier.wait(w_bar, 0)
    if USE_PDL:  # our weights are in: the next kernel may launch and start streaming its own
        _gdc_launch_dependents()
    mbarrier.wait(a_bar, 0)
    for s in gl.static_range(K_STEPS):
        w_s = w_smem.slice(s * BN, BN)
        a_s = a_smem.slice(s * BT, BT)
        if TOKENS_M:
            acc = warpgroup_mma(a_s, w_s.permute((1, 0)), acc, is_async=True)
        else:
            acc = warpgroup_mma(w_s, a_s.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.invalidate(w_bar)
    mbarrier.invalidate(a_bar)

    if TOKENS_M:
        acc = gl.convert_layout(gl.permute(acc, (1, 0)), epi)
    else:
        acc = gl.convert_layout(acc, epi)
    mask = row_ok[:, None] & (toks < M)[None, :]
    if SPLIT_K > 1:
        ws_ptrs = ws_ptr + toks[None, :] * N + rows[:, None]
        gl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        _cta_barrier()
        arrived = gl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = gl.atomic_xchg(ws_ptrs, gl.zeros_like(acc), mask=mask, sem="relaxed")
            gl.atomic_xchg(lock_ptr + pid_n, 0)
            _epilogue(acc, rows, toks, mask, out_ptr, a_scale_ptr, w_scale, bias, stride_om, M, HAS_BIAS, OUT_INT32)
    else:
        _epilogue(acc, rows, toks, mask, out_ptr, a_scale_ptr, w_scale, bias, stride_om, M, HAS_BIAS, OUT_INT32)


@gluon.jit
def _epilogue(acc, rows, toks, mask, out_ptr, a_scale_ptr, w_scale, bias, stride_om, M,
              HAS_BIAS: gl.constexpr, OUT_INT32: gl.constexpr):  # fmt: skip
    """out[token, row] for the [rows, tokens] tile; same fp32 order as the other W8A8 kernels."""
    out_ptrs = out_ptr + toks.to(gl.int64)[None, :] * stride_om + rows[:, None]
    if OUT_INT32:
        gl.store(out_ptrs, acc, mask=mask)
    else:
        a_scale = gl.load(a_scale_ptr + toks, mask=toks < M, other=0.0)
        y = acc.to(gl.float32) * a_scale[None, :]
        y = y * w_scale[:, None]
        if HAS_BIAS:
            y = y + bias[:, None]
        gl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=32)
def _layout(rows: int, steps: int) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([steps, rows, BLOCK_K], gl.int8)


def _steps_view(t: Tensor, rows: int, steps: int) -> TensorDescriptor:
    """[R, K] int8 seen as [K / 128, R, 128]: one TMA copy brings ``steps`` K-steps of ``rows`` rows,
    landing as ``steps`` stacked [rows, 128] tiles (each a 128-byte-swizzled wgmma operand)."""
    r, k = t.shape
    return TensorDescriptor(t, [k // BLOCK_K, r, BLOCK_K], [BLOCK_K, t.stride(0), 1], [steps, rows, BLOCK_K],
                            _layout(rows, steps))  # fmt: skip


def launch_tma_decode(
    a: Tensor, w: Tensor, out: Tensor, a_scale: Tensor, w_scale: Tensor, bias: Tensor | None,
    out_int32: bool, rows: int, split_k: int, tokens_m: bool, ws: Tensor, locks: Tensor, pdl: bool,
) -> None:  # fmt: skip
    """``a`` int8 [M, K] (M <= 64) with per-row scales, ``w`` int8 [N, K]; ``rows`` weight rows per
    program (64 unless ``tokens_m``: then the tokens are the MMA's M side and rows may be 16-64);
    ``ws``/``locks`` zeroed int32 [M * N] / [cdiv(N, rows)] when ``split_k > 1`` (left zeroed)."""
    m, k = a.shape
    n = w.shape[0]
    steps = k // (split_k * BLOCK_K)
    bt = tiles.tma_token_block(m, tokens_m)
    _tma_decode_kernel[(triton.cdiv(n, rows), split_k)](
        _steps_view(w, rows, steps), _steps_view(a, bt, steps), out, a_scale, w_scale,
        bias if bias is not None else w_scale, ws, locks, m, n, out.stride(0),
        K_STEPS=steps, SPLIT_K=split_k, TOKENS_M=tokens_m,
        HAS_BIAS=bias is not None, OUT_INT32=out_int32, USE_PDL=pdl, num_warps=4, **tiles.pdl_launch(pdl),
    )  # fmt: skip
