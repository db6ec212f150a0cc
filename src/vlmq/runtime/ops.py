"""The ops object the lean decode loop calls (``vlmq.runtime.decode.ReferenceOps``'s interface):
fused Triton kernels where they apply, the eager reference elsewhere."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmq.runtime.attention import (
    decode_attention,
    decode_attention_quant,
    decode_attention_reference,
    heads_to_rows,
    rows_layout_ok,
)
from vlmq.runtime.fused import add_rms_norm, rope_cache, silu_mul
from vlmq.runtime.fused_hadamard import hadamard_split_mode, silu_mul_hadamard, silu_mul_hadamard_fits
from vlmq.runtime.kernels.tiles import interpreting
from vlmq.runtime.kernels.triton_w8a8 import w8a8_gemm_prequant
from vlmq.runtime.linear import W8A8Linear, resolve_backend


def _on_device(t: Tensor) -> bool:
    return t.is_cuda or interpreting()  # the Triton interpreter runs the kernels on CPU tensors (tests)


def _dynamic_triton(linear: nn.Module) -> bool:
    """W8A8 linear with dynamic per-token activations, no smoothing pre-scale, on the Triton backend."""
    if not isinstance(linear, W8A8Linear) or linear.input_scale is not None or linear.pre_quant_scale is not None:
        return False
    return interpreting() or resolve_backend(linear.backend, linear.weight.device) == "triton"


def _prequant_ok(linear: nn.Module) -> bool:
    """W8A8 linear whose activations the producer can quantize as they are: dynamic, no smoothing
    pre-scale, no input Hadamard (the linear rotates its input before quantizing; these producers don't)."""
    return _dynamic_triton(linear) and not getattr(linear, "input_hadamard", 0)


def _hadamard_prequant_ok(linear: nn.Module, width: int) -> bool:
    """W8A8 linear with an input Hadamard that ``silu_mul_hadamard`` applies, then quantizes, for it."""
    block = getattr(linear, "input_hadamard", 0)
    return bool(block) and _dynamic_triton(linear) and silu_mul_hadamard_fits(block, width)


def _rotating(linear: nn.Module) -> bool:
    """W8A8 linear that rotates its own input: given bf16 rows, its forward is right whatever its mode."""
    return isinstance(linear, W8A8Linear) and bool(linear.input_hadamard)


def _apply(linear: nn.Module, x: Tensor | tuple[Tensor, Tensor], out_dtype: torch.dtype) -> Tensor:
    if isinstance(x, tuple):
        return w8a8_gemm_prequant(x[0], x[1], linear.weight, linear.weight_scale, linear.bias, out_dtype)
    return linear(x)


def _fusable(h: Tensor, linear: nn.Module) -> bool:
    return _on_device(h) and (_prequant_ok(linear) or _rotating(linear) or type(linear) is nn.Linear)


class FusedOps:
    """Same interface as ``vlmq.runtime.decode.ReferenceOps``; falls back to it where a kernel
    does not apply (CPU tensors, static/smoothed W8A8, other linear types)."""

    fuse_hadamard = True  # down_proj's input Hadamard inside the SiLU·mul kernel (off: its own forward rotates)
    hadamard_split: str | None = None  # its split mode at decode sizes (fused_hadamard.SPLIT_MODES); None: its choice

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
        rows = gu.reshape(-1, shape[-1])
        if self.fuse_hadamard and _hadamard_prequant_ok(linear, shape[-1] // 2):
            block, split = linear.input_hadamard, self.hadamard_split
            if split and hadamard_split_mode(rows.shape[0], rows.shape[1] // 2, block, rows.device) == "row":
                split = None   # prefill-sized: one program per row whatever was asked for decode
            y = silu_mul_hadamard(rows, block, split)
        else:
            y = silu_mul(rows, quant=_prequant_ok(linear))
        return _apply(linear, y, gu.dtype).view(*shape[:-1], -1)

    def rope_cache(self, qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slots: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
        if not _on_device(qkv) or not qkv.is_contiguous():
            return self.ref.rope_cache(qkv, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim)
        return rope_cache(qkv, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim)

    def attention_o(self, attn: Tensor, o_proj: nn.Module, groups: int) -> Tensor:
        """Prefill: o_proj's input rows from one Triton pass over SDPA's output [B, Hkv, G*T, D]; a
        W8A8 o_proj gets them as int8 + per-token scale from that same pass."""
        b, _, gt, _ = attn.shape
        if not (_fusable(attn, o_proj) and rows_layout_ok(attn, groups)):
            return self.ref.attention_o(attn, o_proj, groups)
        rows = heads_to_rows(attn, quant=_prequant_ok(o_proj), groups=groups)
        return _apply(o_proj, rows, attn.dtype).view(b, gt // groups, -1)

    def decode_attention_o(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, key_valid: Tensor, cur: Tensor,
                           scale: float, o_proj: nn.Module) -> Tensor:
        """Decode attention followed by o_proj; W8A8 o_proj gets its int8 input from the attention."""
        if not _on_device(q):
            return o_proj(decode_attention_reference(q, k_cache, v_cache, key_valid, cur, scale))
        if not _prequant_ok(o_proj):
            return o_proj(decode_attention(q, k_cache, v_cache, key_valid, cur, scale))
        _, q8, s8 = decode_attention_quant(q, k_cache, v_cache, key_valid, cur, scale)
        return _apply(o_proj, (q8, s8), q.dtype).view(q.shape[0], 1, -1)
