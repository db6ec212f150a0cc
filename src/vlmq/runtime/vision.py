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

`LeanVision` goes one step further for the decode loop: the per-grid index work (window order,
rotary tables, window layouts; host loops in transformers) is done once per image grid and cached,
the tower runs as a short loop over the HF blocks' own modules, and on CUDA that loop is captured
in a CUDA graph per grid and replayed (no Python per layer).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmq.runtime.fusion import can_fuse, fuse_linears, pad_input_features


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


def attend(attn: nn.Module, x: Tensor, layout: WindowLayout, cos_sin: tuple[Tensor, Tensor], rotary) -> Tensor:
    """One vision attention module (HF's weights) on x [S, C]: qkv, rotary, windowed SDPA, proj."""
    s = x.shape[0]
    q, k, v = attn.qkv(x).reshape(s, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *cos_sin)
    return attn.proj(windowed_attention(q, k, v, layout, attn.scaling).reshape(s, -1))


def _defined_with(obj: nn.Module, name: str):
    """The function ``name`` of the transformers module that defines ``obj``'s class, or None."""
    return getattr(sys.modules[type(obj).__module__], name, None)


def _rotary_fn(attn: nn.Module):
    """transformers' ``apply_rotary_pos_emb_vision`` from the module that defines this attention."""
    fn = _defined_with(attn, "apply_rotary_pos_emb_vision")
    if fn is None:
        raise RuntimeError(f"{type(attn).__module__} has no apply_rotary_pos_emb_vision")
    return fn


def attention_patchable(visual: nn.Module) -> bool:
    """A Qwen2.5-VL-style tower whose attention runs transformers' per-window SDPA loop: blocks
    with fused qkv, proj, heads and the rotary helper, and no flash attention (varlen already)."""
    config = getattr(visual, "config", None)
    if "flash" in str(getattr(config, "_attn_implementation", "") or ""):
        return False
    blocks = getattr(visual, "blocks", None)
    if not blocks:
        return False
    attn = getattr(blocks[0], "attn", None)
    needed = ("qkv", "proj", "num_heads", "scaling")
    if attn is None or not all(hasattr(attn, name) for name in needed):
        return False
    return _defined_with(attn, "apply_rotary_pos_emb_vision") is not None


@contextlib.contextmanager
def batched_window_attention(visual: nn.Module) -> Iterator[None]:
    """Inside the ``with``, ``visual``'s blocks run each layer's window attention as one SDPA call.
    A tower this does not recognise (`attention_patchable`) runs unchanged; a forward already set on
    an attention instance (a hook) is put back afterwards."""
    if not attention_patchable(visual):
        yield
        return
    if getattr(visual, "_vlmq_batched_windows", False):
        raise RuntimeError("batched_window_attention is already active on this vision tower")
    layouts: dict[tuple[int, int], tuple[Tensor, WindowLayout]] = {}

    def layout_for(cu_seqlens: Tensor) -> WindowLayout:
        key = (cu_seqlens.data_ptr(), cu_seqlens.numel())
        if key not in layouts:  # hold the tensor: its address cannot be reused while cached
            layouts[key] = (cu_seqlens, plan_windows(cu_seqlens))
        return layouts[key][1]

    def forward(self: nn.Module, hidden_states: Tensor, cu_seqlens: Tensor,
                position_embeddings: tuple[Tensor, Tensor] | None = None, **_: object) -> Tensor:  # fmt: skip
        return attend(self, hidden_states, layout_for(cu_seqlens), position_embeddings, rotary)

    attns = [blk.attn for blk in visual.blocks]
    rotary = _rotary_fn(attns[0])
    saved = [vars(attn).get("forward") for attn in attns]
    for attn in attns:
        attn.forward = types.MethodType(forward, attn)
    object.__setattr__(visual, "_vlmq_batched_windows", True)
    try:
        yield
    finally:
        object.__setattr__(visual, "_vlmq_batched_windows", False)
        for attn, before in zip(attns, saved, strict=True):
            if before is None:
                del attn.forward  # back to the class's forward
            else:
                attn.forward = before


