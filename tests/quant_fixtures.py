"""One in-process demo quantization shared by the export/runtime tests (built once per session).

The demo model gets injected outlier channels so SmoothQuant has something to do; the fake-quant
logits are taken before ModelOpt's export (which re-smooths and then int8-packs the live model).
"""

from __future__ import annotations

import copy
import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmq.calib import demo_coco_root, load_coco_captions
from vlmq.calib.batches import make_batches
from vlmq.config import QuantConfig
from vlmq.evaluate.fidelity import batch_logits, fake_quant_copy
from vlmq.export.checkpoint import copy_processor_files
from vlmq.export.compressed_tensors import fold_and_quantize, load_clean_copy, save_compressed
from vlmq.export.modelopt_hf import modelopt_reference_export
from vlmq.models.demo import build_demo_model, build_demo_processor, inject_outliers
from vlmq.models.families import Family, family_for, quantized_linear_names
from vlmq.quantize.fold import collect_act_amax

ALPHA = 0.5

# The SmoothQuant-only recipe: what these ModelOpt-fake-quant comparisons and reference writers reproduce
# (the default adds rotations and GPTQ: tests/test_quantized_state.py, test_rotate.py, test_real_weights.py).
SMOOTHQUANT = ["calibrate", "smooth", "round"]


@dataclass
class DemoQuant:
    family: Family
    processor: object
    model: torch.nn.Module            # bf16 baseline (with outliers)
    snapshot: Path
    calib: list[dict]
    held_out: list[dict]
    names: list[str]                  # quantized linears (in-memory names)
    act_amax: dict[str, torch.Tensor]
    fake_logits: list[torch.Tensor]   # ModelOpt fake-quant (SmoothQuant) on held_out
    resmoothed_logits: list[torch.Tensor]  # ModelOpt fake-quant after export's re-smoothing
    resmoothed_fp32_logits: list[torch.Tensor]  # the same, computed in float32
    plain_logits: list[torch.Tensor]  # ModelOpt plain INT8 (no smoothing) on held_out
    ref_logits: list[torch.Tensor]    # bf16 on held_out
    exports: dict[str, Path]          # modelopt_hf, ct_static, ct_dynamic


def write_ct(d: DemoQuant | None, snapshot: Path, family: Family, act_amax, names, out: Path, activations: str,
             processor, generation_config, smooth_o_proj: bool = True) -> Path:
    clean = load_clean_copy(snapshot)
    clean, qconfig, _ = fold_and_quantize(clean, family, act_amax, names, ALPHA, activations, smooth_o_proj)
    save_compressed(clean, qconfig, out)
    copy_processor_files(processor, generation_config, out)
    return out


@functools.lru_cache(maxsize=1)
def demo_quant() -> DemoQuant:
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    work = Path(tempfile.mkdtemp(prefix="vlmq-test-"))
    family = family_for("qwen2_5_vl")
    processor = build_demo_processor()
    samples, _ = load_coco_captions(demo_coco_root(), num_samples=16, seed=0)
    calib = make_batches(processor, samples[:12], 4, 512)
    held_out = make_batches(processor, samples[12:], 4, 512)
    model = inject_outliers(build_demo_model(torch.bfloat16))
    snapshot = work / "snapshot"
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    names = quantized_linear_names(family, len(model.get_submodule(family.layers)))
    quant = QuantConfig(alpha=ALPHA, steps=SMOOTHQUANT)
    plain_logits = batch_logits(fake_quant_copy(model, family, quant, calib, smoothquant=False), held_out)
    fake = fake_quant_copy(model, family, quant, calib)
    fake_logits = batch_logits(fake, held_out)
    resmoothed = copy.deepcopy(fake)
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(resmoothed)
    resmoothed_logits = batch_logits(resmoothed, held_out)
    # In float32 the fake-quant values are exact, so it can be compared with integer execution.
    resmoothed_fp32_logits = batch_logits(copy.deepcopy(resmoothed).float(), held_out)
    act_amax = collect_act_amax(fake, names)
    exports = {}
    for activations in ("static", "dynamic"):
        exports[f"ct_{activations}"] = write_ct(None, snapshot, family, act_amax, names, work / f"ct_{activations}",
                                                activations, processor, model.generation_config)
    modelopt_reference_export(fake, processor, work / "modelopt_hf")
    exports["modelopt_hf"] = work / "modelopt_hf"
    return DemoQuant(family, processor, model, snapshot, calib, held_out, names, act_amax, fake_logits,
                     resmoothed_logits, resmoothed_fp32_logits, plain_logits, batch_logits(model, held_out), exports)
