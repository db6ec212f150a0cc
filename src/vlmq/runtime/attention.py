"""Attention kernels for the lean decode loop (Triton, CUDA; the interpreter on CPU).

* ``decode_attention``: one new token per sequence against the static KV cache, split over the
  cache length (GQA heads share their kv head's loads), then a combine of the splits; in
  ``decode_attention_quant`` the combine also emits o_proj's per-token int8 input + scale.
* ``heads_to_rows``: prefill's SDPA output [B, H, T, D] -> o_proj's input rows [B*T, H*D], for
  W8A8 as int8 + per-token scale in the same pass (the layout change costs that pass anyway).

Quantization matches ``vlmq.runtime.linear.quantize_per_token`` bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmq.runtime.fused import round_to
from vlmq.runtime.kernels.tiles import next_pow2, pdl_enter, pdl_kwargs
from vlmq.runtime.kernels.triton_w8a8 import quant_store


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
    o = round_to(tl.sum(acc * w[:, :, None], axis=1) / tl.sum(l_ * w, axis=1)[:, None], out_ptr.dtype.element_ty)
    o = tl.where(h_ok[:, None], o, 0.0)
    offs = b * n_heads * D + hh[:, None] * D + d[None, :]
    if STORE_OUT:
        tl.store(out_ptr + offs, o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None])
    quant_store(o, q_ptr + offs, s_ptr + b, h_ok[:, None])


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, cur: Tensor,
                     scale: float, splits: int = 16, block_s: int = 64) -> Tensor:
    """q [B, H, 1, D] against cache slots ``<= cur`` that ``key_valid`` [B, S] marks -> [B, 1, H*D].
    Caches [B, Hkv, S, D] with contiguous slots; GQA heads share their kv head's loads."""
    ws = _decode_attn_partials(q, k_cache, v_cache, key_valid, cur, scale, splits, block_s)
    b, h, _, d = q.shape
    n_kv = k_cache.shape[1]
    out = torch.empty((b, 1, h * d), dtype=q.dtype, device=q.device)
    _decode_attn_combine[(b * n_kv, h // n_kv)](ws, out, n_kv, G=h // n_kv, GP=_gp(h // n_kv), D=d, SPLITS=splits,
                                                num_warps=1, **pdl_kwargs())  # fmt: skip
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
                                     STORE_OUT=with_output, num_warps=8, **pdl_kwargs())  # fmt: skip
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
        G=g, GP=gp, D=d, BLOCK_S=block_s, SPLITS=splits, num_warps=4, **pdl_kwargs(),
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


@triton.jit
def _heads_to_rows(o_ptr, y_ptr, s_ptr, T, n_heads, G, s_b, s_kv, s_s,
                   HP: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    """One token: its H x D attention output (GQA-grouped, any strides) -> one row of H*D, as is
    or as int8 + scale. Head h = kv head h // G, group member h % G (SDPA on [B, Hkv, G*T, D])."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)  # b * T + t
    b = row // T
    t = row % T
    hh = tl.arange(0, HP).to(tl.int64)
    d = tl.arange(0, D)
    ok = (hh < n_heads)[:, None]
    src = o_ptr + b * s_b + (hh // G)[:, None] * s_kv + ((hh % G) * T + t)[:, None] * s_s + d[None, :]
    x = tl.load(src, mask=ok, other=0.0)
    dst = y_ptr + row * n_heads * D + hh[:, None] * D + d[None, :]
    if QUANT:
        quant_store(x.to(tl.float32), dst, s_ptr + row, ok)
    else:
        tl.store(dst, x, mask=ok)


def rows_layout_ok(attn: Tensor, groups: int) -> bool:
    """Whether ``heads_to_rows`` takes ``attn``: [B, Hkv, G*T, D], D a power of two with unit stride."""
    d = attn.shape[3]
    return attn.stride(3) == 1 and next_pow2(d) == d and attn.shape[2] % groups == 0


def heads_to_rows(attn: Tensor, quant: bool, groups: int = 1) -> Tensor | tuple[Tensor, Tensor]:
    """Prefill attention output -> o_proj's input rows [B*T, H*D]: as they are (bf16 o_proj) or as
    int8 + fp32 per-token scale [B*T] (W8A8 o_proj), the quantization riding on the pass that the
    layout change costs anyway. ``attn`` is SDPA's output on GQA-grouped queries, [B, Hkv, G*T, D]
    with ``groups`` = G (1: plain [B, H, T, D]), in whatever memory layout SDPA returned; D a power
    of two with unit stride."""
    b, n_kv, gt, d = attn.shape
    t, h = gt // groups, n_kv * groups
    if not rows_layout_ok(attn, groups):
        raise ValueError(f"need [B, Hkv, G*T, D] with a unit-stride power-of-two D, got {tuple(attn.shape)}")
    y = torch.empty((b * t, h * d), dtype=torch.int8 if quant else attn.dtype, device=attn.device)
    s = torch.empty(b * t if quant else 1, dtype=torch.float32, device=attn.device)
    _heads_to_rows[(b * t,)](attn, y, s, t, h, groups, attn.stride(0), attn.stride(1), attn.stride(2),
                             HP=next_pow2(h), D=d, QUANT=quant, num_warps=4, **pdl_kwargs())  # fmt: skip
    return (y, s) if quant else y
