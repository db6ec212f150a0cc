"""A lean greedy decode loop for Qwen2.5-VL (and Llama-like text LMs), the same for bf16 and W8A8 models.

`LeanDecoder` runs the language model from the HF module's own weights with its own small
forward (RMSNorm, fused q/k/v and gate/up linears, multimodal RoPE, SDPA against a static KV
cache with a validity mask, residuals) so that one decode step has fixed shapes and no
host-side work: on CUDA it is captured once in a CUDA graph and replayed per token, with the
greedy argmax, position/cache counters and the token record all updated inside the graph.
Which modules it runs comes from the model's `Family` (`layout.py`); a model it cannot run as it
is (a layer with other weights, no fused q/k/v in the family, an activation other than SiLU) is
refused with one line (`LeanDecodeError`).

Prefill: text-only or image+text. The vision tower + merger (bf16 in both models) run through
`vision.LeanVision`: the HF blocks' own modules, index work cached per image grid, each layer's
windowed attention as one SDPA call, and with ``graph_prefill`` a CUDA graph per grid. 3-D
mrope positions are computed here like HF's ``get_rope_index`` (text tokens sequential, image
tokens on their t/h/w grid); the LM prefill runs eagerly or, with ``graph_prefill=True``, from a
CUDA graph captured per prompt length. After an image, every decode token uses position
``max(prefill positions) + 1 + step`` on all three rope sections (HF's ``rope_deltas``).

The q/k/v and gate/up weights are concatenated once per layer and the HF modules are rebound to
views of the concatenation, so HF's forward still works and no weight memory is duplicated.
Batches must be left-padded (or unpadded); padded keys are masked.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmq.models.families import family_for
from vlmq.runtime.layout import LeanDecodeError, decode_layers, submodule
from vlmq.runtime.vision import LeanVision, batched_window_attention

__all__ = ["LeanDecodeError", "LeanDecoder", "ReferenceOps", "mrope_positions", "rms_norm"]

# ---------------------------------------------------------------------------
# reference ops (the fused module may replace them on CUDA)
# ---------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Exactly HF's Qwen2_5_VLRMSNorm."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ReferenceOps:
    """The eager torch version of the loop's fusable steps (HF's op order and roundings)."""

    def add_norm_linear(self, h: Tensor, delta: Tensor | None, weight: Tensor, eps: float,
                        linear: nn.Module) -> tuple[Tensor, Tensor]:
        """(h + delta, linear(RMSNorm(h + delta)))."""
        if delta is not None:
            h = h + delta
        return h, linear(rms_norm(h, weight, eps))

    def act_linear(self, gate_up: Tensor, linear: nn.Module) -> Tensor:
        g, u = gate_up.chunk(2, dim=-1)
        return linear(F.silu(g) * u)

    def rope_cache(self, qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                   slots: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
        """Rotate q/k, write k/v into cache ``slots``; returns q [B, H, T, D]."""
        b, t, _ = qkv.shape
        q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        q = q.view(b, t, n_heads, head_dim).transpose(1, 2)
        k = k.view(b, t, n_kv, head_dim).transpose(1, 2)
        v = v.view(b, t, n_kv, head_dim).transpose(1, 2)
        k_cache.index_copy_(2, slots, k * cos + rotate_half(k) * sin)
        v_cache.index_copy_(2, slots, v)
        return q * cos + rotate_half(q) * sin

    def attention_o(self, attn: Tensor, o_proj: nn.Module, groups: int) -> Tensor:
        """o_proj over SDPA's output on grouped queries [B, Hkv, G*T, D] as token rows [B, T, H*D]."""
        b, n_kv, gt, d = attn.shape
        t = gt // groups
        return o_proj(attn.reshape(b, n_kv * groups, t, d).transpose(1, 2).reshape(b, t, n_kv * groups * d))


