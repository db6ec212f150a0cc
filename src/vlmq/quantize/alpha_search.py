"""Per-layer SmoothQuant strength (`quant.alpha_search=true`).

ModelOpt stays the engine: `mtq.quantize` runs its max calibration with per-input-channel
activation statistics (recipe with `axis=-1` inputs, exactly what its `smoothquant` does first),
while forward pre-hooks keep a random subsample of every LM linear's real (bf16) calibration inputs.
For each shared-input group of a decoder layer (`Family.shared_inputs`: the readers of one norm, e.g.
q/k/v and gate/up, and every other linear alone) and each alpha of the grid, the W8A8 output is
simulated in float32:

    s    = mean over the group's members of amax_w^(1-a) / amax_x^a   (the exports' shared factor)
    x_q  = int8 per-tensor static quantization of x*s, scale max_j(amax_x_j*s_j)/127
    W_q  = int8 per-output-channel quantization of W/s
    err  = sum over members of ||x_q W_q^T - x W^T||^2

and the group takes the alpha with the least error (ties go to the alpha nearest `quant.alpha`).
Then every linear is smoothed with its group's alpha by ModelOpt's own smoothquant postprocess,
replicated here per module: per-tensor input amax, `_amax_for_smoothing` kept, the same zero/clamp
guards, and ModelOpt's `apply_pre_quant_scale_and_smooth`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmq.models.families import Family
from vlmq.numerics import (
    EPS,
    S_MAX,
    S_MIN,
    fake_quant_activations,
    fake_quant_weight,
    gqa_shared_factor,
    shared_factor,
)

log = logging.getLogger(__name__)


def layer_groups(family: Family, num_layers: int, names: Sequence[str]) -> list[list[str]]:
    """Full names of the linears in `names`, grouped by shared input (`family.shared_inputs`), layer by layer."""
    keep = set(names)
    out = []
    for i in range(num_layers):
        for group in family.shared_inputs:
            members = [m for m in (f"{family.layers}.{i}.{lin}" for lin in group) if m in keep]
            if members:
                out.append(members)
    return out


class InputSampler:
    """Forward pre-hooks keeping a uniform random sample (without replacement) of up to `max_tokens`
    rows of each watched linear's input, across all calibration batches (bf16 on CPU)."""

    def __init__(self, modules: Mapping[str, nn.Module], max_tokens: int, seed: int = 0):
        self.max_tokens = max_tokens
        self.rows: dict[str, torch.Tensor] = {}
        self.keys: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            if not args or not torch.is_tensor(args[0]):
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            keys = torch.rand(x.shape[0], generator=self.generator)
            if x.shape[0] > self.max_tokens:   # only this batch's smallest keys can survive: copy just those
                keys, idx = keys.topk(self.max_tokens, largest=False)
                x = x[idx.to(x.device)]
            x = x.to("cpu", torch.bfloat16)
            if name in self.rows:
                x = torch.cat([self.rows[name], x])
                keys = torch.cat([self.keys[name], keys])
            if x.shape[0] > self.max_tokens:   # keep the rows with the smallest random keys
                idx = keys.topk(self.max_tokens, largest=False).indices
                x, keys = x[idx], keys[idx]
            self.rows[name], self.keys[name] = x, keys
        return pre_hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


@torch.no_grad()
def group_error(x: torch.Tensor, act_amax: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float,
                activations: str = "static", kv_groups: tuple[int, int] | None = None) -> float:
    """Summed squared output error of W8A8 (SmoothQuant at `alpha`, one shared factor) vs float.

    `activations`: static (one per-tensor scale from the calibration maxima, as ModelOpt and the
    static export) or dynamic (per-token scales, the dynamic export). `kv_groups` = (heads, kv_heads):
    o_proj's factor as the compressed-tensors export folds it (shared per kv-head dim)."""
    x = x.float()
    if kv_groups is not None:   # o_proj in the compressed-tensors export: s shared per (kv-head, dim)
        _, s = gqa_shared_factor(act_amax, weights[0], alpha, *kv_groups)
    else:
        s = shared_factor(act_amax, weights, [alpha] * len(weights))
    xs = x * s
    xq = fake_quant_activations(xs, activations, (act_amax * s).max())
    return sum(float((xq @ fake_quant_weight(w / s).T - x @ w.T).pow(2).sum()) for w in weights)


@dataclass
class AlphaSearch:
    alphas: dict[str, float]                                      # linear name -> alpha
    groups: list[dict] = field(default_factory=list)              # per group: members, errors by alpha, pick
    grid: list[float] = field(default_factory=list)
    tokens: int = 0

    targets: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"grid": self.grid, "tokens_per_input": self.tokens, "targets": self.targets,
                "alphas": self.alphas, "groups": self.groups}

    def histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for g in self.groups:
            counts[f"{g['alpha']:g}"] = counts.get(f"{g['alpha']:g}", 0) + 1
        return dict(sorted(counts.items()))


# A deployment target the search scores: (activation quantization, o_proj factor shared per kv-group).
Target = tuple[str, bool]
MODELOPT_TARGET: Target = ("static", False)   # ModelOpt fake-quant and its unified HF checkpoint


