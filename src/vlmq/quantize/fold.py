"""SmoothQuant folded into neighbouring weights, so the checkpoint needs no pre_quant_scale.

Convention (ModelOpt's): per input channel j of a linear, s_j = amax_w_j^(1-a) / amax_x_j^a; the
linear sees x*s and holds W/s (columns). Where x*s comes from:
- q/k/v read RMSNorm(x)*g: g <- g*s (q, k and v share s).
- gate/up read post_attention_layernorm: same.
- down_proj reads act(gate(x)) * up(x): up_proj rows (and bias) <- *s. Exact.
- o_proj reads the attention output, linear in V per head: v_proj rows <- *s, with s shared by the
  q-heads of each kv-group per head dimension (GQA), or o_proj is left unsmoothed.
Activation amaxes are ModelOpt's per-channel calibration maxima of the unsmoothed model, so the
smoothed per-tensor input amax is exactly max_j(amax_x_j * s_j).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from vlmq.models.families import Family
from vlmq.numerics import (  # noqa: F401  (EPS, S_MAX, S_MIN, smoothing_factor: re-exported)
    EPS,
    S_MAX,
    S_MIN,
    gqa_shared_factor,
    shared_factor,
    smoothing_factor,
)


def collect_act_amax(quantized_model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-input-channel activation maxima that ModelOpt's calibration recorded (before or after smoothing)."""
    out = {}
    modules = dict(quantized_model.named_modules())
    for name in names:
        quantizer = modules[name].input_quantizer
        amax = getattr(quantizer, "_amax_for_smoothing", None)
        if amax is None and getattr(quantizer, "axis", None) == -1:
            amax = getattr(quantizer, "_amax", None)   # max calibration with per-channel statistics
        if amax is None:
            raise RuntimeError(f"{name} has no SmoothQuant calibration statistics (was it calibrated?)")
        out[name] = amax.detach().float().flatten().cpu()
    return out


@dataclass
class FoldResult:
    factors: dict[str, torch.Tensor]   # linear name -> s (per input channel); absent = unsmoothed
    input_amax: dict[str, float]       # linear name -> per-tensor amax of its (smoothed) input


def alpha_of(alpha: float | Mapping[str, float], name: str) -> float:
    """The SmoothQuant alpha of linear `name`: a per-linear mapping (alpha search) or one value."""
    return float(alpha[name]) if isinstance(alpha, Mapping) else float(alpha)