def mrope_positions(input_ids: Tensor, attention_mask: Tensor, image_grid_thw: Tensor | None,
                    image_token_id: int | None, merge: int) -> tuple[Tensor, Tensor]:
    """(positions [3, B, T] long, next position [B] long) like HF's get_rope_index for images (no image
    token id: text only, positions counted over each row's real tokens)."""
    b, t = input_ids.shape
    pos = torch.zeros(3, b, t, dtype=torch.long)
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    nxt = torch.zeros(b, dtype=torch.long)
    ids_all, mask_all = input_ids.cpu(), attention_mask.cpu().bool()
    for row in range(b):
        ids = ids_all[row][mask_all[row]]
        is_img = (ids == image_token_id).tolist() if image_token_id is not None else [False] * len(ids)
        parts, cur, i = [], 0, 0
        while i < len(ids):
            j = i
            while j < len(ids) and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                parts.append(torch.arange(j - i).view(1, -1).expand(3, -1) + cur)
                cur += j - i
                i = j
                continue
            gt, gh, gw = next(grids)
            gh, gw = gh // merge, gw // merge
            n = gt * gh * gw
            tt, hh, ww = torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij")
            parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(gt, gh, gw)
            i += n  # a run may hold several consecutive images
        cat = torch.cat(parts, dim=1)
        pos[:, row, mask_all[row]] = cat
        nxt[row] = cat.max() + 1
    return pos.to(input_ids.device), nxt.to(input_ids.device)


