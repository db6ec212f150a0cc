"""The quantized state: what the quantize stage decided, per language-model linear and for the model,
in one object that every deployable exporter writes from (none goes back to the snapshot).

Per quantized linear (`LinearState`): the online transform applied to its input (a block Hadamard, R4 of
the rotate step; folded rotations need none), its SmoothQuant factor and the module it is folded into,
its int8 weight and fp32 per-output-channel scale, its (folded) bias, and its activation quantization
(dynamic per-token, or static with the per-tensor scale from calibration). Model-level edits (`edits`):
tensors of the float model that the fold changed: RMSNorm gains, and the columns of LM linears kept bf16 by
the fallback.
Everything else is the live model's own tensor, read when the exporter writes it.
With `quant.kv_cache=fp8` (`kv_cache`), each LM attention module also carries its FP8 KV-cache scales
(`kv_scales`: k_scale, v_scale = calibrated amax / 448, fp32 [1]), read from ModelOpt's `k_bmm_quantizer` /
`v_bmm_quantizer` (`kv_cache_scales`) and written beside the attention module's other tensors.

Built from the live model after ModelOpt's calibration and before ModelOpt smooths it in place
(`build_state`), so the weights are the snapshot's, exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmq.models.families import Family
from vlmq.numerics import FP8_E4M3_MAX, QMAX, quantize_weight_per_channel
from vlmq.quantize.fold import fold_layer, layer_params, per_layer, relative, text_heads


@dataclass
class LinearState:
    weight: torch.Tensor                 # int8 [N, K]
    weight_scale: torch.Tensor           # fp32 [N]
    activations: str                     # "dynamic" (per token) | "static" (per tensor)
    input_scale: float | None = None     # static: max |smoothed input| / 127 from calibration
    bias: torch.Tensor | None = None     # the folded bias, in the model's dtype
    smoothing: torch.Tensor | None = None  # s per input channel (None: unsmoothed)
    folded_into: str | None = None       # the module whose output absorbed s (norm gain, producer rows)
    input_hadamard: int | None = None    # block size of the online Hadamard on its input (R4), else None
    input_amax: float | None = None      # max |smoothed input| from calibration, whatever the activation mode


@dataclass
class QuantizedModel:
    """The live model (its non-LM tensors), the per-linear decisions and the model-level edits."""

    model: nn.Module
    family: Family
    linears: dict[str, LinearState]
    edits: dict[str, torch.Tensor] = field(default_factory=dict)   # full parameter name -> new tensor
    alphas: dict[str, float] = field(default_factory=dict)
    activations: str = "dynamic"
    smooth_o_proj: bool = True
    kv_cache: str = "none"                                          # none | fp8 (quant.kv_cache)
    kv_scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # attention -> k_scale, v_scale
    rotations: dict[str, Any] = field(default_factory=dict)   # what the rotate step folded (residual, values)
    rounding: str = "rtn"                                     # rtn | gptq
    dtype: torch.dtype | None = None   # the checkpoint's float tensors (export.dtype); None: as the model holds
    peaks: dict[str, float] = field(default_factory=dict)   # largest |activation| per module / smoothed input

    def input_hadamards(self) -> dict[str, int]:
        """{linear: block size} of the linears that read an online block Hadamard of their input."""
        return {n: s.input_hadamard for n, s in self.linears.items() if s.input_hadamard}

    def tensors(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(module name, its tensors as a checkpoint stores them), in the model's own order; quantized
        linears give int8 weight + fp32 weight_scale [N, 1] (+ input_scale [1], + bias), tied parameters once,
        LM attention modules their KV-cache k_scale / v_scale [1] (fp8 KV cache), ModelOpt's quantizer buffers
        never."""
        seen: set[int] = set()
        modules = dict(self.model.named_modules())
        for module_name, module in modules.items():
            if "_quantizer" in module_name:
                continue
            if module_name in self.linears:
                yield module_name, linear_tensors(self.linears[module_name], self.dtype)
                continue
            own = {}
            for leaf, tensor in list(module.named_parameters(recurse=False)) + list(
                    (n, b) for n, b in module.named_buffers(recurse=False)
                    if n not in getattr(module, "_non_persistent_buffers_set", set())):
                if tensor.data_ptr() in seen:   # tied (lm_head = embed_tokens): stored once
                    continue
                seen.add(tensor.data_ptr())
                full = f"{module_name}.{leaf}" if module_name else leaf
                # an edit may be held more precisely than the model (rotate.precise_tensors: fp32)
                own[leaf] = _as(self.edits.get(full, tensor).detach(), self.dtype or tensor.dtype)
            own.update(self.kv_scales.get(module_name, {}))
            if own:
                yield module_name, own


