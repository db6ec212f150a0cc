"""How to quantize: run ModelOpt with a forward loop over the full VLM, then audit the result."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmq.calib import CalibStats
from vlmq.models.families import Family, quantized_linear_names

log = logging.getLogger(__name__)

# Without a GPU there is no out-of-memory signal to back off from, so "auto" means this on CPU.
CPU_AUTO_BATCH = 4
CUDA_AUTO_BATCH = 64


class CalibrationOOMError(RuntimeError):
    pass


class QuantizationAuditError(RuntimeError):
    pass


@dataclass
class CalibrationLog:
    batches: int = 0
    samples: int = 0
    batch_size_start: int = 0
    batch_size_final: int = 0
    oom_backoffs: list[int] = field(default_factory=list)


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def model_device(model: nn.Module) -> torch.device:
    return next(p.device for p in model.parameters())


def forward_all(model: nn.Module, samples: Sequence[Any], make_batches: Callable[[Sequence[Any]], list[dict]],
                batch_size: int, progress: Callable[[int], None] | None = None,
                record: CalibrationLog | None = None) -> CalibrationLog:
    """Forward every sample through the full VLM (vision tower -> merger -> LM).

    On CUDA out-of-memory the batch size halves and the failed slice is retried, down to 1. The
    batches before the failure in that slice run again: harmless for max calibration (running maxima),
    while the alpha search's input sampler may keep those rows twice.
    """
    record = record or CalibrationLog(batch_size_start=batch_size)
    device = model_device(model)
    start = 0
    while start < len(samples):
        chunk = samples[start:start + batch_size]
        try:
            for batch in make_batches(chunk):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                with torch.no_grad():
                    # lm_head stays bf16 and needs no statistics: skip the full-vocabulary logits
                    model(**batch, use_cache=False, logits_to_keep=1)
                record.batches += 1
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err):
                raise
            if batch_size == 1:
                tried = "->".join(str(b) for b in [record.batch_size_start, *record.oom_backoffs])
                raise CalibrationOOMError(
                    f"out of GPU memory even at calib.batch_size=1 (tried {tried}); "
                    "lower calib.max_length, free the GPU, or shard over more GPUs (arch.max_memory)"
                ) from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            record.oom_backoffs.append(batch_size)
            log.warning("CUDA out of memory: retrying with calib.batch_size=%d", batch_size)
            continue
        start += len(chunk)
        record.samples += len(chunk)
        if progress:
            progress(len(chunk))
    record.batch_size_final = batch_size
    return record


def resolve_batch_size(value: str, device: torch.device) -> int:
    if value != "auto":
        return int(value)
    return CUDA_AUTO_BATCH if device.type == "cuda" else CPU_AUTO_BATCH


class ForwardLoop:
    """ModelOpt's forward loop over ``samples``: the full VLM, in batches of ``batch_size`` with OOM
    back-off (`forward_all`). Each call recounts ``stats`` (samples, tokens, the batcher's skips) on top
    of the skips the loader counted, so a second calibration pass (the sensitivity fallback's
    re-quantization) does not count anything twice. ``last_log``: the batch sizes of the latest call;
    ``progress`` names a progress bar."""

    def __init__(self, samples: Sequence[Any], processor: Any, max_length: int, batch_size: int,
                 stats: CalibStats, progress: str | None = None) -> None:
        self.samples, self.processor, self.max_length = samples, processor, max_length
        self.batch_size, self.stats, self.progress = batch_size, stats, progress
        self.loader_skips = CalibStats(requested=0)
        self.loader_skips.add_skips(stats)
        self.last_log: CalibrationLog | None = None

    def __call__(self, model: nn.Module) -> None:
        from vlmq.calib.batches import make_batches
        from vlmq.console import progress_bar

        stats = self.stats
        stats.samples = stats.images = stats.tokens = stats.truncated = 0
        stats.skipped, stats.skipped_examples = {}, []
        stats.add_skips(self.loader_skips)
        chunk_stats = CalibStats(requested=0)

        def batches_for(chunk: Sequence[Any]) -> list[dict]:
            nonlocal chunk_stats  # a chunk counts once its forward pass succeeded (OOM retries re-batch it)
            chunk_stats = CalibStats(requested=len(chunk))
            return make_batches(self.processor, list(chunk), len(chunk), self.max_length, chunk_stats)

        bar = progress_bar(self.progress, len(self.samples)) if self.progress else nullcontext(lambda n: None)
        with bar as advance:
            def done(n: int) -> None:
                stats.add_batch(chunk_stats)
                advance(n)

            self.last_log = forward_all(model, self.samples, batches_for, self.batch_size, done)


def quantize(model: nn.Module, modelopt_config: dict, forward_loop: Callable[[nn.Module], None]) -> nn.Module:
    """The one verb: ModelOpt calibration + fake quantization in place."""
    import modelopt.torch.quantization as mtq

    return mtq.quantize(model, modelopt_config, forward_loop)


@dataclass
class Audit:
    quantized: list[str]
    excluded: list[str]     # linears left in bf16, each under a keep-bf16 prefix
    fallback_bf16: list[str] = field(default_factory=list)  # LM linears kept bf16 on purpose (quant.max_kl)
    alphas: dict[str, float] | None = None  # per-linear SmoothQuant alpha (quant.alpha_search), for the exports

    def to_dict(self) -> dict:
        out = {"quantized": self.quantized, "excluded": self.excluded, "fallback_bf16": self.fallback_bf16}
        if self.alphas is not None:
            out["alpha"] = self.alphas
        return out


def _has_enabled_quantizer(module: nn.Module) -> bool:
    return any(
        getattr(getattr(module, name, None), "is_enabled", False)
        for name in ("weight_quantizer", "input_quantizer", "output_quantizer")
    )


def audit(model: nn.Module, family: Family, num_layers: int, exclude: Sequence[str] = ()) -> Audit:
    """Prove that exactly the LM's decoder linears are quantized and nothing else.

    `exclude` names LM linears deliberately kept in bf16 (sensitivity fallback)."""
    expected = [n for n in quantized_linear_names(family, num_layers) if n not in set(exclude)]
    modules = dict(model.named_modules())
    quantized = [n for n, m in modules.items() if _has_enabled_quantizer(m) and not n.endswith("_quantizer")]
    missing = sorted(set(expected) - set(quantized))
    extra = sorted(set(quantized) - set(expected))
    if missing:
        raise QuantizationAuditError(f"{len(missing)} language-model linears were not quantized, e.g. {missing[0]}")
    if extra:
        raise QuantizationAuditError(f"{len(extra)} modules outside the language model's linears were quantized, "
                                     f"e.g. {extra[0]}")
    keep = family.vision + family.keep_bf16
    excluded = [n for n, m in modules.items()
                if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv3d)) and n not in quantized
                and (any(n == p or n.startswith(p + ".") for p in keep) or n in exclude)]
    return Audit(quantized=expected, excluded=excluded, fallback_bf16=[n for n in exclude if n in modules])
