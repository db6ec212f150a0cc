"""compressed-tensors `int-quantized` W8A8: the checkpoint vLLM, SGLang and transformers load.

Written from the quantized state (vlmq.quantize.state): SmoothQuant folded into neighbouring weights,
int8 per-output-channel weights, activations int8 dynamic per-token or static per-tensor
(input_scale from calibration). Tensors are streamed shard by shard under the names transformers'
`save_pretrained` uses; the quantization_config is compressed-tensors' own object and writer.

`fold_and_quantize` + `save_compressed` are the independent reference writer the tests compare with:
a folded float model compressed by compressed-tensors' ModelCompressor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from vlmq.export.checkpoint import (
    MAX_SHARD_BYTES,
    checkpoint_tensors,
    copy_processor_files,
    ignore_list,
    save_config,
    write_shards,
)
from vlmq.export.registry import register_exporter
from vlmq.models.families import Family
from vlmq.numerics import quantize_weight_per_channel
from vlmq.quantize.fold import fold_smoothquant
from vlmq.quantize.state import QuantizedModel


def w8a8_scheme(activations: str, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False)
    if activations == "dynamic":
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    else:
        acts = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)
    return QuantizationScheme(targets=targets, weights=weights, input_activations=acts)


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


def kv_cache_scheme(kv_cache: str):
    """compressed-tensors' `kv_cache_scheme` for `quant.kv_cache` (None: the KV cache stays in the model dtype).
    fp8: static per-tensor symmetric FP8 (E4M3), one k_scale / v_scale per attention layer; what vLLM's
    CompressedTensorsKVCacheMethod accepts."""
    from compressed_tensors.quantization import QuantizationArgs

    if kv_cache == "none":
        return None
    if kv_cache != "fp8":
        raise ValueError(f"no compressed-tensors KV-cache scheme for quant.kv_cache={kv_cache!r}")
    return QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)


def quantization_config(state: QuantizedModel):
    """compressed-tensors' own config object for the state (what vLLM and transformers read)."""
    from compressed_tensors.quantization import QuantizationConfig

    scheme = w8a8_scheme(state.activations, ["Linear"])
    if "format" in type(scheme).model_fields:
        scheme.format = "int-quantized"
    return QuantizationConfig(config_groups={"group_0": scheme},
                              ignore=ignore_list(state.model, state.family, list(state.linears)),
                              kv_cache_scheme=kv_cache_scheme(state.kv_cache),
                              quantization_status="compressed", format="int-quantized")


def transform_config(state: QuantizedModel):
    """compressed-tensors' TransformConfig for the online input Hadamards (R4), or None: one `hadamard` scheme
    (vLLM runs it with its hadacore kernel, blocks of `head_dim`) on the input of every linear of that kind in
    the decoder layers, matched by a regex that holds under both transformers' and vLLM's module names."""
    hadamards = state.rotations.get("input_hadamards") or {}
    if not hadamards:
        return None
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    blocks = set(hadamards.values())
    if len(blocks) != 1:
        raise ValueError(f"input Hadamards of different block sizes {sorted(blocks)} need one scheme each")
    layers = state.family.layers.rsplit(".", 1)[-1]
    relative = sorted({n.split(f"{state.family.layers}.", 1)[1].split(".", 1)[1] for n in hadamards})
    targets = [rf"re:.*\.{layers}\.\d+\.{re.escape(rel)}$" for rel in relative]
    scheme = TransformScheme(type="hadamard", head_dim=blocks.pop(), randomize=False,
                             apply=[TransformArgs(targets=targets, location="input")])
    return TransformConfig(config_groups={"R4": scheme})


def write_compressed_tensors(state: QuantizedModel, processor, out_dir: Path,
                             max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """The compressed-tensors `int-quantized` checkpoint of `state`: weights, config with its
    quantization_config (compressed-tensors' own writer), processor and generation config."""
    from compressed_tensors.compressors import ModelCompressor

    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_shards(checkpoint_tensors(state), out_dir, max_shard_bytes)
    save_config(state, out_dir)
    ModelCompressor(quantization_config=quantization_config(state),
                    transform_config=transform_config(state)).update_config(str(out_dir))
    copy_processor_files(processor, getattr(state.model, "generation_config", None), out_dir)
    return files


@register_exporter("compressed_tensors")
def export_compressed_tensors(model: nn.Module, processor, out_dir: Path, *, state: QuantizedModel,
                              **_: object) -> dict:
    write_compressed_tensors(state, processor, out_dir)
    return {"format": "compressed_tensors", "path": out_dir.name, "activations": state.activations,
            "smooth_o_proj": state.smooth_o_proj, "ignore": len(quantization_config(state).ignore),
            "smoothed_linears": sum(s.smoothing is not None for s in state.linears.values()),
            "kv_cache": state.kv_cache, "kv_scale_layers": len(state.kv_scales)}
