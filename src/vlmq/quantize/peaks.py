"""The largest activation magnitudes the calibration saw, and the checkpoint dtype they allow.

float16 has 10 mantissa bits against bfloat16's 7, so a W8A8 checkpoint whose float arithmetic (norms,
residual adds, attention, the int8 GEMMs' dequantized outputs) runs in fp16 rounds 8x finer: on SmolLM2
that halves the export's KL to fp32 (docs/QUANTIZATION.md). Its range ends at 65,504, though, and
trained LLMs carry massive activations (SmolLM2: 24,929 in one residual channel, Qwen2 models overflow
fp16 outright). The rotations spread such a channel over all others, so a rotated model often fits.
`export.dtype=auto` therefore takes fp16 only where every recorded peak, times `FP16_HEADROOM`, stays
inside fp16's range, and only for text models: a vision tower is kept in the snapshot's dtype (bf16).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vlmq.models.load import declared_dtype

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_HEADROOM = 16.0   # calibration covers typical inputs, not every input: keep 4 binades spare


class PeakRecorder:
    """Forward hooks on every submodule (ModelOpt's quantizers aside) that keep the largest finite |output|
    each one produced; `peaks()` returns them as floats (one device sync, at the end)."""

    def __init__(self, model: nn.Module):
        self._peaks: dict[str, Tensor] = {}
        self._handles = [module.register_forward_hook(self._hook(name))
                         for name, module in model.named_modules() if name and "_quantizer" not in name]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output) -> None:
            out = output[0] if isinstance(output, tuple) and output else output
            if not isinstance(out, Tensor) or not out.is_floating_point() or out.numel() == 0:
                return
            # |x| and max are exact in the output's own dtype: no fp32 copy of every activation
            peak = torch.nan_to_num(out.detach().abs(), nan=0.0, posinf=0.0).amax().float()
            seen = self._peaks.get(name)
            self._peaks[name] = peak if seen is None else torch.maximum(seen, peak)
        return hook

    def peaks(self) -> dict[str, float]:
        return {name: float(peak) for name, peak in self._peaks.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class DtypeChoice:
    dtype: torch.dtype
    reason: str
    peak: float | None = None   # the largest recorded |activation|
    where: str | None = None    # the module (or "<linear> smoothed input") that produced it

    def to_dict(self) -> dict:
        return {"dtype": str(self.dtype).removeprefix("torch."), "reason": self.reason, "peak": self.peak,
                "where": self.where, "fp16_headroom": FP16_HEADROOM}


def choose_dtype(name: str, snapshot_config: Mapping, peaks: Mapping[str, float] | None = None,
                 has_vision: bool = False) -> DtypeChoice:
    """The checkpoint's float dtype for `export.dtype` = `name`. auto: float16 for a bf16 text model whose
    recorded peaks fit fp16 with FP16_HEADROOM to spare, else the snapshot's declared dtype."""
    top = max(peaks.items(), key=lambda kv: kv[1]) if peaks else (None, None)
    where, peak = top
    if name != "auto":
        return DtypeChoice(getattr(torch, name), "export.dtype", peak, where)
    declared = declared_dtype(dict(snapshot_config))
    keep = DtypeChoice(getattr(torch, declared), "", peak, where)
    if declared != "bfloat16":
        keep.reason = f"the snapshot's {declared}"
    elif has_vision:
        keep.reason = "the snapshot's bfloat16: a vision tower stays bf16 (export.dtype=float16 to override)"
    elif peak is None:
        keep.reason = "the snapshot's bfloat16: no activation peaks were recorded"
    elif peak * FP16_HEADROOM > FP16_MAX:
        keep.reason = (f"the snapshot's bfloat16: peak |activation| {peak:,.0f} at {where} leaves less than "
                       f"{FP16_HEADROOM:g}x headroom under fp16's {FP16_MAX:,.0f}")
    else:
        return DtypeChoice(torch.float16, f"float16: peak |activation| {peak:,.1f} at {where} is "
                                          f"{FP16_MAX / peak:,.0f}x under fp16's range", peak, where)
    return keep


def fp16_overflow_risk(choice: DtypeChoice) -> str | None:
    """A one-line warning when a float16 checkpoint was asked for against the recorded peaks."""
    if choice.dtype == torch.float16 and choice.peak is not None and choice.peak * FP16_HEADROOM > FP16_MAX:
        return (f"export.dtype=float16: peak |activation| {choice.peak:,.0f} at {choice.where} is within "
                f"{FP16_HEADROOM:g}x of fp16's {FP16_MAX:,.0f}; expect overflow (inf/NaN) on some inputs")
    return None


def checkpoint_dtype(name: str, snapshot, model: nn.Module, peaks: Mapping[str, float]) -> DtypeChoice:
    """`export.dtype` resolved for this run (snapshot: vlmq.models.load.Snapshot), logged with its reason."""
    choice = choose_dtype(name, snapshot.config, peaks, has_vision_tower(model, snapshot.family))
    log.info("checkpoint dtype %s (%s)", str(choice.dtype).removeprefix("torch."), choice.reason)
    risk = fp16_overflow_risk(choice)
    if risk:
        log.warning("%s", risk)
    return choice


def may_be_finer_than_bf16(name: str, model: nn.Module, family) -> bool:
    """Whether `export.dtype` = `name` can write this model's float tensors finer than bf16 (fp16 or fp32),
    i.e. whether fp32 copies of its rotated float tensors are worth holding until the export."""
    return not has_vision_tower(model, family) if name == "auto" else name in ("float16", "float32")


def has_vision_tower(model: nn.Module, family) -> bool:
    return any(_has_module(model, path) for path in family.vision)


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