_INDEX_HELPERS = ("get_vision_position_ids", "get_vision_attention_seqlens", "get_vision_window_index")


def _index_helpers(visual: nn.Module) -> list | None:
    """transformers' own window/position index functions, as imported by the tower's module."""
    fns = [_defined_with(visual, name) for name in _INDEX_HELPERS]
    return None if None in fns else fns


@dataclass(frozen=True)
class GridPlan:
    """Everything about an image grid that transformers recomputes (on the host) every forward."""

    window_index: Tensor  # [S / merge unit]: merged-patch order with each window contiguous
    reverse: Tensor  # [S / merge unit]: back to the processor's order
    cos_sin: tuple[Tensor, Tensor]  # rotary tables [S, head_dim], in window order
    window: WindowLayout
    full: WindowLayout


def plan_grid(visual: nn.Module, grid_thw: Tensor) -> GridPlan:
    """Window order, rotary tables and both attention layouts for ``grid_thw`` (on its device)."""
    position_ids_fn, seqlens_fn, window_fn = _index_helpers(visual)
    merge, unit = visual.spatial_merge_size, visual.spatial_merge_unit
    position_ids = position_ids_fn(grid_thw, merge)
    cu_seqlens, _ = seqlens_fn(grid_thw, visual.config)
    window_index, cu_window = window_fn(grid_thw, spatial_merge_size=merge, window_size=visual.window_size,
                                        patch_size=visual.patch_size)  # fmt: skip
    window_index = window_index.to(grid_thw.device)
    cos, sin = visual.rotary_pos_emb(torch.empty(0, device=grid_thw.device), position_ids)
    n = cos.shape[0]
    cos, sin = (t.reshape(n // unit, unit, -1)[window_index].reshape(n, -1) for t in (cos, sin))
    return GridPlan(window_index, torch.argsort(window_index), (cos, sin), plan_windows(cu_window),
                    plan_windows(cu_seqlens))  # fmt: skip


MLP_PAD = 64  # the 3B tower's MLP width 3420 -> 3456: cuBLAS ran 3420 at 180-230 TFLOP/s on an H100


class PaddedMLP(nn.Module):
    """The HF vision MLP ``down(act(gate(x)) * up(x))`` with gate/up fused into one GEMM and the
    hidden width zero-padded to a multiple of ``MLP_PAD`` (padded units are exactly 0: act(0) * 0).
    The HF modules are rebound to views of the padded weights: no second copy."""

    def __init__(self, mlp: nn.Module, fused: bool = False) -> None:
        super().__init__()
        self.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj], pad_to=MLP_PAD)
        self.down = pad_input_features(mlp.down_proj, MLP_PAD)
        self.act = mlp.act_fn
        self.silu_mul = None
        if fused and type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"):  # the loop's Triton SiLU * up
            from vlmq.runtime.fused import silu_mul

            self.silu_mul = silu_mul

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up(x)
        if self.silu_mul is not None:
            return self.down(self.silu_mul(gate_up, quant=False))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(self.act(gate) * up)

    @staticmethod
    def supports(mlp: nn.Module) -> bool:
        parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        return hasattr(mlp, "act_fn") and all(type(p) is nn.Linear for p in parts) and can_fuse(parts[:2])


