"""Fused elementwise kernels for the lean decode loop (Triton, CUDA; the interpreter on CPU).

* ``add_rms_norm``: ``h = h + delta`` (optional) and ``y = RMSNorm(h)`` in one pass; ``y`` as
  bf16 (bf16 linears) or as int8 + per-token fp32 scale (W8A8 linears with dynamic activations):
  per-token quantization happens once per layer input, shared by q/k/v and by gate/up.
* ``silu_mul``: ``silu(g) * u`` from the fused gate/up output, bf16 or int8 + scale (down_proj).
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
from torch import Tensor, nn

from vlmq.runtime.kernels.tiles import interpreting, next_pow2, pdl_enter, pdl_launch, pdl_supported
from vlmq.runtime.kernels.triton_w8a8 import MIN_SCALE, _quantize, w8a8_gemm_prequant
from vlmq.runtime.linear import W8A8Linear, resolve_backend


@triton.jit
def _rnd(x, dt: tl.constexpr):
    """fp32 -> nearest ``dt`` value (kept in fp32). Explicit round-half-even for bf16: the
    interpreter truncates on a plain cast (the GPU rounds; both agree with this)."""
    if dt == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(dt).to(tl.float32)


@triton.jit
def _quant_store(y, q_ptr, s_ptr, row, offs, mask):
    amax = tl.max(tl.where(mask, tl.abs(y), 0.0), axis=0)
    scale = tl.maximum(tl.div_rn(amax, 127.0), MIN_SCALE)
    tl.store(s_ptr + row, scale)
    tl.store(q_ptr + offs, _quantize(y, tl.div_rn(1.0, scale)), mask=mask)


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
        h = _rnd(h + tl.load(d_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32), dt)
        tl.store(h_out_ptr + row * H + cols, h.to(dt), mask=mask)
    var = tl.sum(h * h, axis=0) / H
    normed = _rnd(h * (1.0 / tl.sqrt_rn(var + eps)), dt)
    y = _rnd(tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * normed, dt)
    if QUANT:
        _quant_store(y, y_ptr, s_ptr, row, row * H + cols, mask)
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
    y = _rnd(_rnd(g / (1.0 + tl.exp(-g)), dt) * u, dt)
    if QUANT:
        _quant_store(y, y_ptr, s_ptr, row, row * n_cols + cols, mask)
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
        o1 = _rnd(_rnd(f1 * c1, dt) + _rnd(-f2 * s1, dt), dt).to(dt)
        o2 = _rnd(_rnd(f2 * c2, dt) + _rnd(f1 * s2, dt), dt).to(dt)
        if head < n_heads:
            dst = q_ptr + ((b * n_heads + head) * T + t) * 2 * HALF
        else:
            dst = kc_ptr + b * kc_sb + (head - n_heads) * kc_sh + slot * kc_ss
        tl.store(dst + d, o1)
        tl.store(dst + HALF + d, o2)


@triton.jit
def _decode_attn_partial(q_ptr, kc_ptr, vc_ptr, valid_ptr, cur_ptr, ws_ptr, scale,
                         n_heads, n_kv, S, kc_sb, kc_sh, per_split,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
                         SPLITS: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    """One (batch row, kv head, S split): online softmax of its G query heads over the split's keys."""
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // n_kv
    kvh = pid % n_kv
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (b * n_heads + kvh * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
    n_keys = tl.load(cur_ptr) + 1
    start = split * per_split
    end = tl.minimum(start + per_split, n_keys)
    m_i = tl.full([GP], -1e30, tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    base = b.to(tl.int64) * kc_sb + kvh * kc_sh
    for s0 in range(start, end, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        ok = offs < end
        ok = ok & (tl.load(valid_ptr + b * S + offs, mask=ok, other=0) != 0)
        k = tl.load(kc_ptr + base + offs[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(vc_ptr + base + offs[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k)) * scale
        sc = tl.where(ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    row = (pid * SPLITS + split) * GP + g
    tl.store(ws_ptr + row * (D + 2) + D, m_i)
    tl.store(ws_ptr + row * (D + 2) + D + 1, l_i)
    tl.store(ws_ptr + row[:, None] * (D + 2) + d[None, :], acc)


@triton.jit
def _decode_attn_combine(ws_ptr, out_ptr, n_kv, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                         SPLITS: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    pdl_enter(USE_PDL)
    pid = tl.program_id(0)  # b * n_kv + kvh
    g = tl.program_id(1)
    d = tl.arange(0, D)
    sp = tl.arange(0, SPLITS)
    rows = (pid * SPLITS + sp) * GP + g
    m = tl.load(ws_ptr + rows * (D + 2) + D)
    l_ = tl.load(ws_ptr + rows * (D + 2) + D + 1)
    w = tl.exp(m - tl.max(m, axis=0))
    acc = tl.load(ws_ptr + rows[:, None] * (D + 2) + d[None, :])
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(l_ * w, axis=0)
    b = pid // n_kv
    head = (pid % n_kv) * G + g
    tl.store(out_ptr + (b * n_kv * G + head) * D + d, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _decode_attn_combine_quant(ws_ptr, out_ptr, q_ptr, s_ptr, n_kv, n_heads, G: tl.constexpr,
                               GP: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                               STORE_OUT: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    """All heads of one token at once: the attention output rounded to the model dtype (stored only
    if STORE_OUT), then its per-token int8 + scale (o_proj's input), so o_proj needs no
    quantization pass of its own."""
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    hh = tl.arange(0, HP)
    h_ok = hh < n_heads
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, D)
    rows = ((b * n_kv + hh // G)[:, None] * SPLITS + sp[None, :]) * GP + (hh % G)[:, None]  # [HP, SPLITS]
    rows = tl.where(h_ok[:, None], rows, 0)
    m = tl.load(ws_ptr + rows * (D + 2) + D)
    l_ = tl.load(ws_ptr + rows * (D + 2) + D + 1)
    w = tl.exp(m - tl.max(m, axis=1)[:, None])
    acc = tl.load(ws_ptr + rows[:, :, None] * (D + 2) + d[None, None, :])
    o = _rnd(tl.sum(acc * w[:, :, None], axis=1) / tl.sum(l_ * w, axis=1)[:, None], out_ptr.dtype.element_ty)
    o = tl.where(h_ok[:, None], o, 0.0)
    offs = b * n_heads * D + hh[:, None] * D + d[None, :]
    if STORE_OUT:
        tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
    scale = tl.maximum(tl.div_rn(tl.max(tl.max(tl.abs(o), axis=1), axis=0), 127.0), MIN_SCALE)
    tl.store(s_ptr + b, scale)
    tl.store(q_ptr + offs, _quantize(o, tl.div_rn(1.0, scale)), mask=h_ok[:, None])


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, cur: Tensor,
                     scale: float, splits: int = 16, block_s: int = 64) -> Tensor:
    """q [B, H, 1, D] against cache slots ``<= cur`` that ``key_valid`` [B, S] marks -> [B, 1, H*D].
    Caches [B, Hkv, S, D] with contiguous slots; GQA heads share their kv head's loads."""
    ws = _decode_attn_partials(q, k_cache, v_cache, key_valid, cur, scale, splits, block_s)
    b, h, _, d = q.shape
    n_kv = k_cache.shape[1]
    out = torch.empty((b, 1, h * d), dtype=q.dtype, device=q.device)
    _decode_attn_combine[(b * n_kv, h // n_kv)](ws, out, n_kv, G=h // n_kv, GP=_gp(h // n_kv), D=d, SPLITS=splits,
                                                num_warps=1, **_pdl_kw())  # fmt: skip
    return out


def decode_attention_quant(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, cur: Tensor,
                           scale: float, splits: int = 16, block_s: int = 64,
                           with_output: bool = False) -> tuple[Tensor | None, Tensor, Tensor]:
    """``decode_attention`` whose combine also emits the per-token int8 [B, H*D] + fp32 scale [B] of
    its output (o_proj's input): ``(output or None, int8, scale)``."""
    ws = _decode_attn_partials(q, k_cache, v_cache, key_valid, cur, scale, splits, block_s)
    b, h, _, d = q.shape
    n_kv = k_cache.shape[1]
    out = torch.empty((b, 1, h * d), dtype=q.dtype, device=q.device) if with_output else None
    q8 = torch.empty((b, h * d), dtype=torch.int8, device=q.device)
    s8 = torch.empty(b, dtype=torch.float32, device=q.device)
    out_or_dtype = out if out is not None else torch.empty(1, dtype=q.dtype, device=q.device)  # rounding dtype
    _decode_attn_combine_quant[(b,)](ws, out_or_dtype, q8, s8, n_kv, h, G=h // n_kv,
                                     GP=_gp(h // n_kv), HP=next_pow2(h), D=d, SPLITS=splits,
                                     STORE_OUT=with_output, num_warps=8, **_pdl_kw())  # fmt: skip
    return out, q8, s8


def _gp(g: int) -> int:
    return max(16, next_pow2(g))


def _decode_attn_partials(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, cur: Tensor,
                          scale: float, splits: int, block_s: int) -> Tensor:
    """Per-split (max, sum, unnormalised output) rows for every (batch, kv head, split, q head)."""
    b, h, t, d = q.shape
    n_kv, s = k_cache.shape[1], k_cache.shape[2]
    assert t == 1 and k_cache.stride(2) == d and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
    g = h // n_kv
    gp = _gp(g)
    per_split = triton.cdiv(triton.cdiv(s, splits), block_s) * block_s
    ws = torch.empty(b * n_kv * splits * gp * (d + 2), dtype=torch.float32, device=q.device)
    _decode_attn_partial[(b * n_kv, splits)](
        q.contiguous(), k_cache, v_cache, key_valid.view(torch.uint8), cur, ws, scale, h, n_kv, s,
        k_cache.stride(0), k_cache.stride(1), per_split,
        G=g, GP=gp, D=d, BLOCK_S=block_s, SPLITS=splits, num_warps=4, **_pdl_kw(),
    )  # fmt: skip
    return ws


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, cur: Tensor,
                               scale: float) -> Tensor:
    b, h, _, d = q.shape
    n_kv, s = k_cache.shape[1], k_cache.shape[2]
    valid = key_valid & (torch.arange(s, device=q.device) <= cur)
    sc = (q.reshape(b, n_kv, h // n_kv, d).float() @ k_cache.float().transpose(-1, -2)) * scale
    p = sc.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    return (p @ v_cache.float()).reshape(b, 1, h * d).to(q.dtype)


def _pdl_kw() -> dict[str, bool]:
    """USE_PDL and the launch option that goes with it (see the module docstring)."""
    on = pdl_supported()
    return {"USE_PDL": on, **pdl_launch(on)}


def _warps(block: int) -> int:
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
                               num_warps=_warps(block), **_pdl_kw())  # fmt: skip
    return h_out, ((y, s) if quant else y)


def silu_mul(gu: Tensor, quant: bool) -> Tensor | tuple[Tensor, Tensor]:
    """silu(gate) * up from gate_up [M, 2I]: bf16 [M, I] or (int8 [M, I], fp32 scale [M])."""
    m, two_i = gu.shape
    i = two_i // 2
    y = torch.empty((m, i), dtype=torch.int8 if quant else gu.dtype, device=gu.device)
    s = torch.empty(m if quant else 1, dtype=torch.float32, device=gu.device)
    block = next_pow2(i)
    _silu_mul_kernel[(m,)](gu, y, s, i, BLOCK=block, QUANT=quant, num_warps=_warps(block),
                           **_pdl_kw())
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
        **_pdl_kw(),
    )  # fmt: skip
    return q


# ---------------------------------------------------------------------------
# the ops object the decode loop calls
# ---------------------------------------------------------------------------


def _on_device(t: Tensor) -> bool:
    return t.is_cuda or interpreting()  # the Triton interpreter runs the kernels on CPU tensors (tests)


def _prequant_ok(linear: nn.Module) -> bool:
    """W8A8 linear whose activations the producer can quantize: dynamic, no smoothing pre-scale."""
    if not isinstance(linear, W8A8Linear) or linear.input_scale is not None or linear.pre_quant_scale is not None:
        return False
    return interpreting() or resolve_backend(linear.backend, linear.weight.device) == "triton"


def _apply(linear: nn.Module, x: Tensor | tuple[Tensor, Tensor], out_dtype: torch.dtype) -> Tensor:
    if isinstance(x, tuple):
        return w8a8_gemm_prequant(x[0], x[1], linear.weight, linear.weight_scale, linear.bias, out_dtype)
    return linear(x)


def _fusable(h: Tensor, linear: nn.Module) -> bool:
    return _on_device(h) and (_prequant_ok(linear) or type(linear) is nn.Linear)


class FusedOps:
    """Same interface as ``vlmq.runtime.decode.ReferenceOps``; falls back to it where a kernel
    does not apply (CPU tensors, static/smoothed W8A8, other linear types)."""

    def __init__(self, ref) -> None:  # type: ignore[no-untyped-def]
        self.ref = ref

    def add_norm_linear(self, h: Tensor, delta: Tensor | None, weight: Tensor, eps: float,
                        linear: nn.Module) -> tuple[Tensor, Tensor]:
        if not _fusable(h, linear):
            return self.ref.add_norm_linear(h, delta, weight, eps, linear)
        shape = h.shape
        h2 = h.reshape(-1, shape[-1])
        d2 = delta.reshape(-1, shape[-1]) if delta is not None else None
        h_new, y = add_rms_norm(h2, d2, weight, eps, quant=_prequant_ok(linear))
        out = _apply(linear, y, h.dtype)
        return h_new.view(shape), out.view(*shape[:-1], -1)

    def act_linear(self, gu: Tensor, linear: nn.Module) -> Tensor:
        if not _fusable(gu, linear):
            return self.ref.act_linear(gu, linear)
        shape = gu.shape
        y = silu_mul(gu.reshape(-1, shape[-1]), quant=_prequant_ok(linear))
        return _apply(linear, y, gu.dtype).view(*shape[:-1], -1)

    def rope_cache(self, qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slots: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
        if not _on_device(qkv) or not qkv.is_contiguous():
            return self.ref.rope_cache(qkv, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim)
        return rope_cache(qkv, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim)

    def decode_attention_o(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, cur: Tensor,
                           scale: float, o_proj: nn.Module) -> Tensor:
        """Decode attention followed by o_proj; W8A8 o_proj gets its int8 input from the attention."""
        if not _on_device(q):
            return o_proj(decode_attention_reference(q, k_cache, v_cache, key_valid, cur, scale))
        if not _prequant_ok(o_proj):
            return o_proj(decode_attention(q, k_cache, v_cache, key_valid, cur, scale))
        _, q8, s8 = decode_attention_quant(q, k_cache, v_cache, key_valid, cur, scale)
        return _apply(o_proj, (q8, s8), q.dtype).view(q.shape[0], 1, -1)
