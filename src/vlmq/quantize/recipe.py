"""What to quantize, as ModelOpt config data.

The rule order follows ModelOpt's own presets: deny everything, enable what we want, then
re-disable what must stay in high precision. ModelOpt applies the list top to bottom, so a
later entry wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmq.config import QuantConfig
from vlmq.models.families import Family

INT8_PER_CHANNEL = {"num_bits": 8, "axis": 0}   # weights: one scale per output channel
FP8_E4M3_PER_TENSOR = {"num_bits": (4, 3), "axis": None}
# Activations during calibration for the alpha search: per input channel maxima (as ModelOpt's
# smoothquant sets axis=-1 before max calibration); made per-tensor again when smoothing is applied.
INT8_PER_CHANNEL_STATS = {"num_bits": 8, "axis": -1}


def keep_bf16_rules(family: Family) -> list[dict[str, Any]]:
    """Modules that stay bf16 whatever else is enabled: vision tower + merger, embeddings, lm_head."""
    patterns = [f"*{path}*" for path in family.vision + family.keep_bf16]
    patterns += ["*visual*", "*vision_tower*", "*multi_modal_projector*", "*lm_head*", "*embed_tokens*"]
    return [{"quantizer_name": p, "enable": False} for p in dict.fromkeys(patterns)]


def exclude_rules(exclude: Sequence[str]) -> list[dict[str, Any]]:
    """Disable the quantizers of exact LM linears (sensitivity fallback keeps them bf16).

    A linear's only children are its quantizers, so `<name>.*_quantizer` matches exactly those
    (fnmatch is anchored: `layers.1.` never matches `layers.11.`)."""
    return [{"quantizer_name": f"{name}.*_quantizer", "enable": False} for name in dict.fromkeys(exclude)]


def build_modelopt_config(quant: QuantConfig, family: Family, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """The `mtq.quantize` config for INT8 SmoothQuant on the language model's decoder linears.

    The algorithm is ModelOpt's max calibration with per-channel input statistics (what its
    `smoothquant` runs first): the quantized state is built from those statistics and the untouched
    weights, then vlmq.quantize.alpha_search.apply_smoothquant smooths each linear in place with
    ModelOpt's `apply_pre_quant_scale_and_smooth` (one alpha for all is ModelOpt's `smoothquant`
    exactly; tests/test_alpha_search.py). `exclude` names LM linears that stay bf16."""
    layers = f"*{family.layers}.*"
    rules: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    rules.append({"quantizer_name": f"{layers}weight_quantizer", "cfg": dict(INT8_PER_CHANNEL)})
    rules.append({"quantizer_name": f"{layers}input_quantizer", "cfg": dict(INT8_PER_CHANNEL_STATS)})
    if quant.kv_cache == "fp8":
        rules.append({"quantizer_name": f"{layers}[kv]_bmm_quantizer", "cfg": dict(FP8_E4M3_PER_TENSOR)})
    rules += keep_bf16_rules(family)
    rules += exclude_rules(exclude)
    return {"quant_cfg": rules, "algorithm": {"method": "max"}}
