"""ModelOpt's unified HF checkpoint layout (`quant_method: modelopt`, `W8A8_SQ_PER_CHANNEL`), written from the
quantized state like every other format.

Per quantized linear: int8 `weight`, fp32 per-channel `weight_scale` [N], fp32 per-tensor static `input_scale`
(the calibrated max |smoothed input| / 127), and `pre_quant_scale` [K] in the model dtype. The state has folded
each SmoothQuant factor into the module before the linear (norm gain, v_proj / up_proj rows), so the stored
`pre_quant_scale` is ones: the same function as ModelOpt's own export, which keeps the factor there instead.
Folded rotations (R1, R2) and GPTQ's rounding are in the weights; an online Hadamard (R4) has no place in this
layout, so a state with one is refused. With an FP8 KV cache, each attention's k/v scales sit under ModelOpt's
names (`self_attn.k_proj.k_scale`, `self_attn.v_proj.v_scale`).

Static per-tensor activations: no mainstream engine runs this layout for INT8 (vLLM's modelopt loader rejects
it), and its fidelity is far below the deployable compressed-tensors export; it is the archival format.
`modelopt_reference_export` is ModelOpt's own exporter of a fake-quantized model: the tests' independent
reference for this layout.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
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
from vlmq.numerics import QMAX
from vlmq.quantize.state import QuantizedModel

QUANT_ALGO = "W8A8_SQ_PER_CHANNEL"


class ModelOptLayoutError(ValueError):
    """The state holds something ModelOpt's layout cannot express."""


def modelopt_module_tensors(state: QuantizedModel, dtype: torch.dtype, name: str, tensors: dict[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
    """One module's tensors as ModelOpt's layout stores them: a quantized linear's static input_scale and
    pre_quant_scale (in the checkpoint's `dtype`) added, its weight_scale [N]; the KV-cache scales on
    k_proj / v_proj as scalars."""
    if name in state.linears:
        linear = state.linears[name]
        if linear.input_amax is None:
            raise ModelOptLayoutError(f"{name}: no calibrated input maximum for ModelOpt's static input_scale")
        return {**tensors, "weight_scale": tensors["weight_scale"].reshape(-1),
                "input_scale": torch.tensor(linear.input_amax / QMAX, dtype=torch.float32),
                "pre_quant_scale": torch.ones(linear.weight.shape[1], dtype=dtype)}
    out = {}
    for leaf, tensor in tensors.items():
        if leaf in ("k_scale", "v_scale"):  # ModelOpt's names: self_attn.k_proj.k_scale, a scalar
            out[f"{leaf[0]}_proj.{leaf}"] = tensor.reshape(())
        else:
            out[leaf] = tensor
    return out


def modelopt_tensors(state: QuantizedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor) for the whole model in ModelOpt's layout."""
    if state.input_hadamards() or state.rotations.get("input_hadamards"):   # bf16 fallbacks read one too
        raise ModelOptLayoutError(
            "ModelOpt's layout has no online Hadamard for down_proj's input (R4): export modelopt_hf with "
            "quant.rotate.mlp_input_block=0, or export compressed_tensors")
    dtype = state.dtype or next(p.dtype for p in state.model.parameters() if p.is_floating_point())
    return checkpoint_tensors(state, functools.partial(modelopt_module_tensors, state, dtype))


def quant_config(state: QuantizedModel) -> dict:
    """hf_quant_config.json's body."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("vlmq")
    except PackageNotFoundError:   # run from a source tree (PYTHONPATH=src)
        ours = "unknown"
    return {"producer": {"name": "vlmq", "version": ours},
            "quantization": {"quant_algo": QUANT_ALGO,
                             "kv_cache_quant_algo": "FP8" if state.kv_cache == "fp8" else None,
                             "exclude_modules": ignore_list(state.model, state.family, list(state.linears))}}


def write_modelopt_hf(state: QuantizedModel, processor, out_dir: Path, max_shard_bytes: int = MAX_SHARD_BYTES
                      ) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_shards(modelopt_tensors(state), out_dir, max_shard_bytes)
    save_config(state, out_dir)
    body = quant_config(state)
    (out_dir / "hf_quant_config.json").write_text(json.dumps(body, indent=4) + "\n")
    config = json.loads((out_dir / "config.json").read_text())
    quant = body["quantization"]
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": QUANT_ALGO,
                                     "kv_cache_quant_algo": quant["kv_cache_quant_algo"],
                                     "ignore": quant["exclude_modules"], "producer": body["producer"]}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_processor_files(processor, getattr(state.model, "generation_config", None), out_dir)
    return files


@register_exporter("modelopt_hf")
def export_modelopt_hf(model: nn.Module, processor, out_dir: Path, *, state: QuantizedModel, **_: object) -> dict:
    write_modelopt_hf(state, processor, out_dir)
    return {"format": "modelopt_hf", "path": out_dir.name, "quant_algo": QUANT_ALGO, "activations": "static",
            "exclude_modules": len(quant_config(state)["quantization"]["exclude_modules"]),
            "kv_cache": state.kv_cache}


def modelopt_reference_export(model: nn.Module, processor, out_dir: Path) -> None:
    """ModelOpt's own unified HF export of the fake-quantized `model` (the tests' reference for this layout).
    ModelOpt re-smooths q/k/v and gate/up to shared pre_quant_scales while exporting and changes the live
    model accordingly."""
    from modelopt.torch.export import export_hf_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    # Pass the dtype explicitly: ModelOpt reads config.torch_dtype, which may be a string.
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    export_hf_checkpoint(model, dtype=dtype, export_dir=str(out_dir))
    copy_processor_files(processor, getattr(model, "generation_config", None), out_dir)
