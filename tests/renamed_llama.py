"""A tiny Llama whose modules have other names than transformers' Llama, for tests of a family registered
from outside vlmq (tests/test_custom_family.py).

`RenamedLlamaForCausalLM` is transformers' own Llama (its forward, cache, generate and save/load) with its
decoder modules renamed: layers -> blocks, self_attn -> attn (wq, wk, wv, wo), mlp -> ffn (w1, w3, w2),
input_layernorm -> attn_norm, post_attention_layernorm -> ffn_norm, final norm -> ln_f. transformers'
forwards still reach them by their old names through read-only aliases; the state dict, `named_modules`
and the checkpoint only know the new names. `registered()` makes the Auto classes load it by model_type
for as long as it is held.
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)

MODEL_TYPE = "vlmq_renamed_llama"


def _rename(module: nn.Module, names: dict[str, str]) -> None:
    """Rename children of `module` in place, keeping their order."""
    module._modules = OrderedDict((names.get(k, k), v) for k, v in module._modules.items())


def _alias(name: str) -> property:
    """A read-only attribute that is the child `name` (transformers' forwards use the old names)."""
    return property(lambda self: self._modules[name])


class RenamedAttention(LlamaAttention):
    q_proj, k_proj, v_proj, o_proj = _alias("wq"), _alias("wk"), _alias("wv"), _alias("wo")

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        _rename(self, {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"})


class RenamedMLP(LlamaMLP):
    gate_proj, up_proj, down_proj = _alias("w1"), _alias("w3"), _alias("w2")

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        _rename(self, {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"})


class RenamedLayer(LlamaDecoderLayer):
    self_attn, mlp = _alias("attn"), _alias("ffn")
    input_layernorm, post_attention_layernorm = _alias("attn_norm"), _alias("ffn_norm")

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self._modules["self_attn"] = RenamedAttention(config, layer_idx)
        self._modules["mlp"] = RenamedMLP(config)
        _rename(self, {"self_attn": "attn", "mlp": "ffn", "input_layernorm": "attn_norm",
                       "post_attention_layernorm": "ffn_norm"})


class RenamedLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE


class RenamedLlamaModel(LlamaModel):
    config_class = RenamedLlamaConfig
    layers, norm = _alias("blocks"), _alias("ln_f")

    def __init__(self, config: RenamedLlamaConfig) -> None:
        super().__init__(config)
        self._modules["layers"] = nn.ModuleList(RenamedLayer(config, i) for i in range(config.num_hidden_layers))
        _rename(self, {"layers": "blocks", "norm": "ln_f"})
        self.post_init()


class RenamedLlamaForCausalLM(LlamaForCausalLM):
    config_class = RenamedLlamaConfig

    def __init__(self, config: RenamedLlamaConfig) -> None:
        super().__init__(config)
        self.model = RenamedLlamaModel(config)
        self.post_init()


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """transformers' AutoConfig / AutoModelForCausalLM know MODEL_TYPE while this is held."""
    AutoConfig.register(MODEL_TYPE, RenamedLlamaConfig)
    AutoModelForCausalLM.register(RenamedLlamaConfig, RenamedLlamaForCausalLM)
    try:
        yield
    finally:
        CONFIG_MAPPING._extra_content.pop(MODEL_TYPE, None)
        MODEL_FOR_CAUSAL_LM_MAPPING._extra_content.pop(RenamedLlamaConfig, None)


def write_snapshot(target: Path, seed: int) -> Path:
    """A tiny random RenamedLlama (the demo text model's shape) with the demo tokenizer, saved like a download."""
    from vlmq.models.demo import DEMO_CONFIG_PATH, build_demo_tokenizer, random_model, save_snapshot

    base = json.loads(DEMO_CONFIG_PATH.read_text())["text_config"]
    text = {k: v for k, v in base.items() if k not in ("model_type", "rope_parameters")}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    return save_snapshot(target, random_model(RenamedLlamaForCausalLM, RenamedLlamaConfig(**text), seed),
                         build_demo_tokenizer())
