"""`vlmq quantize` (the CLI) and `vlmq.quantize` (the Python API, vlmq.api) run the same functions:
`start` (config checks, where inputs and outputs live) -> `prepare` (cheap checks first: snapshot, calibration
data, snapshot config) -> `quantize_prepared` (load, [reference logits], calibrate + quantize, [sensitivity
fallback: rank, re-quantize], audit) -> `Quantized` -> `Quantized.export` (export (atomic), [score each
format], manifest). `run_quantize` is the CLI's job: the same, with the export target checked before anything
is read and the run's log folder.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmq.config import Config, ConfigError, check_values
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


def module_bytes(model: torch.nn.Module) -> int:
    """The bytes of a loaded model's parameters and buffers (tied tensors once)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


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


def export_formats(cfg: Config) -> list[str]:
    """`export.formats` in the order they are written."""
    from vlmq.export import EXPORT_ORDER

    return [f for f in EXPORT_ORDER if f in cfg.export.formats]


def start(cfg: Config, run_dir: Path) -> RunContext:
    """The checks the config alone allows, then where inputs and outputs live (`resolve_inputs`)."""
    from vlmq.quantize.steps import check_steps

    if cfg.arch.quantized:
        raise ConfigError(f"arch {cfg.arch.name} is a quantized checkpoint; `vlmq quantize` needs a bf16 snapshot "
                          "(e.g. arch=qwen2_5_vl_3b_instruct.default)")
    check_steps(cfg.quant.steps)
    return resolve_inputs(cfg, run_dir)


@dataclass
class Inputs:
    """What `prepare` found: the calibration (and held-out) samples, and the snapshot to quantize."""

    samples: list
    held_out: list
    stats: Any                    # vlmq.calib.CalibStats
    snapshot: Snapshot
    bf16_bytes: int               # the model's weights
    other_bytes: int              # the snapshot's other files (processor, tokenizer, config): copied per format


def loaded_snapshot(model: torch.nn.Module) -> Snapshot:
    """A model the caller loaded: its family from its own config; its name_or_path, for the record."""
    from vlmq.models.families import family_for

    name = getattr(model, "name_or_path", "") or "(in-memory model)"
    return Snapshot(Path(name), model.config.to_dict(), family_for(model.config.model_type), is_demo=False)


def prepare(ctx: RunContext, model: torch.nn.Module | None = None) -> Inputs:
    """Cheap checks, then the calibration data: a named snapshot that is not there is said before the
    calibration data is read, and the snapshot's config is checked before any weight is. `model`: a model
    the caller loaded (vlmq.quantize), used in place of the snapshot."""
    from vlmq.calib.sources import calibration_and_held_out, load_calibration_samples

    cfg = ctx.cfg
    if model is None and not ctx.demo:
        require_snapshot_dir(ctx.snapshot_dir)
    held_out: list = []
    if cfg.quant.max_kl is not None or cfg.export.score:
        samples, held_out, stats = calibration_and_held_out(cfg, ctx.calib_root)
    else:
        samples, stats = load_calibration_samples(cfg, ctx.calib_root)
    if model is not None:
        snapshot = loaded_snapshot(model)
    else:
        if ctx.demo:
            from vlmq.models.demo import write_demo_snapshot

            console.print("[yellow]No snapshot found: using the built-in DEMO model "
                          "(tiny random Qwen2.5-VL) and the demo COCO calibration set.[/yellow]")
            write_demo_snapshot(ctx.snapshot_dir)
        snapshot = inspect_snapshot(ctx.snapshot_dir, cfg.arch.trust_remote_code)
    if not ctx.demo and snapshot.family.name != cfg.arch.family:
        raise ConfigError(f"{snapshot.path} is a {snapshot.family.name} model but arch.family is "
                          f"{cfg.arch.family}; pass arch.family={snapshot.family.name} if that is intended")
    if model is not None:
        return Inputs(samples, held_out, stats, snapshot, module_bytes(model), 0)
    bf16_bytes = dir_bytes(snapshot.path, "*.safetensors")
    return Inputs(samples, held_out, stats, snapshot, bf16_bytes, dir_bytes(snapshot.path) - bf16_bytes)


