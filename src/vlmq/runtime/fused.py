"""Fused elementwise kernels for the lean decode loop (Triton, CUDA; the interpreter on CPU).

* ``add_rms_norm``: ``h = h + delta`` (optional) and ``y = RMSNorm(h)`` in one pass; ``y`` as
  bf16 (bf16 linears) or as int8 + per-token fp32 scale (W8A8 linears with dynamic activations):
  per-token quantization happens once per layer input, shared by q/k/v and by gate/up.
* ``silu_mul``: ``silu(g) * u`` from the fused gate/up output, bf16 or int8 + scale (down_proj).
* ``silu_mul_hadamard`` (``vlmq.runtime.fused_hadamard``): the same, rotated by down_proj's online block
  Hadamard (R4) before the int8 quantization.
* ``rope_cache``: rotary embedding of q and k from the fused q/k/v output, k and v written
  straight into the static KV cache slots.

Every kernel reproduces the eager torch op sequence's roundings (bf16 after each op, as HF's
modules do); quantization matches ``vlmq.runtime.linear.quantize_per_token`` bit for bit.
Both model variants get the same kernels, so bf16 vs W8A8 stays a fair comparison.

On Hopper every kernel here is launched with programmatic dependent launch (PDL): it starts while
its predecessor still runs, lets its own successor launch, and waits (``pdl_enter``) before it
reads or writes any activation, so kernel launch latency overlaps the previous kernel's work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmq.runtime.kernels.tiles import next_pow2, pdl_enter, pdl_kwargs
from vlmq.runtime.kernels.triton_w8a8 import quant_store


@triton.jit
def round_to(x, dt: tl.constexpr):
    """fp32 -> nearest ``dt`` value (kept in fp32). Explicit round-half-even for bf16: the
    interpreter truncates on a plain cast (the GPU rounds; both agree with this)."""
    if dt == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, h_out_ptr, w_ptr, y_ptr, s_ptr, H, eps,
                         BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, QUANT: tl.constexpr,
                         USE_PDL: tl.constexpr):  # fmt: skip
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    dt = h_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        h = round_to(h + tl.load(d_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32), dt)
        tl.store(h_out_ptr + row * H + cols, h.to(dt), mask=mask)
    var = tl.sum(h * h, axis=0) / H
    normed = round_to(h * (1.0 / tl.sqrt_rn(var + eps)), dt)
    y = round_to(tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * normed, dt)
    if QUANT:
        quant_store(y, y_ptr + row * H + cols, s_ptr + row, mask)
    else:
        tl.store(y_ptr + row * H + cols, y.to(dt), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, y_ptr, s_ptr, n_cols, BLOCK: tl.constexpr, QUANT: tl.constexpr,
                     USE_PDL: tl.constexpr):  # fmt: skip
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = round_to(round_to(g / (1.0 + tl.exp(-g)), dt) * u, dt)
    if QUANT:
        quant_store(y, y_ptr + row * n_cols + cols, s_ptr + row, mask)
    else:
        tl.store(y_ptr + row * n_cols + cols, y.to(dt), mask=mask)


@triton.jit
def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, kc_ptr, vc_ptr,
                       T, stride_row, n_heads, n_kv, kc_sb, kc_sh, kc_ss, HALF: tl.constexpr,
                       USE_PDL: tl.constexpr):  # fmt: skip
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    head = tl.program_id(1)
    b = row // T
    t = row % T
    d = tl.arange(0, HALF)
    src = qkv_ptr + row * stride_row + head * 2 * HALF
    dt = qkv_ptr.dtype.element_ty
    x1 = tl.load(src + d)
    x2 = tl.load(src + HALF + d)
    slot = tl.load(slots_ptr + t)
    if head >= n_heads + n_kv:  # v: straight into the cache
        dst = vc_ptr + b * kc_sb + (head - n_heads - n_kv) * kc_sh + slot * kc_ss
        tl.store(dst + d, x1)
        tl.store(dst + HALF + d, x2)
    else:
        c1 = tl.load(cos_ptr + row * 2 * HALF + d).to(tl.float32)
        c2 = tl.load(cos_ptr + row * 2 * HALF + HALF + d).to(tl.float32)
        s1 = tl.load(sin_ptr + row * 2 * HALF + d).to(tl.float32)
        s2 = tl.load(sin_ptr + row * 2 * HALF + HALF + d).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # q * cos + rotate_half(q) * sin, rounded to the model dtype after each op like torch
        o1 = round_to(round_to(f1 * c1, dt) + round_to(-f2 * s1, dt), dt).to(dt)
        o2 = round_to(round_to(f2 * c2, dt) + round_to(f1 * s2, dt), dt).to(dt)
        if head < n_heads:
            dst = q_ptr + ((b * n_heads + head) * T + t) * 2 * HALF
        else:
            dst = kc_ptr + b * kc_sb + (head - n_heads) * kc_sh + slot * kc_ss
        tl.store(dst + d, o1)
        tl.store(dst + HALF + d, o2)


def warps_for(block: int) -> int:
    return max(1, min(16, block // 512))


def add_rms_norm(h: Tensor, delta: Tensor | None, weight: Tensor, eps: float,
                 quant: bool) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """(h + delta, RMSNorm(h + delta) as bf16 or (int8, fp32 scale)); h/delta [M, H] contiguous."""
    m, hid = h.shape
    h_out = torch.empty_like(h) if delta is not None else h
    y = torch.empty((m, hid), dtype=torch.int8 if quant else h.dtype, device=h.device)
    s = torch.empty(m if quant else 1, dtype=torch.float32, device=h.device)
    block = next_pow2(hid)
    _add_rms_norm_kernel[(m,)](h, delta if delta is not None else h, h_out, weight, y, s, hid, eps,
                               BLOCK=block, HAS_DELTA=delta is not None, QUANT=quant,
                               num_warps=warps_for(block), **pdl_kwargs())  # fmt: skip
    return h_out, ((y, s) if quant else y)


def silu_mul(gu: Tensor, quant: bool) -> Tensor | tuple[Tensor, Tensor]:
    """silu(gate) * up from gate_up [M, 2I]: bf16 [M, I] or (int8 [M, I], fp32 scale [M])."""
    m, two_i = gu.shape
    i = two_i // 2
    y = torch.empty((m, i), dtype=torch.int8 if quant else gu.dtype, device=gu.device)
    s = torch.empty(m if quant else 1, dtype=torch.float32, device=gu.device)
    block = next_pow2(i)
    _silu_mul_kernel[(m,)](gu, y, s, i, BLOCK=block, QUANT=quant, num_warps=warps_for(block),
                           **pdl_kwargs())
    return (y, s) if quant else y


def rope_cache(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
               n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """qkv [B, T, (H + 2 Hkv) D]; cos/sin [B, 1, T, D]; caches [B, Hkv, S, D] (slots [T]) -> q [B, H, T, D]."""
    b, t, _ = qkv.shape
    q = torch.empty((b, n_heads, t, head_dim), dtype=qkv.dtype, device=qkv.device)
    cos, sin = cos.reshape(b * t, head_dim).contiguous(), sin.reshape(b * t, head_dim).contiguous()
    assert k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    _rope_cache_kernel[(b * t, n_heads + 2 * n_kv)](
        qkv, cos, sin, slots, q, k_cache, v_cache, t, qkv.stride(1), n_heads, n_kv,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HALF=head_dim // 2, num_warps=1,
        **pdl_kwargs(),
    )  # fmt: skip
    return q
