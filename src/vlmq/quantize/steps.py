"""A recipe is an ordered list of steps (`quant.steps`, default [calibrate, smooth, round]); each step is one
function from the work state to the work state, registered by name. A new step is a function with
`@register_step("name")` plus its name in the config list.

Built-in steps:
- calibrate: ModelOpt's max calibration over the full model (per-input-channel activation maxima of the
  LM linears); with `quant.alpha_search` it also samples each linear group's real inputs.
- smooth: the SmoothQuant alpha of every linear: `quant.alpha`, or searched per group (`quant.alpha_search`).
- round: the quantized state (SmoothQuant folded, int8 round-to-nearest weights), then ModelOpt's own
  smoothing applied in place so the live model is ModelOpt's fake-quant W8A8 (modelopt_hf, sensitivity).
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
    done: list[str] = field(default_factory=list)


Step = Callable[[Work], Work]
STEPS: dict[str, Step] = {}
DEFAULT_STEPS = ("calibrate", "smooth", "round")


def register_step(name: str) -> Callable[[Step], Step]:
    def wrap(fn: Step) -> Step:
        STEPS[name] = fn
        return fn
    return wrap


def check_steps(steps: Sequence[str]) -> None:
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"quant.steps: unknown step {unknown[0]!r} (known: {', '.join(STEPS)})")
    for required in ("calibrate", "round"):
        if required not in steps:
            raise ConfigError(f"quant.steps must include {required!r}: {list(steps)}")
    if list(steps).index("calibrate") > list(steps).index("round"):
        raise ConfigError(f"quant.steps: 'calibrate' must come before 'round': {list(steps)}")


def run_steps(work: Work, steps: Sequence[str]) -> Work:
    check_steps(steps)
    for name in steps:
        work = STEPS[name](work)
        work.done.append(name)
        log.info("recipe step %s: done", name)
    return work


@register_step("calibrate")
def calibrate(work: Work) -> Work:
    from vlmq.quantize import alpha_search as search
    from vlmq.quantize.calibrate import quantize
    from vlmq.quantize.recipe import build_modelopt_config

    work.recipe = build_modelopt_config(work.quant, work.family, excluded(work))
    if work.quant.alpha_search and work.alphas is None:
        modules = dict(work.model.named_modules())
        groups = search.layer_groups(work.family, num_layers(work), work.names)
        work.sampler = search.InputSampler({g[0]: modules[g[0]] for g in groups}, work.quant.alpha_search_tokens)
    try:
        work.model = quantize(work.model, work.recipe, work.forward_loop)
    finally:
        if work.sampler is not None:
            work.sampler.remove()
    return work


@register_step("smooth")
def smooth(work: Work) -> Work:
    from vlmq.quantize import alpha_search as search

    if work.alphas is None and work.sampler is not None:
        groups = search.layer_groups(work.family, num_layers(work), work.names)
        work.search = search.search_alphas(work.model, groups, work.sampler, work.quant.alpha_grid,
                                           work.quant.alpha, search.search_targets(work.export))
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
    work.state = build_state(work.model, work.family, collect_act_amax(work.model, work.names), work.names,
                             work.alphas, getattr(work.export, "activations", "dynamic"),
                             getattr(work.export, "smooth_o_proj", True))
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
