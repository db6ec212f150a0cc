"""`vlmq quantize` from validated config to exported checkpoint(s) and manifest.

Stages: resolve inputs (cheap checks first) -> load -> [reference logits] -> calibrate + quantize ->
[sensitivity fallback: rank, re-quantize] -> audit -> export (atomic) -> manifest.
"""

from __future__ import annotations

import gc
import logging
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vlmq.config import Config, ConfigError
from vlmq.console import console, library_chatter_to_log, progress_bar
from vlmq.models.load import Snapshot, inspect_snapshot, require_snapshot_dir
from vlmq.run_context import RunContext, resolve_inputs

log = logging.getLogger(__name__)

def peak_memory() -> dict[str, float]:
    out = {"cpu_max_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if torch.cuda.is_available():
        per_gpu = [round(torch.cuda.max_memory_allocated(i) / 2**30, 3) for i in range(torch.cuda.device_count())]
        out["gpu_peak_allocated_gib"] = round(sum(per_gpu), 3)
        if len(per_gpu) > 1:
            out["gpu_peak_allocated_gib_per_device"] = per_gpu
    return out


def placement(model: torch.nn.Module) -> dict[str, int]:
    """How many parameters sit on each device (several GPUs: accelerate's device_map)."""
    counts: dict[str, int] = {}
    for param in model.parameters():
        counts[str(param.device)] = counts.get(str(param.device), 0) + param.numel()
    return counts


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def estimate_export_bytes(model: torch.nn.Module, quantized: list[str]) -> int:
    """Bytes of one exported format's tensors: int8 weights plus fp32 scales for the quantized
    linears, everything else at its own dtype; 2% slack for headers and stray buffers."""
    targets = set(quantized)
    total = 0
    for name, param in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if module in targets and leaf == "weight" and param.dim() == 2:
            total += param.numel() + 4 * (param.shape[0] + param.shape[1] + 1)
        else:
            total += param.numel() * param.element_size()
    return int(total * 1.02)


def run_quantize(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """The whole `vlmq quantize` job; returns the manifest body."""
    from vlmq.calib.batches import make_batches, to_messages
    from vlmq.calib.sources import calibration_and_held_out, load_calibration_samples
    from vlmq.export import EXPORT_ORDER, get_exporter
    from vlmq.export.atomic import atomic_directory, check_free_space, check_target, clean_stale_staging
    from vlmq.export.manifest import package_versions, write_manifest
    from vlmq.models.chat import render
    from vlmq.models.load import load_model, load_processor
    from vlmq.quantize.calibrate import ForwardLoop, audit, resolve_batch_size
    from vlmq.quantize.steps import quantize_lm

    if cfg.arch.quantized:
        raise ConfigError(f"arch {cfg.arch.name} is a quantized checkpoint; `vlmq quantize` needs a bf16 snapshot "
                          "(e.g. arch=qwen2_5_vl_3b_instruct.default)")
    from vlmq.quantize.steps import check_steps

    check_steps(cfg.quant.steps)
    ctx = resolve_inputs(cfg, run_dir)
    # Cheap checks first: output target, calibration data, snapshot config; then load weights.
    clean_stale_staging(ctx.export_dir)  # staging dirs of killed runs (their pid is gone)
    check_target(ctx.export_dir, cfg.force)
    with ctx.stage("prepare"), library_chatter_to_log():
        if not ctx.demo:   # a named snapshot that is not there is said first, before the calibration data is read
            require_snapshot_dir(ctx.snapshot_dir)
        held_out: list = []
        if cfg.quant.max_kl is not None or cfg.export.score:
            samples, held_out, stats = calibration_and_held_out(cfg, ctx.calib_root)
        else:
            samples, stats = load_calibration_samples(cfg, ctx.calib_root)
        if ctx.demo:
            from vlmq.models.demo import write_demo_snapshot

            console.print("[yellow]No snapshot found: using the built-in DEMO model "
                          "(tiny random Qwen2.5-VL) and the demo COCO calibration set.[/yellow]")
            write_demo_snapshot(ctx.snapshot_dir)
        snapshot: Snapshot = inspect_snapshot(ctx.snapshot_dir, cfg.arch.trust_remote_code)
        if not ctx.demo and snapshot.family.name != cfg.arch.family:
            raise ConfigError(f"{snapshot.path} is a {snapshot.family.name} model but arch.family is "
                              f"{cfg.arch.family}; pass arch.family={snapshot.family.name} if that is intended")
        formats = [f for f in EXPORT_ORDER if f in cfg.export.formats]
        bf16_bytes = dir_bytes(snapshot.path, "*.safetensors")
        # Fail before hours of calibration when even the smallest possible export (int8 = half of
        # bf16, per format) cannot fit; the exact estimate is checked again right before export.
        check_free_space(ctx.export_dir.parent, len(formats) * bf16_bytes // 2)
    log.info("calibration: %d samples (%d images), skipped %s", stats.samples, stats.images,
             stats.skipped_summary())

    with ctx.stage("load"):
        processor = load_processor(snapshot.path, cfg.arch.trust_remote_code)
        render(processor, to_messages(processor, samples[0]))   # a template that can't render fails before loading
        model = load_model(snapshot, cfg.arch.dtype, cfg.device, cfg.arch.max_memory,
                           cfg.arch.trust_remote_code)
    params_per_device = placement(model)
    log.info("parameters per device: %s", params_per_device)
    device = next(model.parameters()).device
    if device.type == "cuda" and cfg.calib.gpu_memory_fraction < 1.0:
        for index in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(cfg.calib.gpu_memory_fraction, index)
    batch_size = resolve_batch_size(cfg.calib.batch_size, device)

    forward_loop = ForwardLoop(samples, processor, cfg.calib.max_length, batch_size, stats, progress="calibrating")

    probe = None
    if held_out:
        from vlmq.evaluate.fidelity import KLProbe

        with ctx.stage("reference_logits"):
            probe = KLProbe.capture(model, make_batches(processor, held_out, batch_size, cfg.calib.max_length),
                                    getattr(processor, "image_token_id", None))
    with ctx.stage("calibrate_quantize"), library_chatter_to_log():
        model, lmq = quantize_lm(model, snapshot.family, cfg.quant, forward_loop, export=cfg.export)
    num_layers = len(model.get_submodule(snapshot.family.layers))
    fallback_report: dict[str, Any] | None = None
    exclude: list[str] = []
    if cfg.quant.max_kl is not None:
        model, lmq, exclude, fallback_report = sensitivity_fallback(
            ctx, cfg, snapshot, model, lmq, probe, forward_loop, num_layers)
    recipe = lmq.recipe
    result_audit = audit(model, snapshot.family, num_layers, exclude=exclude)
    result_audit.alphas = lmq.alphas

    exports: dict[str, dict] = {}
    manifest: dict[str, Any] = {}
    other_files = dir_bytes(snapshot.path) - bf16_bytes  # processor, tokenizer, config: copied per format
    estimate = len(formats) * (estimate_export_bytes(model, result_audit.quantized) + other_files)
    export_ctx = atomic_directory(ctx.export_dir, cfg.force, needed_bytes=estimate)
    with ctx.stage("export"), library_chatter_to_log(), export_ctx as staging:
        with progress_bar("exporting", len(formats)) as advance:
            for fmt in formats:
                started = time.perf_counter()
                exports[fmt] = get_exporter(fmt)(model, processor, staging / fmt, cfg=cfg, family=snapshot.family,
                                                 audit=result_audit, state=lmq.state)
                exports[fmt]["bytes"] = dir_bytes(staging / fmt, "*.safetensors")
                exports[fmt]["seconds"] = round(time.perf_counter() - started, 3)
                advance(1)
        if cfg.export.score and probe is not None:
            lmq.state = None   # the state and the fake-quant model are done with; each export is loaded in its place
            del model
            gc.collect()
            with ctx.stage("score_exports"):
                reused = {id(s) for s in samples} & {id(s) for s in held_out}   # tiny data: KL on calibration samples
                score_exports(exports, staging, probe, cfg.device, held_out_is_calibration=bool(reused))
        manifest = {
            "tool": "vlmq quantize",
            "command_line": " ".join(sys.argv),
            "demo": ctx.demo,
            "snapshot": str(snapshot.path),
            "config": cfg.to_dict(),
            "modelopt_recipe": recipe,
            "recipe_steps": list(cfg.quant.steps),
            "versions": package_versions(),
            "calibration": {**stats.to_dict(), "root": str(ctx.calib_root),
                            "batch_size": forward_loop.last_log.__dict__ if forward_loop.last_log else None},
            "modules": result_audit.to_dict(),
            "smoothquant": {"alpha_search": cfg.quant.alpha_search,
                            "alpha": None if cfg.quant.alpha_search else cfg.quant.alpha,
                            "search": lmq.search.to_dict() if lmq.search is not None else None},
            "sensitivity_fallback": fallback_report,
            "exports": exports,
            "sizes": {"bf16_safetensors_bytes": bf16_bytes, "export_estimate_bytes": estimate},
            "timings_s": {**ctx.timings, "export": round(sum(e["seconds"] for e in exports.values()), 3)},
            "fidelity_warning": fidelity_warning(exports),
            "peak_memory": peak_memory(),
            "params_per_device": params_per_device,
            "run_dir": str(run_dir),
            "export_dir": str(ctx.export_dir),
        }
        write_manifest(staging, manifest)
    manifest["timings_s"] = dict(ctx.timings)
    (run_dir / "manifest.json").write_text((ctx.export_dir / "manifest.json").read_text())
    return manifest


def score_exports(exports: dict[str, dict], staging: Path, probe: Any, device: str,
                  held_out_is_calibration: bool = False) -> None:
    """Each written format, loaded by vlmq's runtime as a user would, against the bf16 model's logits on the
    held-out batches: KL, top-1 and perplexity change go into `exports[fmt]["fidelity"]`."""
    from vlmq.runtime.loader import load_w8a8

    for fmt, entry in exports.items():
        with library_chatter_to_log():
            model, _, _ = load_w8a8(staging / fmt, device)
            fidelity = probe.score(model)
        del model
        gc.collect()
        entry["fidelity"] = {**fidelity.to_dict(), "samples": probe.samples, "held_out": not held_out_is_calibration}
        log.info("fidelity %s: %s", fmt, entry["fidelity"])


# A format whose KL is this many times another's (and above the noise floor) gets a one-line warning.
MUCH_WORSE_RATIO, MUCH_WORSE_MIN_KL = 3.0, 0.01


def fidelity_warning(exports: dict[str, dict]) -> str | None:
    """One line naming the better format when one written format is much less faithful than another."""
    scored = {f: e["fidelity"]["kl_mean"] for f, e in exports.items() if "fidelity" in e}
    if len(scored) < 2:
        return None
    best, worst = min(scored, key=scored.get), max(scored, key=scored.get)
    if scored[worst] < MUCH_WORSE_MIN_KL or scored[worst] < MUCH_WORSE_RATIO * scored[best]:
        return None
    return (f"{worst} is much less faithful than {best} (KL {scored[worst]:.3g} vs {scored[best]:.3g} nats/token "
            f"against bf16 on held-out samples): deploy {best}")


def sensitivity_fallback(ctx: RunContext, cfg: Config, snapshot: Snapshot, model: torch.nn.Module, lmq: Any,
                         probe: Any, forward_loop: Any, num_layers: int) -> tuple:
    """`quant.max_kl`: rank the linears on the calibrated model, pick the fewest most sensitive to
    keep bf16, then quantize a fresh bf16 model without them (same alphas). Returns
    (model, LMQuantization, exclude, report for the manifest)."""
    import gc

    from vlmq.models.families import quantized_linear_names
    from vlmq.models.load import load_model
    from vlmq.quantize.sensitivity import choose_fallback, rank_linears
    from vlmq.quantize.steps import quantize_lm

    names = quantized_linear_names(snapshot.family, num_layers)
    with ctx.stage("sensitivity"), progress_bar("sensitivity", len(names)) as advance:
        sens = rank_linears(model, names, probe, advance)
        fallback = choose_fallback(model, sens, probe, cfg.quant.max_kl)
    log.info("sensitivity fallback: %d linears bf16 for KL <= %g: %s", len(fallback.exclude), cfg.quant.max_kl,
             fallback.exclude)
    if fallback.exclude:
        del model
        gc.collect()
        with ctx.stage("requantize"), library_chatter_to_log():
            model = load_model(snapshot, cfg.arch.dtype, cfg.device, cfg.arch.max_memory, cfg.arch.trust_remote_code)
            model, lmq = quantize_lm(model, snapshot.family, cfg.quant, forward_loop, exclude=fallback.exclude,
                                     alphas=lmq.alphas, export=cfg.export)
    fallback.kl_final = probe.kl(model)
    report = {**fallback.to_dict(), "kl_samples": sum(int(b["input_ids"].shape[0]) for b in probe.batches),
              "tokens": probe.tokens, "sensitivity": sens.to_dict()}
    return model, lmq, fallback.exclude, report