def quantize_prepared(ctx: RunContext, inputs: Inputs, model: torch.nn.Module | None = None,
                      processor: Any = None) -> Quantized:
    """Load (unless `model`/`processor` are given), calibrate and quantize by the recipe, fall back to bf16 for the
    most sensitive linears (`quant.max_kl`), audit."""
    from vlmq.calib.batches import make_batches, to_messages
    from vlmq.models.chat import render
    from vlmq.models.load import load_model, load_processor
    from vlmq.quantize.calibrate import ForwardLoop, audit, resolve_batch_size
    from vlmq.quantize.steps import quantize_lm

    cfg, snapshot, stats = ctx.cfg, inputs.snapshot, inputs.stats
    log.info("calibration: %d samples (%d images), skipped %s", stats.samples, stats.images,
             stats.skipped_summary())
    with ctx.stage("load"):
        if processor is None:
            processor = load_processor(snapshot.path, cfg.arch.trust_remote_code)
        render(processor, to_messages(processor, inputs.samples[0]))   # a template that can't render fails first
        if model is None:
            model = load_model(snapshot, cfg.arch.dtype, cfg.device, cfg.arch.max_memory,
                               cfg.arch.trust_remote_code)
        model.eval()
    params_per_device = placement(model)
    log.info("parameters per device: %s", params_per_device)
    device = next(model.parameters()).device
    if device.type == "cuda" and cfg.calib.gpu_memory_fraction < 1.0:
        for index in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(cfg.calib.gpu_memory_fraction, index)
    batch_size = resolve_batch_size(cfg.calib.batch_size, device)

    forward_loop = ForwardLoop(inputs.samples, processor, cfg.calib.max_length, batch_size, stats,
                               progress="calibrating")
    probe = None
    if inputs.held_out:
        from vlmq.evaluate.fidelity import KLProbe

        with ctx.stage("reference_logits"):
            probe = KLProbe.capture(model, make_batches(processor, inputs.held_out, batch_size, cfg.calib.max_length),
                                    getattr(processor, "image_token_id", None))
    with ctx.stage("calibrate_quantize"), library_chatter_to_log():
        model, lmq = quantize_lm(model, snapshot.family, cfg.quant, forward_loop, export=cfg.export)
    num_layers = len(model.get_submodule(snapshot.family.layers))
    fallback_report: dict[str, Any] | None = None
    exclude: list[str] = []
    if cfg.quant.max_kl is not None:
        model, lmq, exclude, fallback_report = sensitivity_fallback(
            ctx, cfg, snapshot, model, lmq, probe, forward_loop, num_layers)
    result_audit = audit(model, snapshot.family, num_layers, exclude=exclude)
    result_audit.alphas = lmq.alphas
    return Quantized(ctx, inputs, model, processor, lmq, result_audit, forward_loop, probe, fallback_report,
                     params_per_device)


@dataclass
class Quantized:
    """A quantized model, ready to export: the quantized state (`state`, vlmq.quantize.state.QuantizedModel) that
    every format is written from, the live model (ModelOpt's fake-quant W8A8), its processor, and what the
    manifest records (calibration, audit, recipe)."""

    ctx: RunContext
    inputs: Inputs
    model: torch.nn.Module | None
    processor: Any
    lmq: Any                                # vlmq.quantize.steps.LMQuantization
    audit: Any                              # vlmq.quantize.calibrate.Audit
    forward_loop: Any
    probe: Any                              # KLProbe on the held-out samples (export.score, quant.max_kl), or None
    fallback_report: dict[str, Any] | None
    params_per_device: dict[str, int]
    tool: str = "vlmq quantize"
    command_line: str = field(default_factory=lambda: " ".join(sys.argv))
    log_dir: Path | None = None             # the run's log folder (the CLI's run_dir); the manifest's run_dir
    workdir: Any = None                     # vlmq.quantize's temporary folder (the demo snapshot): lives with this
    dtype_choice: Any = None                # vlmq.quantize.peaks.DtypeChoice of the last export

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def state(self) -> Any:
        return self.lmq.state

    def export(self, out_dir: str | Path | None = None, formats: str | list[str] | None = None,
               force: bool | None = None, *, release: bool = False) -> dict[str, Any]:
        """Write `formats` (`export.formats`) under `out_dir` (`export.dir`) atomically, with manifest.json; an
        existing export is replaced only with `force` (`force`). Each format is then scored against bf16 on the
        held-out samples (`export.score`). Returns the manifest. `release`: free the state and the live model
        before scoring (the CLI's memory peak); this object cannot export again."""
        cfg, target = export_config(self.cfg, out_dir, formats, force), self.ctx.export_dir
        if out_dir is not None:
            target = cfg.resolve_path(str(out_dir))
        return write_exports(self, cfg, target, release)


def export_config(cfg: Config, out_dir: str | Path | None, formats: str | list[str] | None,
                  force: bool | None) -> Config:
    """`cfg` with the export arguments given (None: the config's), checked like the config's own values."""
    export = cfg.export
    if out_dir is not None:
        export = dataclasses.replace(export, dir=str(out_dir))
    if formats is not None:
        export = dataclasses.replace(export, formats=[formats] if isinstance(formats, str) else list(formats))
    out = dataclasses.replace(cfg, export=export, force=cfg.force if force is None else bool(force))
    check_values(out)
    return out


