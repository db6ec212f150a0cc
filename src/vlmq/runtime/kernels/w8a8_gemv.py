"""int8 GEMV for decode at a handful of tokens (M <= 4), activations already quantized.

At batch 1 a decode linear is a weight stream: 4-45 MB that every token reads once, with almost
no arithmetic. The tensor-core kernel in ``triton_w8a8`` pads M to 16 rows and pipelines
BLOCK_K x BLOCK_N tiles through shared memory; this kernel instead gives each program a few
output columns, loads their whole weight rows (up to BLOCK_K at a time) straight into registers
and reduces on the CUDA cores in int32, four int8 products per ``dp4a`` instruction where K is a
multiple of 4. Many small programs per SM keep many loads in flight.

The first weight chunk does not depend on the previous kernel, so under programmatic dependent
launch it is loaded *before* ``gdc_wait``: the weight stream starts while the producer of the
activations (norm, SiLU, attention combine) is still running.

Exact int32 accumulation and the same dequant epilogue as the tensor-core kernels (per-token x
per-channel scale, then bias), so all three give bit-identical outputs for the same inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmq.runtime.kernels.tiles import GEMV_MAX_M, interpreting, pdl_launch


@triton.jit
def _dp4a(a, b, acc):
    """acc + the dot product of the four signed bytes packed in each int32 of a and b (one
    instruction for four int8 multiply-adds)."""
    return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                     dtype=tl.int32, is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _chunk(a_rows, kk, K, m_ok, w, acc, DP4A: tl.constexpr):
    """acc[M, N, k] += a[m, k] * w[n, k] over one K chunk (``w`` already loaded)."""
    a = tl.load(a_rows + kk[None, :], mask=m_ok[:, None] & (kk < K)[None, :], other=0)
    if DP4A:  # int32 words of four int8 each
        shape: tl.constexpr = acc.shape
        return _dp4a(tl.broadcast_to(a[:, None, :], shape), tl.broadcast_to(w[None, :, :], shape), acc)
    else:
        return acc + a.to(tl.int32)[:, None, :] * w.to(tl.int32)[None, :, :]


@triton.jit
def _w8a8_gemv_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K, stride_am, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DP4A: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr, USE_PDL: tl.constexpr, TRIGGER: tl.constexpr,
):  # fmt: skip
    """With DP4A, a/w point at int32 words (four int8 each) and K, strides and BLOCK_K count words."""
    if TRIGGER == 1:
        tl.extra.cuda.gdc_launch_dependents()
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    w_rows = w_ptr + (rn % N).to(tl.int64)[:, None] * stride_wn  # wrapped: loads need no N mask
    rk = tl.arange(0, BLOCK_K)
    # static operands first: the weight chunk, scale and bias are in flight before we wait
    w = tl.load(w_rows + rk[None, :], mask=(rk < K)[None, :], other=0)
    w_scale = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    acc = _chunk(a_rows, rk, K, m_ok, w, tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.int32), DP4A)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_rows + kk[None, :], mask=(kk < K)[None, :], other=0)
        acc = _chunk(a_rows, kk, K, m_ok, w, acc, DP4A)
    acc = tl.sum(acc, axis=2)
    if TRIGGER == 2:
        tl.extra.cuda.gdc_launch_dependents()
    mask = m_ok[:, None] & n_ok[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        y = acc.to(tl.float32) * tl.load(a_scale_ptr + rm, mask=m_ok, other=0.0)[:, None]
        y = y * w_scale[None, :]
        if HAS_BIAS:
            y = y + bias[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_gemv(
    a: Tensor, w: Tensor, out: Tensor, a_scale: Tensor, w_scale: Tensor, bias: Tensor | None,
    out_int32: bool, block_n: int, block_k: int, num_warps: int, pdl: bool, trigger: int,
) -> None:  # fmt: skip
    """``out[M, N] = dequant(a[M, K] @ w[N, K]^T)`` (+ bias), ``a`` int8 with per-row ``a_scale``.
    With ``pdl`` the kernel reads ``w``, ``w_scale`` and ``bias`` before waiting on its predecessor:
    they must not be written by the kernel launched just before (model parameters never are)."""
    m, k = a.shape
    n = w.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"the GEMV kernel takes at most {GEMV_MAX_M} rows, got {m}")
    dp4a = _words_ok(a) and _words_ok(w) and not interpreting()  # no inline PTX in the interpreter
    if dp4a:
        a, w, k = a.view(torch.int32), w.view(torch.int32), k // 4
    block_k = max(16 if not dp4a else 1, block_k // 4)  # words, or the same register footprint in bytes
    _w8a8_gemv_kernel[(triton.cdiv(n, block_n),)](
        a, w, out, a_scale, w_scale, bias if bias is not None else w_scale,
        m, n, k, a.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n, BLOCK_K=min(block_k, triton.next_power_of_2(k)),
        DP4A=dp4a, HAS_BIAS=bias is not None, OUT_INT32=out_int32, USE_PDL=pdl, TRIGGER=trigger if pdl else 0,
        num_warps=num_warps, **pdl_launch(pdl),
    )  # fmt: skip


def _words_ok(t: Tensor) -> bool:
    """int8 rows readable as int32 words: K a multiple of 4, rows and base 4-byte aligned."""
    return t.shape[1] % 4 == 0 and t.stride(1) == 1 and t.stride(0) % 4 == 0 and t.data_ptr() % 4 == 0
