"""A recipe is an ordered list of steps (`quant.steps`, default [rotate, calibrate, smooth, gptq, round]); each
step is one function from the work state to the work state, registered by name. A new step is a function with
`@register_step("name")` plus its name in the config list.

Built-in steps:
- rotate: orthogonal rotations of the float model (vlmq.quantize.rotate, `quant.rotate`): norm gains folded,
  the residual stream (R1) and the values (R2) rotated in the weights, an online block Hadamard on
  down_proj's input (R4). The model's function is unchanged; its outliers are spread out.
- calibrate: ModelOpt's max calibration over the full model (per-input-channel activation maxima of the
  LM linears); with `quant.alpha_search` it also samples each linear group's real inputs.
- smooth: the SmoothQuant alpha of every linear: `quant.alpha`, or searched per group (`quant.alpha_search`).
- gptq: int8 weights rounded by GPTQ against the calibration Hessians (collected while calibrating) instead
  of to nearest (vlmq.quantize.gptq, `quant.gptq`).
- round: the quantized state (SmoothQuant folded, int8 round-to-nearest weights), then ModelOpt's own
  smoothing applied in place so the live model is ModelOpt's fake-quant W8A8 (the sensitivity fallback's probe).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from vlmq.config import ConfigError
from vlmq.models.families import Family, quantized_linear_names

log = logging.getLogger(__name__)


@dataclass
class Work:
    """What the steps read and write."""

    model: nn.Module
    family: Family
    quant: Any                                   # QuantConfig
    export: Any                                  # ExportConfig (activations, o_proj folding), or None
    forward_loop: Callable[[nn.Module], None]
    names: list[str]                             # the LM linears to quantize
    recipe: dict = field(default_factory=dict)   # the ModelOpt config the calibration ran
    sampler: Any = None                          # alpha_search.InputSampler while calibrating
    alphas: dict[str, float] | None = None       # per linear (given: reused, e.g. by the bf16 fallback)
    search: Any = None                           # alpha_search.AlphaSearch
    state: Any = None                            # vlmq.quantize.state.QuantizedModel
    rotations: dict = field(default_factory=dict)  # what `rotate` folded: residual / values / input_hadamards
    hessians: Any = None                         # gptq.HessianCollector, filled while calibrating
    rounding: Any = None                         # state.Rounding chosen by `gptq` (None: round to nearest)
    peaks: dict[str, float] = field(default_factory=dict)  # module -> largest |output| while calibrating
    precise: dict[str, Any] = field(default_factory=dict)   # parameter -> fp32 value of a rotated float tensor
    done: list[str] = field(default_factory=list)


Step = Callable[[Work], Work]
STEPS: dict[str, Step] = {}
DEFAULT_STEPS = ("rotate", "calibrate", "smooth", "gptq", "round")
# (step, step it must come before)
ORDER = (("rotate", "calibrate"), ("calibrate", "round"), ("calibrate", "gptq"), ("gptq", "round"),
         ("smooth", "round"))


def register_step(name: str) -> Callable[[Step], Step]:
    def wrap(fn: Step) -> Step:
        STEPS[name] = fn
        return fn
    return wrap


def check_steps(steps: Sequence[str]) -> None:
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        known = [*DEFAULT_STEPS, *(s for s in STEPS if s not in DEFAULT_STEPS)]   # in recipe order
        raise ConfigError(f"quant.steps: unknown step {unknown[0]!r} (known: {', '.join(known)})")
    for required in ("calibrate", "round"):
        if required not in steps:
            raise ConfigError(f"quant.steps must include {required!r}: {list(steps)}")
    order = list(steps)
    for first, then in ORDER:
        if first in order and then in order and order.index(first) > order.index(then):
            raise ConfigError(f"quant.steps: {first!r} must come before {then!r}: {order}")
    if len(set(order)) != len(order):
        raise ConfigError(f"quant.steps: a step is listed twice: {order}")


def run_steps(work: Work, steps: Sequence[str]) -> Work:
    check_steps(steps)
    for name in steps:
        work = STEPS[name](work)
        work.done.append(name)
        log.info("recipe step %s: done", name)
    return work


@register_step("rotate")
def rotate(work: Work) -> Work:
    from vlmq.quantize import rotate as rot
    from vlmq.quantize.peaks import may_be_finer_than_bf16

    cfg = work.quant.rotate
    _, _, head_dim = rot.text_geometry(work.model)
    if cfg.residual:
        rot.fold_norm_gains(work.model, work.family)
        hidden = work.model.config.get_text_config().hidden_size
        rot.rotate_residual(work.model, work.family, rot.rotation_matrix(hidden, cfg.seed, cfg.matrix))
        work.rotations["residual"] = {"kind": rot.rotation_kind(hidden, cfg.matrix), "seed": cfg.seed}
    if cfg.values:
        rot.rotate_values(work.model, work.family, rot.rotation_matrix(head_dim, cfg.seed + 1, cfg.matrix))
        work.rotations["values"] = {"kind": rot.rotation_kind(head_dim, cfg.matrix), "seed": cfg.seed + 1}
    if cfg.mlp_input_block:
        names = rot.rotate_mlp_input(work.model, work.family, cfg.mlp_input_block)
        work.rotations["input_hadamards"] = dict.fromkeys(names, cfg.mlp_input_block)   # bf16 fallbacks too
    precise = rot.precise_tensors(work.model)   # held only where the checkpoint may be finer than bf16
    if may_be_finer_than_bf16(getattr(work.export, "dtype", "auto"), work.model, work.family):
        work.precise = precise
    return work


@register_step("calibrate")
def calibrate(work: Work) -> Work:
    from vlmq.quantize import alpha_search as search
    from vlmq.quantize.calibrate import quantize
    from vlmq.quantize.peaks import PeakRecorder
    from vlmq.quantize.recipe import build_modelopt_config

    work.recipe = build_modelopt_config(work.quant, work.family, excluded(work))
    if work.quant.alpha_search and work.alphas is None:
        modules = dict(work.model.named_modules())
        groups = search.layer_groups(work.family, num_layers(work), work.names)
        work.sampler = search.InputSampler({g[0]: modules[g[0]] for g in groups}, work.quant.alpha_search_tokens)
    if "gptq" in work.quant.steps:   # the Hessians come from the same forward passes
        from vlmq.quantize.gptq import HessianCollector, shared_inputs

        modules = dict(work.model.named_modules())
        hooked, aliases = shared_inputs(work.names, [g.consumers for g in work.family.norm_groups])
        work.hessians = HessianCollector(work.model, {n: modules[n] for n in hooked}, aliases,
                                         device=work.quant.gptq.hessian_device)
    recorder = PeakRecorder(work.model)   # what the checkpoint's float dtype must hold (export.dtype=auto)
    try:
        work.model = quantize(work.model, work.recipe, work.forward_loop)
    finally:
        for hooks in (work.sampler, work.hessians, recorder):
            if hooks is not None:
                hooks.remove()
    work.peaks = recorder.peaks()
    return work


@register_step("gptq")
def gptq(work: Work) -> Work:
    from vlmq.quantize.gptq import gptq_round, smoothed_hessian

    cfg, hessians = work.quant.gptq, work.hessians

    def rounding(name, weight, smoothing):
        return gptq_round(weight, smoothed_hessian(hessians.hessian(name), smoothing), damp=cfg.damp, block=cfg.block,
                          act_order=cfg.act_order)

    work.rounding = rounding
    log.info("gptq: %d Hessians, %.2f GB (fp32) on %s", len(hessians.hessians), hessians.nbytes() / 1e9,
             cfg.hessian_device or "each linear's device")
    return work


@register_step("smooth")
def smooth(work: Work) -> Work:
    from vlmq.quantize import alpha_search as search

    if work.alphas is None and work.sampler is not None:
        groups = search.layer_groups(work.family, num_layers(work), work.names)
        work.search = search.search_alphas(work.model, groups, work.sampler, work.quant.alpha_grid,
                                           work.quant.alpha, search.search_targets(work.export), family=work.family)
        work.alphas = work.search.alphas
        log.info("alpha search: %d groups, chosen alphas %s", len(groups), work.search.histogram())
    work.alphas = {n: float(work.alphas[n]) if work.alphas else float(work.quant.alpha) for n in work.names}
    return work


@register_step("round")
def round_to_int8(work: Work) -> Work:
    from vlmq.quantize.alpha_search import apply_smoothquant
    from vlmq.quantize.fold import collect_act_amax
    from vlmq.quantize.state import build_state, kv_cache_scales

    if work.alphas is None:   # a recipe without `smooth`: quant.alpha for every linear
        work = smooth(work)
    kwargs = {"rounding": work.rounding} if work.rounding else {}
    work.state = build_state(work.model, work.family, collect_act_amax(work.model, work.names), work.names,
                             work.alphas, getattr(work.export, "activations", "dynamic"),
                             getattr(work.export, "smooth_o_proj", True),
                             input_hadamards=work.rotations.get("input_hadamards"), **kwargs)
    work.state.rotations = dict(work.rotations)
    work.state.peaks = {**work.peaks, **work.state.peaks}
    work.state.edits = {**work.precise, **work.state.edits}   # the export rounds them once, to its dtype
    work.state.rounding = "gptq" if work.rounding else "rtn"
    if work.hessians is not None:   # free them: 3B's are ~25 GB
        work.hessians.clear()
    if work.quant.kv_cache != "none":   # the calibrated KV-cache scales, for the compressed-tensors export
        work.state.kv_cache = work.quant.kv_cache
        work.state.kv_scales = kv_cache_scales(work.model, work.family)
    apply_smoothquant(work.model, work.alphas)
    return work


def num_layers(work: Work) -> int:
    return len(work.model.get_submodule(work.family.layers))


def excluded(work: Work) -> list[str]:
    """LM linears left out of `work.names` (kept bf16 by the sensitivity fallback)."""
    keep = set(work.names)
    return [n for n in quantized_linear_names(work.family, num_layers(work)) if n not in keep]


@dataclass
class LMQuantization:
    """What `quantize_lm` did: the recipe given to ModelOpt, the alphas (with the alpha search), the search,
    and the quantized state that the deployable exporters write."""

    recipe: dict
    alphas: dict[str, float] | None = None   # linear -> SmoothQuant alpha (None: quant.alpha for all)
    search: Any = None                        # alpha_search.AlphaSearch, when one ran
    state: Any = None                         # vlmq.quantize.state.QuantizedModel


def quantize_lm(model: nn.Module, family: Family, quant: Any, forward_loop: Callable[[nn.Module], None],
                exclude: Sequence[str] = (), alphas: dict[str, float] | None = None, export: Any = None
                ) -> tuple[nn.Module, LMQuantization]:
    """W8A8 SmoothQuant of the LM's linears, except `exclude` (kept bf16), by the recipe's steps
    (`quant.steps`, vlmq.quantize.steps): ModelOpt calibrates, the alphas are chosen (or `alphas` from an
    earlier search reused), the quantized state is built from the untouched weights, and ModelOpt's own
    smoothing leaves the live model as its fake-quant W8A8. `export` says activations and o_proj folding."""
    names = [n for n in quantized_linear_names(family, len(model.get_submodule(family.layers)))
             if n not in set(exclude)]
    work = run_steps(Work(model, family, quant, export, forward_loop, names, alphas=alphas), quant.steps)
    searched = work.alphas if (quant.alpha_search or alphas is not None) else None
    return work.model, LMQuantization(work.recipe, searched, work.search, work.state)