def write_exports(q: Quantized, cfg: Config, target: Path, release: bool = False) -> dict[str, Any]:
    """Every format of `cfg.export.formats` from the one quantized state into `target` (staged, swapped in
    atomically), scored, with the manifest; returns the manifest."""
    from vlmq.export import get_exporter
    from vlmq.export.atomic import ExportError, atomic_directory
    from vlmq.export.manifest import write_manifest
    from vlmq.quantize.peaks import checkpoint_dtype

    if q.model is None:
        raise ExportError("this quantized model was released by an earlier export(release=True); quantize again")
    ctx, formats = q.ctx, export_formats(cfg)
    if q.state is not None:
        q.dtype_choice = checkpoint_dtype(cfg.export.dtype, q.inputs.snapshot, q.model, q.state.peaks)
        q.state.dtype = q.dtype_choice.dtype
    exports: dict[str, dict] = {}
    estimate = len(formats) * (estimate_export_bytes(q.model, q.audit.quantized) + q.inputs.other_bytes)
    with ctx.stage("export"), library_chatter_to_log(), atomic_directory(target, cfg.force, estimate) as staging:
        with progress_bar("exporting", len(formats)) as advance:
            for fmt in formats:
                started = time.perf_counter()
                exports[fmt] = get_exporter(fmt)(q.model, q.processor, staging / fmt, cfg=cfg,
                                                 family=q.inputs.snapshot.family, audit=q.audit, state=q.state)
                exports[fmt]["bytes"] = dir_bytes(staging / fmt, "*.safetensors")
                exports[fmt]["seconds"] = round(time.perf_counter() - started, 3)
                advance(1)
        if cfg.export.score and q.probe is not None:
            if release:   # the state and the fake-quant model are done with; each export is loaded in its place
                q.lmq.state = None
                q.model = None
                gc.collect()
            with ctx.stage("score_exports"):
                reused = {id(s) for s in q.inputs.samples} & {id(s) for s in q.inputs.held_out}   # tiny data
                score_exports(exports, staging, q.probe, cfg.device, held_out_is_calibration=bool(reused))
        manifest = manifest_body(q, cfg, target, exports, estimate)
        write_manifest(staging, manifest)
    return manifest


def manifest_body(q: Quantized, cfg: Config, target: Path, exports: dict[str, dict], estimate: int
                  ) -> dict[str, Any]:
    from vlmq.export.manifest import package_versions

    ctx, lmq, loop = q.ctx, q.lmq, q.forward_loop
    return {
        "tool": q.tool,
        "command_line": q.command_line,
        "demo": ctx.demo,
        "snapshot": str(q.inputs.snapshot.path),
        "config": cfg.to_dict(),
        "modelopt_recipe": lmq.recipe,
        "recipe_steps": list(cfg.quant.steps),
        "versions": package_versions(),
        "calibration": {**q.inputs.stats.to_dict(), "root": str(ctx.calib_root),
                        "batch_size": loop.last_log.__dict__ if loop.last_log else None},
        "modules": q.audit.to_dict(),
        "smoothquant": {"alpha_search": cfg.quant.alpha_search,
                        "alpha": None if cfg.quant.alpha_search else cfg.quant.alpha,
                        "search": lmq.search.to_dict() if lmq.search is not None else None},
        "sensitivity_fallback": q.fallback_report,
        "exports": exports,
        "checkpoint_dtype": q.dtype_choice.to_dict() if q.dtype_choice is not None else None,
        "sizes": {"bf16_safetensors_bytes": q.inputs.bf16_bytes, "export_estimate_bytes": estimate},
        "timings_s": {**ctx.timings, "export": round(sum(e["seconds"] for e in exports.values()), 3)},
        "fidelity_warning": fidelity_warning(exports),
        "peak_memory": peak_memory(),
        "params_per_device": q.params_per_device,
        "run_dir": str(q.log_dir) if q.log_dir is not None else None,
        "export_dir": str(target),
    }


def run_quantize(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """The whole `vlmq quantize` job; returns the manifest body."""
    from vlmq.export.atomic import check_free_space, check_target, clean_stale_staging

    ctx = start(cfg, run_dir)
    # Cheap checks first: output target, calibration data, snapshot config; then load weights.
    clean_stale_staging(ctx.export_dir)  # staging dirs of killed runs (their pid is gone)
    check_target(ctx.export_dir, cfg.force)
    with ctx.stage("prepare"), library_chatter_to_log():
        inputs = prepare(ctx)
        # Fail before hours of calibration when even the smallest possible export (int8 = half of
        # bf16, per format) cannot fit; the exact estimate is checked again right before export.
        check_free_space(ctx.export_dir.parent, len(export_formats(cfg)) * inputs.bf16_bytes // 2)
    quantized = quantize_prepared(ctx, inputs)
    quantized.log_dir = run_dir
    manifest = quantized.export(release=True)
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
        fallback = choose_fallback(model, sens, probe, cfg.quant.max_kl, snapshot.family)
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
