"""compressed-tensors `int-quantized` W8A8: the checkpoint vLLM, SGLang and transformers load.

Built from the same ModelOpt calibration: the per-channel activation maxima ModelOpt recorded are
used to fold SmoothQuant into a clean bf16 copy of the model (vlmq.export.fold), whose LM linears
are then quantized to int8 per output channel; activations are int8 static per-tensor (input_scale
from calibration) or dynamic per-token. Written with compressed-tensors' own API.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmq.export import register_exporter
from vlmq.export.fold import collect_act_amax, fold_smoothquant
from vlmq.export.modelopt_hf import copy_processor_files
from vlmq.models.families import Family
from vlmq.runtime.linear import quantize_weight_per_channel


def w8a8_scheme(activations: str, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    if activations == "dynamic":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    else:
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts)


def ignore_list(model: nn.Module, family: Family, quantized: list[str]) -> list[str]:
    """Every Linear not quantized (vision tower, merger, lm_head), by name.

    Loaders match `ignore` against different names: transformers 5 against its in-memory modules
    (`model.visual.blocks.0.attn.qkv`), vLLM against the checkpoint's (`visual.blocks.0.attn.qkv`,
    mapped by its own prefix table). Each module is listed under both, so every loader finds it."""
    keep = set(quantized)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in keep]
    return list(dict.fromkeys([family.checkpoint_name(n) for n in names] + names))


@torch.no_grad()
def fold_and_quantize(model: nn.Module, family: Family, act_amax: dict[str, torch.Tensor], quantized: list[str],
                      alpha: float | Mapping[str, float], activations: str = "static", smooth_o_proj: bool = True):
    """Fold SmoothQuant into the bf16 `model`, then attach and fill the W8A8 scheme on `quantized`.

    `alpha` is one value or per linear (quant.alpha_search); LM linears not in `quantized` (the
    sensitivity fallback's) stay bf16 and are named in the `ignore` list.

    Returns (model, QuantizationConfig, the fold's report); weights are still floating point until compressed."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
    )

    fold = fold_smoothquant(model, family, act_amax, alpha, smooth_o_proj)
    qconfig = QuantizationConfig(
        config_groups={"group_0": w8a8_scheme(activations, ["Linear"])},
        ignore=ignore_list(model, family, quantized),
        quantization_status=QuantizationStatus.FROZEN,
    )
    apply_quantization_config(model, qconfig)
    modules = dict(model.named_modules())
    for name in quantized:
        module = modules[name]
        # Scales are kept in float32 (compressed-tensors would make them bf16, 3 significant digits).
        _, scale = quantize_weight_per_channel(module.weight)
        module.weight_scale = nn.Parameter(scale.view_as(module.weight_scale).float(), requires_grad=False)
        if activations == "static":
            value = torch.tensor(fold.input_amax[name] / 127.0)
            module.input_scale = nn.Parameter(value.view_as(module.input_scale).float(), requires_grad=False)
        module.quantization_status = QuantizationStatus.FROZEN
    return model, qconfig, fold


def save_compressed(model: nn.Module, qconfig, out_dir: Path) -> None:
    """Compress weights to int8 with compressed-tensors and save model + quantization_config."""
    from compressed_tensors.compressors import ModelCompressor

    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="int-quantized")
    compressor.compress_model(model)
    compressor.quantization_config.ignore = list(qconfig.ignore)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))


def load_clean_copy(snapshot: Path, dtype: torch.dtype = torch.bfloat16, family: Family | None = None) -> nn.Module:
    """A fresh unquantized copy of the snapshot on CPU (ModelOpt has changed the live model)."""
    from transformers import AutoModelForImageTextToText

    model_class = family.model_class() if family is not None else AutoModelForImageTextToText
    model = model_class.from_pretrained(snapshot, dtype=dtype, use_safetensors=True)
    return model.to("cpu").eval()


@register_exporter("compressed_tensors")
def export_compressed_tensors(model: nn.Module, processor, out_dir: Path, *, cfg: Any, family: Family,
                              audit: Any, snapshot: Path, **_: object) -> dict:
    act_amax = collect_act_amax(model, audit.quantized)
    clean = load_clean_copy(snapshot, family=family)
    alpha = getattr(audit, "alphas", None) or cfg.quant.alpha   # per linear after quant.alpha_search
    clean, qconfig, fold = fold_and_quantize(clean, family, act_amax, audit.quantized, alpha,
                                             cfg.export.activations, cfg.export.smooth_o_proj)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_compressed(clean, qconfig, out_dir)
    copy_processor_files(processor, getattr(model, "generation_config", None), out_dir)
    return {"format": "compressed_tensors", "path": out_dir.name, "activations": cfg.export.activations,
            "smooth_o_proj": cfg.export.smooth_o_proj, "ignore": len(qconfig.ignore),
            "smoothed_linears": len(fold.factors)}
