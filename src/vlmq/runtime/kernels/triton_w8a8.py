"""W8A8 INT8 GEMM for CUDA (Triton): the pointer kernel, the per-token row-quantization kernel, and
the launcher that sends each call to the kernel ``pick_config`` chose (dp4a GEMV, sm90 TMA decode
kernel, persistent prefill kernel, or the pointer kernel here).

The pointer kernel computes ``y = dequant(quant(x * pqs) @ W_q^T) + bias`` with int32 accumulation.
Activations are quantized in its prologue (``fused=True``: each program reads its x rows twice, for
the amax and in the main loop) or beforehand by the row kernel (``fused=False``: one read of x, int8
plus an fp32 scale per row). Decode tiles use split-K: int32 partials are added atomically into a
workspace and the last program of a tile (an atomic counter) runs the epilogue and resets it.

Weights stay [N, K] with K contiguous, the layout int8 tensor-core MMAs want for both operands.
Numerics match ``vlmq.runtime.linear`` exactly up to fp32 epilogue rounding: IEEE division
(``div_rn``), round-half-to-even, clamp to [-128, 127].
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmq.runtime.kernels import w8a8_gemv, w8a8_persistent
from vlmq.runtime.kernels.tiles import (
    KernelConfig,
    fit_to_smem,
    interpreting,
    next_pow2,
    pdl_enter,
    pdl_launch,
    pdl_supported,
    pick_config,
    tma_decode_usable,
)

__all__ = ["KernelConfig", "pick_config", "quantize_rows", "w8a8_gemm_prequant", "w8a8_int_gemm", "w8a8_linear"]

MIN_SCALE = tl.constexpr(1e-10)  # same as vlmq.runtime.linear.MIN_SCALE
_RNE_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + C) - C rounds half-to-even for |v| < 2**22

# under PDL, when a GEMM lets its successor launch: 0 at exit, 1 at entry, 2 after the main loop
GEMM_TRIGGER = 2
GEMV_TRIGGER = 2

# A_MODE values (constexpr)
A_INT8_ROWSCALE, A_INT8_SCALAR, A_FUSED_DYNAMIC, A_FUSED_STATIC = 0, 1, 2, 3


@triton.jit
def quantize_int8(x, inv_scale):
    q = x * inv_scale
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    return ((q + _RNE_MAGIC) - _RNE_MAGIC).to(tl.int8)


@triton.jit
def quant_store(x, q_ptrs, s_ptr, mask):
    """One token's int8 quantization from registers, for any tile rank: scale = max|x| / 127 over the
    whole tile (floored at MIN_SCALE) stored at ``s_ptr``, ``round(x / scale)`` at ``q_ptrs``."""
    scale = tl.maximum(tl.div_rn(tl.max(tl.where(mask, tl.abs(x), 0.0)), 127.0), MIN_SCALE)
    tl.store(s_ptr, scale)
    tl.store(q_ptrs, quantize_int8(x, tl.div_rn(1.0, scale)), mask=mask)


@triton.jit
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, pqs_ptr, static_ptr,
    K, stride_xm, stride_qm,
    BLOCK_K: tl.constexpr, STATIC: tl.constexpr, HAS_PQS: tl.constexpr,
    SINGLE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    if SINGLE:  # whole row in registers: one read of x, no dependent loop iterations
        x = tl.load(x_row + rk, mask=rk < K, other=0.0).to(tl.float32)
        if HAS_PQS:
            x = x * tl.load(pqs_ptr + rk, mask=rk < K, other=0.0)
        if STATIC:
            tl.store(q_row + rk, quantize_int8(x, tl.div_rn(1.0, tl.load(static_ptr))), mask=rk < K)
        else:
            quant_store(x, q_row + rk, s_ptr + row, rk < K)
    else:
        if STATIC:
            inv = tl.div_rn(1.0, tl.load(static_ptr))
        else:
            amax = tl.zeros([BLOCK_K], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                x = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
                if HAS_PQS:
                    x = x * tl.load(pqs_ptr + kk, mask=kk < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), 127.0), MIN_SCALE)
            tl.store(s_ptr + row, scale)
            inv = tl.div_rn(1.0, scale)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            x = tl.load(x_row + kk, mask=kk < K, other=0.0).to(tl.float32)
            if HAS_PQS:
                x = x * tl.load(pqs_ptr + kk, mask=kk < K, other=0.0)
            tl.store(q_row + kk, quantize_int8(x, inv), mask=kk < K)


@triton.jit
def _load_a(a_ptrs, pqs_ptr, kk, k_lim, a_inv, A_MODE: tl.constexpr,
            HAS_PQS: tl.constexpr, EVEN_K: tl.constexpr):  # fmt: skip
    if EVEN_K:
        a = tl.load(a_ptrs)
    else:
        a = tl.load(a_ptrs, mask=(kk < k_lim)[None, :], other=0)
    if A_MODE >= 2:
        a = a.to(tl.float32)
        if HAS_PQS:
            a = a * tl.load(pqs_ptr + kk, mask=kk < k_lim, other=0.0)[None, :]
        if A_MODE == 2:
            a = quantize_int8(a, a_inv[:, None])
        else:
            a = quantize_int8(a, a_inv)
    return a


@triton.jit
def _load_w(w_cols, kk, k_lim, EVEN_K: tl.constexpr):
    """[BLOCK_K, BLOCK_N] slice of the [N, K] weight (K contiguous in memory)."""
    if EVEN_K:
        return tl.load(w_cols + kk[:, None])
    return tl.load(w_cols + kk[:, None], mask=(kk < k_lim)[:, None], other=0)


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, pqs_ptr, ws_ptr, lock_ptr,
    M, N, K, SPLIT_K,
    stride_am, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, A_MODE: tl.constexpr, HAS_PQS: tl.constexpr,
    HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr, EVEN_K: tl.constexpr,
    AMAX_K: tl.constexpr, USE_PDL: tl.constexpr, TRIGGER: tl.constexpr, SWAP_AB: tl.constexpr,
):  # fmt: skip
    if TRIGGER == 1:  # the next kernel may launch now (it waits for our writes)
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped tile order: GROUP_M row blocks sweep N together, so W tiles are reused in L2
    num_in_group = GROUP_M * num_pid_n
    first_m = (pid // num_in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % num_in_group) % group_m
    pid_n = (pid % num_in_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # wrap out-of-range rows/cols onto valid ones: loads need no M/N masks, stores mask
    rm_l = (rm % M).to(tl.int64)
    rn_l = (rn % N).to(tl.int64)
    a_rows = a_ptr + rm_l[:, None] * stride_am
    w_cols = w_ptr + rn_l[None, :] * stride_wn
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = min(K, k_start + k_per_split)
    # per-column scale and bias are static: load them now, off the epilogue's critical path
    n_ok = rn < N
    w_scale = tl.load(w_scale_ptr + rn, mask=n_ok, other=0.0)
    bias = tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32) if HAS_BIAS else w_scale
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # launched early (PDL): wait until the producer's writes are visible

    a_inv = 1.0
    if A_MODE == 2:  # per-token amax over all of K, in wide chunks (few dependent loads)
        rka = tl.arange(0, AMAX_K)
        amax = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, AMAX_K):
            kk = k0 + rka
            x = tl.load(a_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0).to(tl.float32)
            if HAS_PQS:
                x = x * tl.load(pqs_ptr + kk, mask=kk < K, other=0.0)[None, :]
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        a_scale = tl.maximum(tl.div_rn(amax, 127.0), MIN_SCALE)
        a_inv = tl.div_rn(tl.full([BLOCK_M], 1.0, tl.float32), a_scale)
    elif A_MODE == 0:
        a_scale = tl.load(a_scale_ptr + rm_l)
    else:
        a_scale = tl.load(a_scale_ptr)
        a_inv = tl.div_rn(1.0, a_scale)

    if SWAP_AB:  # weight rows fill the MMA's 64-row side, tokens its narrow side: y^T = W x^T
        acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + rk
            a = _load_a(a_rows + kk[None, :], pqs_ptr, kk, k_end, a_inv, A_MODE, HAS_PQS, EVEN_K)
            w = _load_w(w_cols, kk, k_end, EVEN_K)
            acc_t = tl.dot(tl.trans(w), tl.trans(a), acc_t, out_dtype=tl.int32)
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + rk
            a = _load_a(a_rows + kk[None, :], pqs_ptr, kk, k_end, a_inv, A_MODE, HAS_PQS, EVEN_K)
            acc = tl.dot(a, _load_w(w_cols, kk, k_end, EVEN_K), acc, out_dtype=tl.int32)

    if TRIGGER == 2:  # the next kernel may launch now, during our epilogue
        tl.extra.cuda.gdc_launch_dependents()
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    if SPLIT_K > 1:
        ws_ptrs = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        tile = pid_m * num_pid_n + pid_n
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            acc = tl.atomic_xchg(ws_ptrs, tl.zeros_like(acc), mask=mask, sem="relaxed")
            tl.atomic_xchg(lock_ptr + tile, 0)
            _epilogue(acc, rm, rn, mask, a_scale, w_scale, bias, out_ptr, stride_om, A_MODE, HAS_BIAS, OUT_INT32)
    else:
        _epilogue(acc, rm, rn, mask, a_scale, w_scale, bias, out_ptr, stride_om, A_MODE, HAS_BIAS, OUT_INT32)


@triton.jit
def _epilogue(acc, rm, rn, mask, a_scale, w_scale, bias, out_ptr, stride_om,
              A_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_INT32: tl.constexpr):  # fmt: skip
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    if OUT_INT32:
        tl.store(out_ptrs, acc, mask=mask)
    else:
        y = acc.to(tl.float32)
        if A_MODE == 0 or A_MODE == 2:
            y = y * a_scale[:, None]
        else:
            y = y * a_scale
        y = y * w_scale[None, :]
        if HAS_BIAS:
            y = y + bias[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------


_WORKSPACES: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
def _workspace(device: torch.device, numel: int, tiles: int) -> tuple[Tensor, Tensor]:
    """Zeroed int32 split-K accumulators and tile counters; kernels leave them zeroed."""
    idx = device.index
    if idx is None:
        idx = torch.cuda.current_device() if device.type == "cuda" else 0
    key = (device.type, idx)
    ws, locks = _WORKSPACES.get(key, (None, None))
    if ws is None or ws.numel() < numel or locks.numel() < tiles:
        ws = torch.zeros(max(numel, 1 << 16), dtype=torch.int32, device=device)
        locks = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, locks)
    return ws, locks


def quantize_rows(
    x: Tensor, input_scale: Tensor | None = None, pre_quant_scale: Tensor | None = None, pdl: bool = False
) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (int8 [M, K], fp32 scale [M], or the static scalar)."""
    m, k = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    static = input_scale is not None
    s = input_scale.float() if static else torch.empty(m, dtype=torch.float32, device=x.device)
    block = next_pow2(k)
    single = block <= 16384
    pdl = pdl and pdl_supported()
    _quant_rows_kernel[(m,)](
        x, q, s, pre_quant_scale if pre_quant_scale is not None else s, s,
        k, x.stride(0), q.stride(0),
        BLOCK_K=block if single else 4096, STATIC=static, HAS_PQS=pre_quant_scale is not None,
        SINGLE=single, USE_PDL=pdl,
        num_warps=max(4, min(16, block // 1024)) if single else 8, **pdl_launch(pdl),
    )  # fmt: skip
    return q, s


def _launch(
    a: Tensor, w: Tensor, out: Tensor, a_scale: Tensor, w_scale: Tensor,
    bias: Tensor | None, pqs: Tensor | None, a_mode: int, out_int32: bool, cfg: KernelConfig,
    pdl: bool = False,
) -> None:  # fmt: skip
    """Launch the kernel ``cfg`` picks. With ``pdl`` it is launched early and reads ``w``, ``w_scale``
    and ``bias`` before waiting on its predecessor: those must not come from the kernel just before."""
    m, k = a.shape
    n = w.shape[0]
    if cfg.gemv:
        if a_mode != A_INT8_ROWSCALE:  # (launch_gemv checks M)
            raise ValueError("the GEMV config needs int8 rows with per-row scales")
        w8a8_gemv.launch_gemv(a, w, out, a_scale, w_scale, bias, out_int32, cfg.block_n, cfg.block_k,
                              cfg.num_warps, pdl, GEMV_TRIGGER)  # fmt: skip
        return
    if cfg.tma:
        if a_mode == A_INT8_ROWSCALE and tma_decode_usable(a, w, cfg):
            from vlmq.runtime.kernels import w8a8_tma_decode  # Gluon: imported only where it can run

            ws, locks = _workspace(a.device, m * n, triton.cdiv(n, cfg.block_n)) if cfg.split_k > 1 else (out, out)
            w8a8_tma_decode.launch_tma_decode(a, w, out, a_scale, w_scale, bias, out_int32, cfg.block_n,
                                              cfg.split_k, not cfg.swap_ab, ws, locks, pdl)  # fmt: skip
            return
        # e.g. a misaligned view: the same tile on the pointer kernel (its MMAs need 16 token rows)
        cfg = dataclasses.replace(cfg, tma=False, block_m=max(16, cfg.block_m), num_stages=4)
    cfg = fit_to_smem(cfg, a.element_size(), w8a8_persistent.smem_bytes(a.device))
    if cfg.persistent and a_mode == A_INT8_ROWSCALE and w8a8_persistent.supported(a, w):
        w8a8_persistent.launch_persistent(a, w, out, a_scale, w_scale, bias, out_int32, cfg.block_m, cfg.block_n,
                                          cfg.block_k, cfg.group_m, cfg.num_warps, cfg.num_stages,
                                          (cfg.tail_m, cfg.tail_n) if cfg.tail_m else None, pdl)  # fmt: skip
        return
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    ws, locks = _workspace(a.device, m * n, tiles) if split > 1 else (out, out)
    _w8a8_gemm_kernel[(tiles, split)](
        a, w, out, a_scale, w_scale,
        bias if bias is not None else w_scale, pqs if pqs is not None else w_scale,
        ws, locks, m, n, k, split, a.stride(0), w.stride(0), out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        A_MODE=a_mode, HAS_PQS=pqs is not None, HAS_BIAS=bias is not None,
        OUT_INT32=out_int32, EVEN_K=k % cfg.block_k == 0,
        AMAX_K=min(next_pow2(k), max(cfg.block_k, 16384 // cfg.block_m)), USE_PDL=pdl,
        TRIGGER=GEMM_TRIGGER if pdl else 0, SWAP_AB=cfg.swap_ab,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch(pdl),
    )  # fmt: skip


def w8a8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
    pre_quant_scale: Tensor | None = None,
    out: Tensor | None = None,
    config: KernelConfig | None = None,
) -> Tensor:
    """``x [M, K]`` (bf16/fp16/fp32) -> ``[M, N]`` in x.dtype; see the module docstring."""
    if not x.is_cuda and not interpreting():
        raise RuntimeError("the Triton W8A8 kernel needs CUDA tensors")
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.dtype != torch.int8:
        raise ValueError(f"weight must be int8 [N, {k}], got {weight.dtype} {tuple(weight.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    static = input_scale is not None
    cfg = config or pick_config(m, n, k, static)
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if cfg.fused:
        a_mode = A_FUSED_STATIC if static else A_FUSED_DYNAMIC
        a_scale = input_scale.float() if static else weight_scale  # unused when dynamic
        _launch(x, weight, out, a_scale, weight_scale, bias, pre_quant_scale, a_mode, False, cfg)
    else:
        pdl = cfg.pdl and pdl_supported()  # a config tuned on an H100 may come to an sm8x card
        q, s = quantize_rows(x, input_scale, pre_quant_scale, pdl=pdl)
        a_mode = A_INT8_SCALAR if static else A_INT8_ROWSCALE
        _launch(q, weight, out, s, weight_scale, bias, None, a_mode, False, cfg, pdl=pdl)
    return out


def w8a8_int_gemm(a: Tensor, weight: Tensor, config: KernelConfig | None = None) -> Tensor:
    """Debug/test entry: int8 [M, K] x int8 [N, K] -> exact int32 [M, N] (same main loop)."""
    m, k = a.shape
    n = weight.shape[0]
    cfg = config or dataclasses.replace(pick_config(m, n, k), fused=False)
    out = torch.empty((m, n), dtype=torch.int32, device=a.device)
    dummy = torch.ones(max(m, n, 1), dtype=torch.float32, device=a.device)  # a_scale [M] and w_scale [N] slots
    _launch(a, weight, out, dummy, dummy, None, None, A_INT8_ROWSCALE, True, cfg)
    return out


def w8a8_gemm_prequant(
    q: Tensor,
    q_scale: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: KernelConfig | None = None,
) -> Tensor:
    """Activations already quantized upstream (int8 [M, K] + fp32 per-row scale [M]) -> [M, N]
    ``out_dtype``: the int8 GEMM with the dequant + bias epilogue, no quantization pass."""
    m, k = q.shape
    n = weight.shape[0]
    if q.dtype != torch.int8 or weight.shape[1] != k or q_scale.numel() != m:
        raise ValueError(f"bad pre-quantized operands: q {q.dtype} {tuple(q.shape)}, w {tuple(weight.shape)}")
    cfg = config or pick_config(m, n, k)
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    if m:
        # PDL: launched while the producer (fused norm / SiLU kernel) still runs; gdc_wait inside
        pdl = cfg.pdl and pdl_supported()
        _launch(q, weight, out, q_scale, weight_scale, bias, None, A_INT8_ROWSCALE, False,
                dataclasses.replace(cfg, fused=False), pdl=pdl)
    return out
