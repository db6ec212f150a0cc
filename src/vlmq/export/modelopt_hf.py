"""ModelOpt's unified HF checkpoint (W8A8_SQ_PER_CHANNEL), made self-contained.

Our archival format: int8 weight + per-channel weight_scale + per-tensor input_scale + a separate
pre_quant_scale per linear. No mainstream engine runs it for INT8; compressed_tensors is the
deployable format.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from vlmq.export.registry import register_exporter


def copy_processor_files(processor, generation_config, out_dir: Path) -> None:
    """Processor, tokenizer, chat template and generation config: a checkpoint that stands alone."""
    processor.save_pretrained(out_dir)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)


@register_exporter("modelopt_hf")
def export_modelopt_hf(model: nn.Module, processor, out_dir: Path, **_: object) -> dict:
    """Write ModelOpt's unified HF checkpoint of the fake-quantized `model` to out_dir.

    Note: ModelOpt re-smooths q/k/v and gate/up to shared pre_quant_scales while exporting and
    changes the live model accordingly, so run other exporters first.
    """
    from modelopt.torch.export import export_hf_checkpoint

    out_dir.mkdir(parents=True, exist_ok=True)
    # Pass the dtype explicitly: ModelOpt reads config.torch_dtype, which may be a string.
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    export_hf_checkpoint(model, dtype=dtype, export_dir=str(out_dir))
    copy_processor_files(processor, getattr(model, "generation_config", None), out_dir)
    quant = json.loads((out_dir / "hf_quant_config.json").read_text())["quantization"]
    return {"format": "modelopt_hf", "path": out_dir.name, "quant_algo": quant.get("quant_algo"),
            "exclude_modules": quant.get("exclude_modules", [])}