def linear_tensors(state: LinearState, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """int8 weight, fp32 scales (always), the bias in `dtype` (None: as held)."""
    out = {"weight": state.weight, "weight_scale": state.weight_scale.float().unsqueeze(1)}
    if state.input_scale is not None:
        out["input_scale"] = torch.tensor([state.input_scale], dtype=torch.float32)
    if state.bias is not None:
        out["bias"] = _as(state.bias, dtype)
    return out


def _as(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def kv_cache_scales(model: nn.Module, family: Family) -> dict[str, dict[str, torch.Tensor]]:
    """{LM attention module: {"k_scale", "v_scale"}}: per-tensor FP8 (E4M3) KV-cache scales, calibrated amax / 448
    in fp32 of shape [1] (ModelOpt's unified export divides its `*_bmm_quantizer` amax the same way)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if not name.startswith(f"{family.layers}.") or "_quantizer" in name:
            continue
        quantizers = {kind: getattr(module, f"{kind}_bmm_quantizer", None) for kind in ("k", "v")}
        if not all(q is not None and q.is_enabled for q in quantizers.values()):
            continue
        scales = {}
        for kind, quantizer in quantizers.items():
            amax = quantizer.amax
            if amax is None or amax.numel() != 1 or not float(amax) > 0:
                raise ValueError(f"{name}.{kind}_bmm_quantizer has no calibrated per-tensor amax ({amax}); "
                                 "the FP8 KV cache needs calibration data through the attention")
            scales[f"{kind}_scale"] = (amax.detach().float().reshape(1) / FP8_E4M3_MAX).cpu()
        out[name] = scales
    return out


def _folded_into(family: Family, rel: str) -> str | None:
    return next((g.producer for g in family.smooth_groups if rel in g.consumers), None)


# (linear name, its smoothed float weight, its smoothing factor or None) -> (int8 weight, fp32 scale [N])
Rounding = Callable[[str, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, torch.Tensor]]


def round_to_nearest(name: str, weight: torch.Tensor, smoothing: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_weight_per_channel(weight)


@torch.no_grad()
def build_state(model: nn.Module, family: Family, act_amax: Mapping[str, torch.Tensor], quantized: Sequence[str],
                alpha: float | Mapping[str, float], activations: str = "dynamic", smooth_o_proj: bool = True,
                rounding: Rounding = round_to_nearest, input_hadamards: Mapping[str, int] | None = None
                ) -> QuantizedModel:
    """Fold SmoothQuant (out of place) and quantize every linear in `quantized`, layer by layer on the
    model's own device; `act_amax` holds the per-input-channel calibration maxima of those linears.
    `input_hadamards` names the linears that read an online Hadamard of their input: they stay unsmoothed."""
    heads, kv_heads = text_heads(model)
    keep = set(quantized)
    hadamards = dict(input_hadamards or {})
    state = QuantizedModel(model, family, {}, activations=activations, smooth_o_proj=smooth_o_proj)
    for i, layer in enumerate(model.get_submodule(family.layers)):
        prefix = f"{family.layers}.{i}"
        alphas = per_layer(alpha, prefix) if isinstance(alpha, Mapping) else alpha
        params = layer_params(layer)
        changed, fold = fold_layer(params, family, per_layer(act_amax, prefix), alphas, heads, kv_heads,
                                   smooth_o_proj, relative(hadamards, prefix))
        for rel in family.linears:
            full = f"{prefix}.{rel}"
            weight = changed.get(f"{rel}.weight", params[f"{rel}.weight"])
            if full not in keep:
                for leaf in ("weight", "bias"):   # a bf16 fallback linear that absorbed a factor
                    if f"{rel}.{leaf}" in changed:
                        state.edits[f"{full}.{leaf}"] = changed[f"{rel}.{leaf}"]
                continue
            q, scale = rounding(full, weight, fold.factors.get(rel))
            state.linears[full] = LinearState(
                weight=q, weight_scale=scale, activations=activations,
                input_scale=fold.input_amax[rel] / QMAX if activations == "static" else None,
                bias=changed.get(f"{rel}.bias", params.get(f"{rel}.bias")),
                smoothing=fold.factors.get(rel), folded_into=_folded_into(family, rel) if rel in fold.factors else None,
                input_hadamard=hadamards.get(full), input_amax=fold.input_amax[rel])
            state.peaks[f"{full} (smoothed input)"] = fold.input_amax[rel]
        for rel, tensor in changed.items():   # norm gains (and producer biases of bf16 linears)
            module = rel.rsplit(".", 1)[0]
            if module not in family.linears:
                state.edits[f"{prefix}.{rel}"] = tensor
    state.alphas = dict(alpha) if isinstance(alpha, Mapping) else {n: float(alpha) for n in quantized}
    return state


def summary(state: QuantizedModel) -> dict[str, Any]:
    return {"quantized": len(state.linears), "edits": len(state.edits), "activations": state.activations,
            "smoothed": sum(s.smoothing is not None for s in state.linears.values()), "rounding": state.rounding,
            "rotations": state.rotations, "input_hadamards": len(state.input_hadamards())}