def tower_forward(visual: nn.Module, pixels: Tensor, plan: GridPlan, rotary, mlps: list[nn.Module],
                  fused: bool = False) -> Tensor:  # fmt: skip
    """HF's vision forward on precomputed indices: patches -> window order -> blocks -> merger. With
    ``fused`` (CUDA), each residual add + RMSNorm is the decode loop's one-pass Triton kernel."""
    h = visual.patch_embed(pixels)
    s, unit = h.shape[0], visual.spatial_merge_unit
    h = h.reshape(s // unit, unit, -1)[plan.window_index].reshape(s, -1)
    blocks = list(visual.blocks)
    if fused:
        from vlmq.runtime.fused import add_rms_norm

    def add_norm(h: Tensor, delta: Tensor | None, norm: nn.Module | None) -> tuple[Tensor, Tensor | None]:
        if norm is None:  # after the last block: the merger norms itself
            return h + delta, None
        if fused:
            return add_rms_norm(h, delta, norm.weight, norm.variance_epsilon, quant=False)
        h = h if delta is None else h + delta
        return h, norm(h)

    h, x = add_norm(h.contiguous(), None, blocks[0].norm1)
    for i, (blk, mlp) in enumerate(zip(blocks, mlps, strict=True)):
        layout = plan.full if i in visual.fullatt_block_indexes else plan.window
        h, x = add_norm(h, attend(blk.attn, x, layout, plan.cos_sin, rotary), blk.norm2)
        h, x = add_norm(h, mlp(x), blocks[i + 1].norm1 if i + 1 < len(blocks) else None)
    return visual.merger(h)[plan.reverse]


class LeanVision:
    """Merged image features [tokens, out_dim] for ``(pixel_values, image_grid_thw)``, as
    ``get_image_features`` returns them concatenated; with ``graphs``, replayed from a CUDA graph per
    grid (the returned tensor is that graph's output buffer: the next call with the same grid reuses it)."""

    MAX_GRAPHS = 4  # graphs kept (least recently used dropped): each holds the tower's working set

    def __init__(self, visual: nn.Module, graphs: bool, fused: bool | None = None) -> None:
        self.visual, self.graphs = visual, graphs
        self.rotary = _rotary_fn(visual.blocks[0].attn)
        weight = visual.patch_embed.proj.weight
        self.dtype = weight.dtype
        # the decode loop's Triton norm / SiLU kernels (CUDA, bf16/fp16 like the loop's), by default only
        # inside a graph: launched eagerly from Python they cost more host time than they save
        self.fused = (weight.is_cuda and weight.dtype != torch.float32 and graphs) if fused is None else fused
        norms_ok = all(hasattr(b, n) and hasattr(getattr(b, n), "variance_epsilon") for b in visual.blocks
                       for n in ("norm1", "norm2"))  # fmt: skip
        self.fused = self.fused and norms_ok
        self.mlps = [PaddedMLP(b.mlp, self.fused) if PaddedMLP.supports(b.mlp) else b.mlp for b in visual.blocks]
        self._plans: dict[tuple, GridPlan] = {}
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = OrderedDict()
        self._stream: torch.cuda.Stream | None = None  # one capture stream (cuBLAS keeps a workspace per stream)

    @staticmethod
    def supports(visual: nn.Module) -> bool:
        """The tower's module has transformers' index helpers (5.x since they moved to vision_utils),
        and its rotary module is the ``(x, position_ids) -> (cos, sin)`` kind that goes with them."""
        rotary = getattr(visual, "rotary_pos_emb", None)
        try:
            params = list(inspect.signature(rotary.forward).parameters) if rotary is not None else []
        except (TypeError, ValueError):
            params = []
        return (attention_patchable(visual) and _index_helpers(visual) is not None
                and hasattr(visual, "fullatt_block_indexes") and params[:2] == ["x", "position_ids"])  # fmt: skip

    @torch.no_grad()
    def __call__(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        key = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())
        device = self.visual.patch_embed.proj.weight.device
        if key not in self._plans:
            self._plans[key] = plan_grid(self.visual, grid_thw.to(device))
        plan, pixels = self._plans[key], pixel_values.to(device=device, dtype=self.dtype)
        if not self.graphs:
            return tower_forward(self.visual, pixels, plan, self.rotary, self.mlps, self.fused)
        if key not in self._graphs:
            if len(self._graphs) >= self.MAX_GRAPHS:
                self._graphs.popitem(last=False)
            static = pixels.clone()
            self._stream = self._stream or torch.cuda.Stream(device=device)
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):  # warm-up outside the capture (lazy inits, kernel choice)
                tower_forward(self.visual, static, plan, self.rotary, self.mlps, self.fused)
            torch.cuda.current_stream().wait_stream(self._stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                out = tower_forward(self.visual, static, plan, self.rotary, self.mlps, self.fused)
            self._graphs[key] = (graph, static, out)
        self._graphs.move_to_end(key)
        graph, static, out = self._graphs[key]
        static.copy_(pixels)
        graph.replay()
        return out
