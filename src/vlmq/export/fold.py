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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlmq.models.families import Family

# ModelOpt's guards (model_calib.smoothquant): zero-amax channels get s=1; s is clamped.
S_MIN, S_MAX, EPS = 1e-4, 1e4, 1.0 / (1 << 31)


def smoothing_factor(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    act_amax, weight_amax = act_amax.float(), weight_amax.float()
    s = weight_amax.pow(1 - alpha) / act_amax.pow(alpha)
    s = torch.where(act_amax <= EPS, torch.ones_like(s), s)
    s = torch.nan_to_num(s, nan=1.0, posinf=S_MAX)
    return s.clamp(S_MIN, S_MAX)


def collect_act_amax(quantized_model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Per-input-channel activation maxima recorded by ModelOpt's SmoothQuant calibration."""
    out = {}
    modules = dict(quantized_model.named_modules())
    for name in names:
        quantizer = modules[name].input_quantizer
        amax = getattr(quantizer, "_amax_for_smoothing", None)
        if amax is None:
            raise RuntimeError(f"{name} has no SmoothQuant calibration statistics (was it calibrated?)")
        out[name] = amax.detach().float().flatten().cpu()
    return out


@dataclass
class FoldResult:
    factors: dict[str, torch.Tensor]   # linear name -> s (per input channel); absent = unsmoothed
    input_amax: dict[str, float]       # linear name -> per-tensor amax of its (smoothed) input


def _scale_cols(linear: nn.Linear, inv: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.data.float() * inv[None, :]).to(linear.weight.dtype)


def _scale_rows(linear: nn.Linear, s: torch.Tensor) -> None:
    linear.weight.data = (linear.weight.data.float() * s[:, None]).to(linear.weight.dtype)
    if linear.bias is not None:
        linear.bias.data = (linear.bias.data.float() * s).to(linear.bias.dtype)


def _col_amax(*linears: nn.Linear) -> torch.Tensor:
    return torch.stack([lin.weight.detach().float().abs().amax(dim=0) for lin in linears]).amax(dim=0).cpu()


def shared_factor(act_amax: torch.Tensor, linears: tuple[nn.Linear, ...],
                  alpha: float | Sequence[float]) -> torch.Tensor:
    """One factor for linears that read the same input: the mean of their own factors.

    This is how ModelOpt's export re-smooths fused q/k/v and gate/up; measured on the outlier test
    model it beats one factor from the group's joint weight maxima (docs/QUANTIZATION.md, "Two export formats").
    `alpha` is one value, or one per linear (quant.alpha_search gives a group one alpha anyway)."""
    alphas = [alpha] * len(linears) if isinstance(alpha, (int, float)) else list(alpha)
    return torch.stack([smoothing_factor(act_amax, _col_amax(lin), a)
                        for lin, a in zip(linears, alphas, strict=True)]).mean(dim=0)


def alpha_of(alpha: float | Mapping[str, float], name: str) -> float:
    """The SmoothQuant alpha of linear `name`: a per-linear mapping (alpha search) or one value."""
    return float(alpha[name]) if isinstance(alpha, Mapping) else float(alpha)


def _group_factor(layer: nn.Module, prefix: str, names: tuple[str, ...], amax: dict[str, torch.Tensor],
                  alpha: float | Mapping[str, float]) -> torch.Tensor | None:
    """Shared factor of the linears `names` (one input) from those with statistics; None if none has."""
    have = [n for n in names if n in amax]
    if not have:
        return None
    return shared_factor(amax[have[0]], tuple(layer.get_submodule(n) for n in have),
                         [alpha_of(alpha, f"{prefix}.{n}") for n in have])


@torch.no_grad()
def fold_smoothquant(model: nn.Module, family: Family, act_amax: dict[str, torch.Tensor],
                     alpha: float | Mapping[str, float], smooth_o_proj: bool = True) -> FoldResult:
    """Fold SmoothQuant factors into the (unquantized) model in place; return factors and input amaxes.

    `alpha` is one value or a per-linear mapping (quant.alpha_search). Linears without activation
    statistics (kept bf16 by the sensitivity fallback) are not quantized: a q/k/v or gate/up group
    is smoothed from its members that have statistics (they share one input, so any member's amax
    serves), and the bf16 members' columns are divided by the same factor, which is exact; without
    statistics for down_proj or o_proj, that linear's input is left unsmoothed.

    All factors are computed from the original weights first, then applied (rows and columns of a
    weight are scaled independently, so the order of application does not matter)."""
    layers = model.get_submodule(family.layers)
    text_cfg = getattr(model.config, "text_config", model.config)
    heads, kv_heads = text_cfg.num_attention_heads, text_cfg.num_key_value_heads
    factors: dict[str, torch.Tensor] = {}
    input_amax: dict[str, float] = {}
    plans = []
    for i, layer in enumerate(layers):
        prefix = f"{family.layers}.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        amax = {k: act_amax[f"{prefix}.{k}"] for k in family.linears if f"{prefix}.{k}" in act_amax}
        s_qkv = _group_factor(layer, prefix, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                              amax, alpha)
        s_mlp = _group_factor(layer, prefix, ("mlp.gate_proj", "mlp.up_proj"), amax, alpha)
        s_down = None
        if "mlp.down_proj" in amax:
            s_down = smoothing_factor(amax["mlp.down_proj"], _col_amax(mlp.down_proj),
                                      alpha_of(alpha, f"{prefix}.mlp.down_proj"))
        s_o = None
        if smooth_o_proj and "self_attn.o_proj" in amax:
            head_dim = attn.o_proj.in_features // heads
            group = heads // kv_heads
            # channel (h, d) of o_proj's input comes from kv-head h // group, dim d: share s there
            x_g = amax["self_attn.o_proj"].view(kv_heads, group, head_dim).amax(dim=1)
            w_g = _col_amax(attn.o_proj).view(kv_heads, group, head_dim).amax(dim=1)
            s_kv = smoothing_factor(x_g, w_g, alpha_of(alpha, f"{prefix}.self_attn.o_proj"))  # [kv_heads, head_dim]
            s_o = s_kv[:, None, :].expand(kv_heads, group, head_dim).reshape(-1)
            plans.append((attn.v_proj, attn.o_proj, s_kv.reshape(-1), s_o))
        if s_qkv is not None:
            plans.append((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj), s_qkv, None))
        if s_mlp is not None:
            plans.append((layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj), s_mlp, None))
        if s_down is not None:
            plans.append((mlp.up_proj, mlp.down_proj, s_down, None))
        for name, s in (("self_attn.q_proj", s_qkv), ("self_attn.k_proj", s_qkv), ("self_attn.v_proj", s_qkv),
                        ("mlp.gate_proj", s_mlp), ("mlp.up_proj", s_mlp), ("mlp.down_proj", s_down),
                        ("self_attn.o_proj", s_o)):
            if name not in amax:
                continue   # kept bf16: no factor, no input scale
            full = f"{prefix}.{name}"
            if s is not None:
                factors[full] = s
            input_amax[full] = float((amax[name] * (s if s is not None else 1.0)).max())
    for producer, consumers, s, s_consumer in plans:
        if isinstance(consumers, nn.Linear):   # producer is a linear: scale its output rows
            _scale_rows(producer, s.to(producer.weight.device))
            s_in = s if s_consumer is None else s_consumer
            _scale_cols(consumers, (1.0 / s_in).to(consumers.weight.device))
        else:                                   # producer is a norm: scale its gain
            producer.weight.data = (producer.weight.data.float() * s.to(producer.weight.device)).to(
                producer.weight.dtype)
            for lin in consumers:
                _scale_cols(lin, (1.0 / s).to(lin.weight.device))
    return FoldResult(factors=factors, input_amax=input_amax)
