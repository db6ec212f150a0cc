"""What to quantize, as ModelOpt config data.

The rule order follows ModelOpt's own presets: deny everything, enable what we want, then
re-disable what must stay in high precision. ModelOpt applies the list top to bottom, so a
later entry wins.
"""

from __future__ import annotations

from typing import Any

from vlmq.config import QuantConfig
from vlmq.models.families import Family

INT8_PER_CHANNEL = {"num_bits": 8, "axis": 0}   # weights: one scale per output channel
INT8_PER_TENSOR = {"num_bits": 8, "axis": None}  # activations: one static scale per tensor
FP8_E4M3_PER_TENSOR = {"num_bits": (4, 3), "axis": None}


def keep_bf16_rules(family: Family) -> list[dict[str, Any]]:
    """Modules that stay bf16 whatever else is enabled: vision tower + merger, embeddings, lm_head."""
    patterns = [f"*{path}*" for path in family.vision + family.keep_bf16]
    patterns += ["*visual*", "*vision_tower*", "*multi_modal_projector*", "*lm_head*", "*embed_tokens*"]
    return [{"quantizer_name": p, "enable": False} for p in dict.fromkeys(patterns)]


def build_modelopt_config(quant: QuantConfig, family: Family) -> dict[str, Any]:
    """The `mtq.quantize` config for INT8 SmoothQuant on the language model's decoder linears."""
    layers = f"*{family.layers}.*"
    rules: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    rules.append({"quantizer_name": f"{layers}weight_quantizer", "cfg": dict(INT8_PER_CHANNEL)})
    rules.append({"quantizer_name": f"{layers}input_quantizer", "cfg": dict(INT8_PER_TENSOR)})
    if quant.kv_cache == "fp8":
        rules.append({"quantizer_name": f"{layers}[kv]_bmm_quantizer", "cfg": dict(FP8_E4M3_PER_TENSOR)})
    rules += keep_bf16_rules(family)
    return {"quant_cfg": rules, "algorithm": {"method": "smoothquant", "alpha": float(quant.alpha)}}
