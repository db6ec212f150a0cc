"""Qwen2.5-VL's vision tower with each layer's windowed attention in one SDPA call.

Without flash attention, transformers' vision attention splits the packed sequence at
``cu_seqlens`` on the host (``.tolist()``, a device sync per layer) and calls SDPA once per
window: 16 windows per 448-px image, 28 windowed layers, times the images in the batch. That made
the (bf16, unquantized) vision tower 66-510 ms of an image prefill on an H100 against 6-44 ms for
the whole language model.

`batched_window_attention(visual)` swaps every block's attention forward, for the duration of a
``with``, for one that lays the windows out as a padded batch [windows, longest, heads, dim]
and runs a single SDPA over it (a key mask only where windows differ in length). The layout is
planned once per distinct ``cu_seqlens`` tensor (the window one and the full one), so a forward
syncs twice instead of once per layer. Everything else (patch embedding, rotary tables, window
order, MLPs, merger) stays transformers' own code, so the output matches theirs to rounding.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class WindowLayout:
    """Where each token of the packed sequence sits in the padded [windows, longest] batch."""

    slots: Tensor  # [S] flat position in windows * longest
    windows: int
    longest: int
    key_mask: Tensor | None  # [windows, 1, 1, longest] bool, True = a real token; None if all full


def plan_windows(cu_seqlens: Tensor) -> WindowLayout:
    """The padded layout for windows ``[cu_seqlens[i], cu_seqlens[i + 1])`` (empty ones dropped)."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    lengths = [e - s for s, e in zip(bounds, bounds[1:], strict=False) if e > s]
    device = cu_seqlens.device
    longest, windows = max(lengths), len(lengths)
    length = torch.tensor(lengths, device=device)
    offset = torch.arange(longest, device=device)
    real = offset[None, :] < length[:, None]  # [windows, longest]
    slots = (torch.arange(windows, device=device)[:, None] * longest + offset[None, :])[real]
    key_mask = None if all(n == longest for n in lengths) else real[:, None, None, :]
    return WindowLayout(slots, windows, longest, key_mask)


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, layout: WindowLayout, scale: float) -> Tensor:
    """q, k, v [S, H, D] -> [S, H, D]: attention within each window of ``layout``, one SDPA call."""
    s, h, d = q.shape
    padded = []
    for t in (q, k, v):
        p = t.new_zeros(layout.windows * layout.longest, h, d)
        p[layout.slots] = t
        padded.append(p.view(layout.windows, layout.longest, h, d).transpose(1, 2))
    out = F.scaled_dot_product_attention(*padded, attn_mask=layout.key_mask, scale=scale)
    return out.transpose(1, 2).reshape(layout.windows * layout.longest, h, d)[layout.slots]


def _rotary_fn(attn: nn.Module):
    """transformers' ``apply_rotary_pos_emb_vision`` from the module that defines this attention."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision", None)
    if fn is None:
        raise RuntimeError(f"{type(attn).__module__} has no apply_rotary_pos_emb_vision")
    return fn


def supports(visual: nn.Module) -> bool:
    """A Qwen2.5-VL-style tower: blocks whose attention has fused qkv, proj, heads and rotary."""
    blocks = getattr(visual, "blocks", None)
    if not blocks:
        return False
    attn = getattr(blocks[0], "attn", None)
    needed = ("qkv", "proj", "num_heads", "scaling")
    if attn is None or not all(hasattr(attn, name) for name in needed):
        return False
    return getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision", None) is not None


@contextlib.contextmanager
def batched_window_attention(visual: nn.Module) -> Iterator[None]:
    """Inside the ``with``, ``visual``'s blocks run each layer's window attention as one SDPA call.
    A tower this does not recognise (`supports`) runs unchanged."""
    if not supports(visual):
        yield
        return
    layouts: dict[tuple[int, int], tuple[Tensor, WindowLayout]] = {}

    def layout_for(cu_seqlens: Tensor) -> WindowLayout:
        key = (cu_seqlens.data_ptr(), cu_seqlens.numel())
        if key not in layouts:  # hold the tensor: its address cannot be reused while cached
            layouts[key] = (cu_seqlens, plan_windows(cu_seqlens))
        return layouts[key][1]

    def forward(self: nn.Module, hidden_states: Tensor, cu_seqlens: Tensor,
                position_embeddings: tuple[Tensor, Tensor] | None = None, **_: object) -> Tensor:  # fmt: skip
        s = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(s, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = rotary(q, k, cos, sin)
        out = windowed_attention(q, k, v, layout_for(cu_seqlens), self.scaling)
        return self.proj(out.reshape(s, -1))

    attns = [blk.attn for blk in visual.blocks]
    rotary = _rotary_fn(attns[0])
    for attn in attns:
        attn.forward = types.MethodType(forward, attn)
    try:
        yield
    finally:
        for attn in attns:
            del attn.forward  # back to the class's forward