def search_targets(export: Any | None) -> list[Target]:
    """What the chosen alphas must serve: ModelOpt's own W8A8 (static per-tensor activations, free
    o_proj factors) and, when it is exported, the compressed-tensors checkpoint (export.activations,
    o_proj factors shared per kv-group when export.smooth_o_proj)."""
    targets = [MODELOPT_TARGET]
    if export is not None and "compressed_tensors" in export.formats:
        ct = (str(export.activations), bool(export.smooth_o_proj))
        if ct not in targets:
            targets.append(ct)
    return targets


def _value_outputs(family: Family, groups: list[list[str]]) -> set[str]:
    """The attention output linears (the family's v -> o pair's o) among the groups' heads."""
    if family.value_pair is None:
        return set()
    suffix = "." + family.value_pair[1]
    return {members[0] for members in groups if members[0].endswith(suffix)}


@torch.no_grad()
def search_alphas(model: nn.Module, groups: list[list[str]], sampler: InputSampler, grid: Sequence[float],
                  default: float, targets: Sequence[Target] = (MODELOPT_TARGET,), *, family: Family) -> AlphaSearch:
    """Pick one alpha per shared-input group. Score of an alpha = sum over `targets` of the group's
    summed output error relative to that target's error at `default` (so each target counts equally
    and a score below len(targets) means better than the default on average). A target that shares o_proj's
    factor per kv-group scores the family's attention output linear that way."""
    modules = dict(model.named_modules())
    text_cfg = getattr(model.config, "text_config", model.config)
    kv_groups = (text_cfg.num_attention_heads, text_cfg.num_key_value_heads)
    value_outputs = _value_outputs(family, groups)
    grid = [float(a) for a in grid]
    result = AlphaSearch(alphas={}, grid=grid, targets=[list(t) for t in targets])
    for members in groups:
        head = members[0]
        x = sampler.rows.get(head)
        if x is None:
            raise RuntimeError(f"{head}: no calibration inputs were captured for the alpha search")
        result.tokens = max(result.tokens, int(x.shape[0]))
        dev = modules[head].weight.device
        act_amax = modules[head].input_quantizer.amax.detach().float().flatten().to(dev)
        weights = [modules[m].weight.detach().float() for m in members]
        score, errors = _score_group(x.to(dev), act_amax, weights, grid, float(default), targets,
                                     kv_groups if head in value_outputs else None)
        best = min(grid, key=lambda a: (score[a], abs(a - default)))
        for m in members:
            result.alphas[m] = best
        result.groups.append({"members": members, "alpha": best, "score": {f"{a:g}": v for a, v in score.items()},
                              "errors": errors})
    return result


def _score_group(x: torch.Tensor, act_amax: torch.Tensor, weights: list[torch.Tensor], grid: list[float],
                 default: float, targets: Sequence[Target], kv_groups: tuple[int, int] | None
                 ) -> tuple[dict[float, float], dict[str, dict[str, float]]]:
    """(score per alpha, errors per target and alpha) of one group; `kv_groups` for an attention output."""
    score = dict.fromkeys(grid, 0.0)
    errors = {}
    for activations, shared_o in targets:
        kv = kv_groups if shared_o else None
        errs = {a: group_error(x, act_amax, weights, a, activations, kv) for a in sorted(set(grid) | {default})}
        ref = errs[default] or 1.0
        for a in grid:
            score[a] += errs[a] / ref
        errors[f"{activations}{'_kv_shared_o' if kv else ''}"] = {f"{a:g}": e for a, e in errs.items()}
    return score, errors


@torch.no_grad()
def apply_smoothquant(model: nn.Module, alphas: Mapping[str, float]) -> int:
    """ModelOpt's smoothquant postprocess, per linear with its own alpha (after max calibration with
    per-channel input statistics). Returns the number of smoothed linears."""
    from modelopt.torch.quantization.model_calib import apply_pre_quant_scale_and_smooth
    from modelopt.torch.quantization.utils import enable_weight_access_and_writeback

    name_to_module = dict(model.named_modules())
    for name, alpha in alphas.items():
        module = name_to_module[name]
        quantizer = module.input_quantizer
        if not quantizer.is_enabled or quantizer.axis != -1 or getattr(quantizer, "_amax", None) is None:
            raise RuntimeError(f"{name}: input quantizer has no per-channel calibration statistics")
        if quantizer.num_bits != 8 or module.weight_quantizer.num_bits != 8:
            raise RuntimeError(f"{name}: only int8 smoothing is supported")
        with enable_weight_access_and_writeback(module, model, name_to_module):
            # Same steps and order as modelopt.torch.quantization.model_calib.smoothquant.postprocess
            act_amax = quantizer.amax.float()
            weight_scale = module.weight.abs().amax(dim=0, keepdim=True)
            device, dtype = module.weight.device, module.weight.dtype
            scale_a = (weight_scale.pow(1 - alpha) / act_amax.pow(alpha)).squeeze()
            quantizer._amax_for_smoothing = act_amax.cpu()
            quantizer.reset_amax()
            quantizer.axis = None
            quantizer.amax = act_amax.amax().to(dtype=dtype, device=device)
            if scale_a.min() <= EPS:
                scale_a[act_amax.flatten() <= EPS] = 1
            scale_a = scale_a.clamp(min=S_MIN, max=S_MAX)
            apply_pre_quant_scale_and_smooth(module, scale_a)
    return len(alphas)