def _scaled(t: torch.Tensor, s: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` with its rows (dim 0) or columns (dim 1) multiplied by `s`, rounded back to t's dtype."""
    s = s.to(t.device)
    return (t.float() * (s[:, None] if dim == 0 and t.dim() == 2 else s)).to(t.dtype)


@torch.no_grad()
def fold_layer(params: Mapping[str, torch.Tensor], family: Family, act_amax: Mapping[str, torch.Tensor],
               alpha: float | Mapping[str, float], heads: int, kv_heads: int, smooth_o_proj: bool = True,
               unsmoothed: Collection[str] = ()) -> tuple[dict[str, torch.Tensor], FoldResult]:
    """SmoothQuant folded into one decoder layer's tensors, out of place: data in, data out.

    `params` maps names relative to the layer ("input_layernorm.weight", "mlp.up_proj.bias", ...) to
    tensors; `act_amax` and `alpha` are keyed by linear name relative to the layer. Returns the tensors
    that changed and the factors and smoothed per-tensor input amaxes of the linears with statistics.

    The groups come from `family.smooth_groups`. Linears without statistics (kept bf16 by the
    sensitivity fallback) are not quantized: a norm group is smoothed from its members that have
    statistics (one input, so any member's amax serves) and the bf16 members' columns are divided by
    the same factor, which is exact; a linear_rows / attn_v consumer without statistics is left
    unsmoothed, as is any group with a consumer in `unsmoothed` (e.g. one that reads an online Hadamard of
    its input, which no producer can absorb a factor through). Factors are computed from the original
    weights, then applied in a fixed order (attn_v
    groups first, then the others), each step rounding back to the weight's dtype."""
    factors: dict[str, torch.Tensor] = {}
    plans: list[tuple[str, str, tuple[str, ...], torch.Tensor, torch.Tensor]] = []
    for group in family.smooth_groups:
        have = [c for c in group.consumers if c in act_amax]
        if not have or any(c in unsmoothed for c in group.consumers):
            continue
        if group.kind == "norm":
            s = shared_factor(act_amax[have[0]], [params[f"{c}.weight"] for c in have],
                              [alpha_of(alpha, c) for c in have])
            plans.append((group.kind, group.producer, group.consumers, s, s))
            factors.update({c: s for c in have})
        elif group.kind == "linear_rows":
            (consumer,) = group.consumers
            s = smoothing_factor(act_amax[consumer], params[f"{consumer}.weight"].float().abs().amax(dim=0).cpu(),
                                 alpha_of(alpha, consumer))
            plans.append((group.kind, group.producer, group.consumers, s, s))
            factors[consumer] = s
        elif group.kind == "attn_v" and smooth_o_proj:
            (consumer,) = group.consumers
            s_rows, s_cols = gqa_shared_factor(act_amax[consumer], params[f"{consumer}.weight"].cpu(),
                                               alpha_of(alpha, consumer), heads, kv_heads)
            plans.insert(sum(p[0] == "attn_v" for p in plans), (group.kind, group.producer, group.consumers,
                                                                s_rows, s_cols))
            factors[consumer] = s_cols
    out: dict[str, torch.Tensor] = {}

    def current(name: str) -> torch.Tensor:
        return out.get(name, params[name])

    for kind, producer, consumers, s_producer, s_consumer in plans:
        if kind == "norm":   # the norm's gain scales its output channels
            out[f"{producer}.weight"] = _scaled(current(f"{producer}.weight"), s_producer, 0)
        else:                # a linear producer: its output rows (and bias)
            out[f"{producer}.weight"] = _scaled(current(f"{producer}.weight"), s_producer, 0)
            if f"{producer}.bias" in params:
                out[f"{producer}.bias"] = _scaled(current(f"{producer}.bias"), s_producer, 0)
        for consumer in consumers:
            out[f"{consumer}.weight"] = _scaled(current(f"{consumer}.weight"), 1.0 / s_consumer, 1)
    input_amax = {name: float((amax * factors[name].to(amax.device) if name in factors else amax).max())
                  for name, amax in act_amax.items()}
    return out, FoldResult(factors, input_amax)


def layer_params(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in layer.named_parameters()}


def text_heads(model: nn.Module) -> tuple[int, int]:
    text_cfg = getattr(model.config, "text_config", model.config)
    return text_cfg.num_attention_heads, text_cfg.num_key_value_heads


def per_layer(mapping: Mapping[str, object], prefix: str) -> dict[str, object]:
    """Entries of `mapping` under `prefix.`, keyed relative to it."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in mapping.items() if k.startswith(prefix + ".")}


def relative(names: Collection[str], prefix: str) -> set[str]:
    cut = len(prefix) + 1
    return {n[cut:] for n in names if n.startswith(prefix + ".")}


@torch.no_grad()
def fold_smoothquant(model: nn.Module, family: Family, act_amax: dict[str, torch.Tensor],
                     alpha: float | Mapping[str, float], smooth_o_proj: bool = True,
                     unsmoothed: Collection[str] = ()) -> FoldResult:
    """Fold SmoothQuant factors into the (unquantized) model in place, layer by layer (fold_layer);
    return the factors and smoothed input amaxes, keyed by full linear name."""
    heads, kv_heads = text_heads(model)
    result = FoldResult({}, {})
    for i, layer in enumerate(model.get_submodule(family.layers)):
        prefix = f"{family.layers}.{i}"
        alphas = per_layer(alpha, prefix) if isinstance(alpha, Mapping) else alpha
        changed, fold = fold_layer(layer_params(layer), family, per_layer(act_amax, prefix), alphas, heads,
                                   kv_heads, smooth_o_proj, relative(unsmoothed, prefix))
        params = dict(layer.named_parameters())
        for name, tensor in changed.items():
            params[name].data = tensor
        result.factors.update({f"{prefix}.{k}": v for k, v in fold.factors.items()})
        result.input_amax.update({f"{prefix}.{k}": v for k, v in fold.input_amax.items()})
    return result