class LeanDecoder:
    """Greedy generation for one batch size with a static KV cache of ``max_len`` tokens."""

    def __init__(self, model: nn.Module, batch: int, max_len: int, graphs: bool | None = None,
                 graph_prefill: bool = False, fused_ops: bool | None = None, lean_vision: bool = True) -> None:
        self.model = model
        self.lean_vision = lean_vision  # vision tower via runtime/vision.py (else transformers' forward)
        self._vision: LeanVision | None = None
        family = family_for(model.config.model_type)
        cfg = model.config.get_text_config()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise LeanDecodeError(f"the lean decode loop runs a SiLU MLP; {family.name}'s is {cfg.hidden_act}")
        self.embed = submodule(model, family.embed, family, "token embedding")
        self.norm_w = submodule(model, family.final_norm, family, "final norm").weight
        self.lm_head = submodule(model, family.lm_head, family, "lm_head")
        rot = submodule(model, family.rotary_emb, family, "rotary embedding")
        self.visual = submodule(model, family.vision[0], family, "vision tower") if family.vision else None
        self.family_name = family.name
        self.device = self.embed.weight.device
        self.dtype = self.embed.weight.dtype
        self.batch, self.max_len = batch, max_len
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.inv_freq = rot.inv_freq.float().to(self.device)
        self.rope_scaling = float(getattr(rot, "attention_scaling", 1.0))
        rp = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        self.mrope_section = list(getattr(rot, "mrope_section", None) or rp.get("mrope_section") or [])
        self.image_token_id = model.config.image_token_id if self.visual is not None else None
        self.merge = model.config.vision_config.spatial_merge_size if self.visual is not None else 1
        kv = self.n_kv * self.head_dim
        self.layers = decode_layers(model, family, (self.n_heads * self.head_dim, kv, kv))
        dev, n_layers = self.device, len(self.layers)
        shape = (n_layers, batch, self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=dev)
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=dev)
        self.kidx = torch.arange(max_len, device=dev)
        # decode state, all on the device so one graph replay advances everything
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)  # rope position of `tok`
        self.cur = torch.zeros(1, dtype=torch.long, device=dev)  # cache slot of `tok`
        self.step_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(batch, max_len, dtype=torch.long, device=dev)
        self.logits = torch.zeros(batch, self.lm_head.weight.shape[0], dtype=torch.float32, device=dev)
        self.use_graphs = (self.device.type == "cuda") if graphs is None else graphs
        self.graph_prefill = graph_prefill and self.use_graphs
        self._graph: Any = None
        self._prefill_graphs: dict[int, tuple[Any, dict[str, Tensor]]] = {}
        self._last_prefill_graph: Any = None
        self._pool: Any = None
        self._stream: Any = None  # the capture side stream (one per decoder)
        self.ops: Any = ReferenceOps()
        self.fused_ops = (self.device.type == "cuda") if fused_ops is None else fused_ops
        if self.fused_ops:
            from vlmq.runtime.ops import FusedOps

            self.ops = FusedOps(self.ops)

    # -- building blocks ------------------------------------------------------

    def rope(self, pos3: Tensor) -> tuple[Tensor, Tensor]:
        """pos3 [3, B, T] -> cos, sin [B, 1, T, D] in the model dtype (HF's mrope recomposition)."""
        freqs = pos3[..., None].float() * self.inv_freq
        if self.mrope_section:
            chunks = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)
        else:
            freqs = freqs[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.rope_scaling, emb.sin() * self.rope_scaling
        return cos.to(self.dtype).unsqueeze(1), sin.to(self.dtype).unsqueeze(1)

    def _group_mask(self, mask: Tensor) -> Tensor:
        """[B, 1, T, S] -> [B, 1, G*T, S]: GQA runs as Hkv heads of G*T grouped queries."""
        b, _, t, s = mask.shape
        g = self.n_heads // self.n_kv
        m = mask.unsqueeze(2).expand(b, 1, g, t, s).reshape(b, 1, g * t, s)
        # additive once per forward, not a bool -> float conversion inside every layer's SDPA
        return torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill_(~m, float("-inf"))

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, gmask: Tensor) -> Tensor:
        """q [B, H, T, D] against k/v [B, Hkv, S, D] -> [B, Hkv, G*T, D] (the G query heads of a kv
        head stacked along the sequence, in SDPA's own memory layout)."""
        b, h, t, d = q.shape
        qg = q.reshape(b, self.n_kv, (h // self.n_kv) * t, d)
        return F.scaled_dot_product_attention(qg, k, v, attn_mask=gmask, scale=self.scale)

    def _layers(self, h: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, mask: Tensor, kv_len: int | None) -> Tensor:
        """All decoder layers over h [B, T, H]; writes K/V at cache ``slots`` [T]; attends to the
        first ``kv_len`` cache slots (None = all) under ``mask`` [B, 1, T, S]; returns the final
        residual stream (before the last norm)."""
        ops, delta = self.ops, None
        kernel_attn = kv_len is None and h.shape[1] == 1 and hasattr(ops, "decode_attention_o")
        gmask = None if kernel_attn else self._group_mask(mask)
        for i, layer in enumerate(self.layers):
            h, qkv = ops.add_norm_linear(h, delta, layer.ln1, self.eps, layer.qkv)
            kc, vc = self.k_cache[i], self.v_cache[i]
            q = ops.rope_cache(qkv, cos, sin, kc, vc, slots, self.n_heads, self.n_kv, self.head_dim)
            if kernel_attn:  # decode: split-S Triton attention over the valid cache slots <= cur
                attn_out = ops.decode_attention_o(q, kc, vc, self.key_valid, self.cur, self.scale, layer.o)
            else:
                if kv_len is not None:
                    kc, vc = kc[:, :, :kv_len], vc[:, :, :kv_len]
                attn_out = ops.attention_o(self._attention(q, kc, vc, gmask), layer.o, self.n_heads // self.n_kv)
            h, gate_up = ops.add_norm_linear(h, attn_out, layer.ln2, self.eps, layer.gate_up)
            delta = ops.act_linear(gate_up, layer.down)
        return h + delta

    def _head(self, h_last: Tensor) -> None:
        """Final norm + lm_head on [B, H]; logits and the greedy token into the static buffers."""
        logits = self.lm_head(rms_norm(h_last, self.norm_w, self.eps)).float()
        self.logits.copy_(logits)
        self.tok.copy_(logits.argmax(-1))
        self.tokens.index_copy_(1, self.step_idx, self.tok[:, None])

    # -- decode step ------------------------------------------------------------

    def _decode_step(self) -> None:
        self.pos.add_(1)
        self.cur.add_(1)
        self.step_idx.add_(1)
        self.key_valid.index_fill_(1, self.cur, True)
        mask = (self.key_valid & (self.kidx <= self.cur))[:, None, None, :]
        cos, sin = self.rope(self.pos.view(1, -1, 1).expand(3, -1, 1))
        h = self.embed(self.tok)[:, None]
        h = self._layers(h, cos, sin, self.cur, mask, None)
        self._head(h[:, -1])

    def _capture(self) -> None:
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # JIT compiles, cuBLAS handles, split-K workspaces: outside the capture
                self._decode_step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode_step()
        torch.cuda.synchronize(self.device)
        self._graph = graph

    def _side_stream(self) -> Any:
        # one per decoder: cuBLAS keeps a workspace for every stream it has run on
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    @torch.no_grad()
    def step(self) -> None:
        """One greedy token for every row (state stays on the device)."""
        if self._graph is not None:
            self._graph.replay()
        else:
            self._decode_step()

    # -- prefill ----------------------------------------------------------------

    @torch.no_grad()
    def embed_inputs(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                     image_grid_thw: Tensor | None = None) -> Tensor:
        """Token embeddings with the vision tower's merged features scattered into image tokens."""
        emb = self.embed(input_ids)
        if pixel_values is None:
            return emb
        feats = self._image_features(pixel_values, image_grid_thw)
        mask = input_ids == self.image_token_id
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"{int(mask.sum())} image tokens but {feats.shape[0]} image features")
        return emb.masked_scatter(mask[..., None], feats.to(emb.dtype))

    def _image_features(self, pixel_values: Tensor, image_grid_thw: Tensor) -> Tensor:
        """Merged vision features [image tokens, hidden]: `LeanVision` (per-grid plan, CUDA graph with
        ``graph_prefill``) where the tower is recognised, else transformers' ``get_image_features``."""
        visual = self.visual
        if visual is None:
            raise LeanDecodeError(f"image inputs, but family {self.family_name} has no vision tower")
        if self.lean_vision and LeanVision.supports(visual):
            if self._vision is None:
                graphs = self.graph_prefill  # the Triton norm/SiLU kernels only inside the graph
                self._vision = LeanVision(visual, graphs=graphs, fused=self.fused_ops and graphs)
            return self._vision(pixel_values, image_grid_thw)
        with batched_window_attention(visual) if self.lean_vision else contextlib.nullcontext():
            out = self.model.get_image_features(pixel_values.to(self.device), image_grid_thw.to(self.device))
        feats = getattr(out, "pooler_output", None)
        if feats is None:  # versions that return the merged features directly (or as last_hidden_state)
            feats = getattr(out, "last_hidden_state", out)
        return torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats

    def _prefill_lm(self, emb: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> None:
        t = emb.shape[1]
        h = self._layers(emb, cos, sin, self.kidx[:t], mask, t)
        self._head(h[:, -1])

    def _prefill_graphed(self, emb: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> None:
        t = emb.shape[1]
        if t not in self._prefill_graphs:
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            static = {"emb": emb.clone(), "cos": cos.clone(), "sin": sin.clone(), "mask": mask.clone()}
            stream = self._side_stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._prefill_lm(**static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._prefill_lm(**static)
            self._prefill_graphs[t] = (graph, static)
        graph, static = self._prefill_graphs[t]
        for name, value in (("emb", emb), ("cos", cos), ("sin", sin), ("mask", mask)):
            static[name].copy_(value)
        graph.replay()
        self._last_prefill_graph = graph

    def replay_lm_prefill(self) -> None:
        """Run the language-model part of the last graphed prefill again (same inputs): lets a
        benchmark time the quantized part apart from the vision tower and the input preparation."""
        if self._last_prefill_graph is None:
            raise RuntimeError("no graphed prefill to replay (graph_prefill=True on CUDA, then prefill())")
        self._last_prefill_graph.replay()

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                image_grid_thw: Tensor | None = None, **_: Any) -> Tensor:
        """Run the prompt; returns the greedy first token [B] (also in ``tokens[:, 0]``)."""
        input_ids = input_ids.to(self.device)
        b, t = input_ids.shape
        if b != self.batch:
            raise ValueError(f"this decoder was built for batch {self.batch}, got {b}")
        if t >= self.max_len:
            raise ValueError(f"prompt of {t} tokens does not fit a cache of {self.max_len}")
        am = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)).bool()
        if not bool(am[:, -1].all()):
            raise ValueError("LeanDecoder needs left padding (the last prompt token of every row must be real)")
        if self.use_graphs and self._graph is None:
            self._capture()  # before the state below is set: the warm-up steps scribble on it
        emb = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
        pos3, nxt = mrope_positions(input_ids, am, image_grid_thw, self.image_token_id, self.merge)
        cos, sin = self.rope(pos3)
        self.key_valid.zero_()
        self.key_valid[:, :t] = am
        causal = self.kidx[:t, None] >= self.kidx[None, :t]
        mask = (causal[None] & am[:, None, :]) | torch.eye(t, dtype=torch.bool, device=self.device)[None]
        mask = mask[:, None]
        self.step_idx.zero_()
        if self.graph_prefill:
            self._prefill_graphed(emb, cos, sin, mask)
        else:
            self._prefill_lm(emb, cos, sin, mask)
        self.pos.copy_(nxt - 1)  # the step adds one before using it
        self.cur.fill_(t - 1)
        return self.tok.clone()

    @torch.no_grad()
    def generate(self, inputs: dict[str, Tensor], max_new_tokens: int) -> Tensor:
        """Greedy tokens [B, max_new_tokens] (no stopping at EOS)."""
        t = inputs["input_ids"].shape[1]
        if t + max_new_tokens > self.max_len:
            raise ValueError(f"{t} + {max_new_tokens} tokens exceed the cache of {self.max_len}")
        self.prefill(**inputs)
        for _ in range(max_new_tokens - 1):
            self.step()
        return self.tokens[:, :max_new_tokens].clone()


