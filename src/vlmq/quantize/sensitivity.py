"""Which LM linears hurt most when quantized, and the bf16 fallback that meets `quant.max_kl`.

One ModelOpt calibration, then quantizers are toggled. ModelOpt's `TensorQuantizer.forward` applies
`pre_quant_scale` (the SmoothQuant factor `s`) before anything else and only then checks whether
quantization is on, while the weight already holds `W/s`. Toggling with `disable_quant()` /
`enable_quant()` (`_if_quant`) keeps the quantizer in the forward path, so `x*s` still meets `W/s`
and a "bf16" linear stays the same function; `disable()` would too in ModelOpt 0.47, but only because
of the order of two statements in its forward.

KL is ModelOpt's fake-quant model vs the bf16 model on held-out batches: per-token
KL(bf16 || quantized) of next-token distributions, averaged over the batches' attention-masked tokens
(vlmq.evaluate.fidelity). "Quantized alone" = only that linear's weight and input quantizers on.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlmq.evaluate.fidelity import KLProbe
from vlmq.models.families import Family

log = logging.getLogger(__name__)


def _quantizers(module: nn.Module) -> list[nn.Module]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return [m for m in module.modules() if isinstance(m, TensorQuantizer)]


@contextmanager
def quantization_off(model: nn.Module) -> Iterator[None]:
    """Every quantizer of `model` passes values through (smoothing factors still applied); restored on exit."""
    quantizers = [q for q in _quantizers(model) if q.is_enabled and q._if_quant]
    for q in quantizers:
        q.disable_quant()
    try:
        yield
    finally:
        for q in quantizers:
            q.enable_quant()


def set_quant(model: nn.Module, names: Sequence[str], on: bool) -> None:
    """Turn the quantizers of the linears `names` on or off (pre_quant_scale stays applied)."""
    modules = dict(model.named_modules())
    for name in names:
        for q in _quantizers(modules[name]):
            if q.is_enabled:
                q.enable_quant() if on else q.disable_quant()


@dataclass
class Sensitivity:
    ranking: list[tuple[str, float]]       # (linear, KL when quantized alone), most sensitive first
    floor: float                           # KL with every quantizer off (bf16 rounding of W/s, x*s)
    full: float                            # KL with every linear quantized
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"kl_all_quantized": self.full, "kl_none_quantized": self.floor, "tokens": self.tokens,
                "seconds": self.seconds,
                "ranking": [{"rank": i + 1, "linear": n, "kl_alone": kl} for i, (n, kl) in enumerate(self.ranking)]}


@torch.no_grad()
def rank_linears(model: nn.Module, names: Sequence[str], probe: KLProbe,
                 progress: Callable[[int], None] | None = None) -> Sensitivity:
    """KL each linear adds when it is the only one quantized; most sensitive first."""
    start = time.perf_counter()
    full = probe.kl(model)
    scores = []
    with quantization_off(model):
        floor = probe.kl(model)
        for name in names:
            set_quant(model, [name], True)
            try:
                scores.append((name, probe.kl(model)))
            finally:
                set_quant(model, [name], False)
            if progress:
                progress(1)
    scores.sort(key=lambda item: -item[1])
    return Sensitivity(scores, floor, full, probe.tokens, round(time.perf_counter() - start, 3))


class FallbackUnreachable(RuntimeError):
    pass


@dataclass
class Fallback:
    max_kl: float
    exclude: list[str]
    steps: list[dict] = field(default_factory=list)   # {"bf16": k, "added": name, "kl": ...}
    kl_final: float | None = None                      # measured on the re-quantized model

    def to_dict(self) -> dict:
        return {"max_kl": self.max_kl, "fallback_bf16": self.exclude, "search": self.steps, "kl_final": self.kl_final}


def fused_siblings(name: str, family: Family) -> list[str]:
    """`name` and the linears an inference engine fuses it with (`family.fused`: vLLM's qkv_proj, gate_up_proj)."""
    head = family.layers + "."
    if name.startswith(head):
        index, _, relative = name[len(head):].partition(".")
        group = next((g for g in family.fused if relative in g), None)
        if group is not None:
            return [f"{head}{index}.{member}" for member in group]
    return [name]


@torch.no_grad()
def choose_fallback(model: nn.Module, sensitivity: Sensitivity, probe: KLProbe, max_kl: float,
                    family: Family) -> Fallback:
    """Greedy over the ranking: keep the top-k linears bf16 for k = 0, 1, 2, ... and re-measure the
    whole model each step; the first k that meets `max_kl` wins (the fewest along the ranking). A linear
    falls back with the family's fused group it belongs to."""
    steps = [{"bf16": 0, "added": None, "kl": sensitivity.full}]
    if sensitivity.full <= max_kl:
        return Fallback(max_kl, [], steps)
    exclude: list[str] = []
    try:
        for name, _ in sensitivity.ranking:
            if name in exclude:
                continue
            # engines fuse q/k/v and gate/up into one GEMM with one scheme: a group falls back whole
            added = [n for n in fused_siblings(name, family) if n not in exclude]
            set_quant(model, added, False)
            exclude.extend(added)
            kl = probe.kl(model)
            steps.append({"bf16": len(exclude), "added": name, "kl": kl})
            log.info("fallback: %d linears bf16 (+%s): KL %.3g (target %.3g)", len(exclude), name, kl, max_kl)
            if kl <= max_kl:
                return Fallback(max_kl, exclude, steps)
    finally:
        set_quant(model, exclude, True)
    raise FallbackUnreachable(f"quant.max_kl={max_kl:g} is not met even with every LM linear in bf16 "
                              f"(KL {steps[-1]['kl']:.3g}); raise quant.max_kl")


def format_table(sens: Sensitivity, top: int | None = None) -> str:
    rows = sens.ranking[:top] if top else sens.ranking
    width = max([len(n) for n, _ in rows] + [6])
    lines = [f"{'rank':>4}  {'linear':<{width}}  {'KL alone':>10}  {'x floor':>8}"]
    for i, (name, kl) in enumerate(rows):
        ratio = kl / sens.floor if sens.floor > 0 else float("inf")
        lines.append(f"{i + 1:>4}  {name:<{width}}  {kl:10.3e}  {ratio:8.1f}")
    lines.append(f"all linears quantized: KL {sens.full:.3e}; none quantized (floor): KL {sens.floor:.3e}; "
                 f"{sens.tokens} held-out tokens")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# `vlmq sensitivity`
# ------------------------------------------------------------------------------------------

def sensitivity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="write the JSON here too (always written to the run folder)")
    p.add_argument("--top", type=int, default=None, help="rows to print (default: all)")


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from vlmq.config import load_config
    from vlmq.console import console, make_run_dir, setup_logging

    cfg = load_config(list(args.overrides))
    run_dir = make_run_dir(cfg.log_root, cfg.run_name)
    args.log_file = setup_logging(run_dir, "sensitivity.log")
    report = run_sensitivity(cfg, run_dir)
    console.print(format_table(report["_sensitivity"], args.top), highlight=False, soft_wrap=True)
    del report["_sensitivity"]
    text = json.dumps(report, indent=2)
    (run_dir / "sensitivity.json").write_text(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(args.out or run_dir / "sensitivity.json")
    return 0


def run_sensitivity(cfg, run_dir: Path) -> dict:
    """Calibrate once (the quantize recipe, alpha search included), then rank the LM's linears."""
    from vlmq.calib.sources import calibration_and_held_out
    from vlmq.console import console, library_chatter_to_log, progress_bar
    from vlmq.models.families import quantized_linear_names
    from vlmq.models.load import inspect_snapshot, load_model, load_processor
    from vlmq.quantize.calibrate import ForwardLoop, resolve_batch_size
    from vlmq.quantize.steps import quantize_lm
    from vlmq.run_context import resolve_inputs

    ctx = resolve_inputs(cfg, run_dir)
    with library_chatter_to_log():
        if ctx.demo:
            from vlmq.models.demo import write_demo_snapshot

            console.print("[yellow]No snapshot found: using the built-in DEMO model.[/yellow]")
            write_demo_snapshot(ctx.snapshot_dir)
        samples, held_out, stats = calibration_and_held_out(cfg, ctx.calib_root)
        snapshot = inspect_snapshot(ctx.snapshot_dir, cfg.arch.trust_remote_code)
        model = load_model(snapshot, cfg.arch.dtype, cfg.device, cfg.arch.max_memory, cfg.arch.trust_remote_code)
        processor = load_processor(snapshot.path, cfg.arch.trust_remote_code)
    batch_size = resolve_batch_size(cfg.calib.batch_size, next(model.parameters()).device)
    from vlmq.calib.batches import make_batches

    probe = KLProbe.capture(model, make_batches(processor, held_out, batch_size, cfg.calib.max_length))
    forward_loop = ForwardLoop(samples, processor, cfg.calib.max_length, batch_size, stats)
    with library_chatter_to_log():
        model, info = quantize_lm(model, snapshot.family, cfg.quant, forward_loop, export=cfg.export)
    names = quantized_linear_names(snapshot.family, len(model.get_submodule(snapshot.family.layers)))
    with progress_bar("sensitivity", len(names)) as advance:
        sens = rank_linears(model, names, probe, advance)
    return {"tool": "vlmq sensitivity", "snapshot": str(snapshot.path), "demo": ctx.demo,
            "held_out_samples": len(held_out), "calibration_samples": len(samples),
            "alphas": info.alphas, **sens.to_dict(), "_sensitivity": sens}
