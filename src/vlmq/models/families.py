"""Per-family facts: where the language model, vision tower and decoder layers live, and a decoder layer's
structure: its linears, which norm feeds which linears, which linears engines fuse, and the residual stream.
Everything that walks a model's layers (fold, rotate, alpha search, the bf16 fallback, the lean decode loop,
bench) reads it here, so a family with other module names is one `register` call. One registry keyed by
model_type; an unknown architecture is an error, never a silent default."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SmoothGroup:
    """Linears that read the same input, and the module whose output that input is."""

    producer: str            # relative to a decoder layer, e.g. "input_layernorm"
    consumers: tuple[str, ...]  # e.g. ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    kind: str                # "norm" (scale the gain), "linear_rows" (scale output rows), "attn_v" (v_proj rows, GQA)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    language_model: str           # module path of the decoder stack
    layers: str                   # module path of the decoder layers (a ModuleList)
    vision: tuple[str, ...]       # module paths kept in bf16 (vision tower incl. merger)
    keep_bf16: tuple[str, ...]    # other module paths kept in bf16 (embeddings, lm_head)
    linears: tuple[str, ...]      # quantized linears, relative to a decoder layer
    smooth_groups: tuple[SmoothGroup, ...] = field(default=())
    # Checkpoint key prefixes as saved by `save_pretrained` (transformers' legacy layout).
    ckpt_language_model: str = "model"
    ckpt_vision: str = "visual"
    auto_class: str = "AutoModelForImageTextToText"   # the transformers Auto class that loads it
    # The residual stream, for rotations (vlmq.quantize.rotate): where it starts (embedding, and the vision
    # linears whose output replaces image-token embeddings), the layer linears that write into it, and its end.
    embed: str = ""
    final_norm: str = ""
    lm_head: str = "lm_head"
    residual_writers: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    vision_out: tuple[str, ...] = ()
    # Linears of a decoder layer that engines run as one GEMM over one input (vLLM's qkv_proj, gate_up_proj),
    # each in the order its outputs are concatenated: (q, k, v), (gate, up). The bf16 fallback keeps such a
    # group whole; the lean decode loop fuses them.
    fused: tuple[tuple[str, ...], ...] = ()
    rotary_emb: str = ""          # the language model's rotary embedding module (the lean decode loop)

    @property
    def norm_groups(self) -> tuple[SmoothGroup, ...]:
        """The RMSNorms inside a decoder layer and the linears that read them."""
        return tuple(g for g in self.smooth_groups if g.kind == "norm")

    @property
    def shared_inputs(self) -> tuple[tuple[str, ...], ...]:
        """A decoder layer's linears grouped by the tensor they read, in `linears` order: the readers of one
        norm together, every other linear alone."""
        groups: list[tuple[str, ...]] = []
        for linear in self.linears:
            norm = next((g for g in self.norm_groups if linear in g.consumers), None)
            group = tuple(c for c in norm.consumers if c in self.linears) if norm else (linear,)
            if group not in groups:
                groups.append(group)
        return tuple(groups)

    @property
    def value_pair(self) -> tuple[str, str] | None:
        """(v_proj, o_proj): the producer and consumer of the per-head attention values."""
        group = next((g for g in self.smooth_groups if g.kind == "attn_v"), None)
        return (group.producer, group.consumers[0]) if group else None

    @property
    def mlp_pair(self) -> tuple[str, str] | None:
        """(up_proj, down_proj): the MLP's last linear and the one whose rows scale its input."""
        group = next((g for g in self.smooth_groups if g.kind == "linear_rows"), None)
        return (group.producer, group.consumers[0]) if group else None

    def checkpoint_name(self, name: str) -> str:
        """In-memory module path -> the path `save_pretrained` writes (transformers' legacy layout)."""
        lm_prefix = self.language_model + "."
        if name.startswith(lm_prefix):
            return f"{self.ckpt_language_model}.{name[len(lm_prefix):]}"
        for vision in self.vision:
            if self.ckpt_vision and (name == vision or name.startswith(vision + ".")):
                return self.ckpt_vision + name[len(vision):]
        return name

    def module_name(self, ckpt_name: str) -> str:
        """Checkpoint key prefix (transformers' legacy layout) -> in-memory module path."""
        lm = self.ckpt_language_model + "."
        if ckpt_name.startswith(lm):
            return f"{self.language_model}.{ckpt_name[len(lm):]}"
        vision = self.ckpt_vision + "."
        if self.ckpt_vision and ckpt_name.startswith(vision):
            return f"{self.vision[0]}.{ckpt_name[len(vision):]}"
        return ckpt_name

    def model_class(self):
        import transformers

        return getattr(transformers, self.auto_class)


QWEN_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
QWEN_FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
QWEN_SMOOTH_GROUPS = (
    SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm"),
    SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm"),
    SmoothGroup("mlp.up_proj", ("mlp.down_proj",), "linear_rows"),
    SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), "attn_v"),
)

FAMILIES: dict[str, Family] = {}


class FamilyError(ValueError):
    """A family whose fields disagree with each other (one line, said at registration)."""


def check_family(family: Family) -> None:
    """Every name a family's structure uses is one of its linears (or, for a group's producer, a norm)."""
    linears = set(family.linears)
    named = [("fused", m) for g in family.fused for m in g] + [("residual_writers", m) for m in family.residual_writers]
    for group in family.smooth_groups:
        named += [("smooth_groups", c) for c in group.consumers]
        if group.kind != "norm":
            named.append(("smooth_groups", group.producer))
    for field_name, name in named:
        if name not in linears:
            raise FamilyError(f"family {family.name}: {field_name} names {name!r}, which is not one of its linears")
    if family.layers and not family.layers.startswith(family.language_model + "."):
        raise FamilyError(f"family {family.name}: layers {family.layers!r} is not inside {family.language_model!r}")


def register(family: Family) -> Family:
    check_family(family)
    for model_type in family.model_types:
        FAMILIES[model_type] = family
    return family


# Qwen VLMs: the decoder is `model.language_model`, the vision tower (with its merger) `model.visual`.
for _name, _arch in (("qwen2_vl", "Qwen2VLForConditionalGeneration"),
                     ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration")):
    register(Family(
        name=_name, model_types=(_name,), architectures=(_arch,), language_model="model.language_model",
        layers="model.language_model.layers", vision=("model.visual",),
        keep_bf16=("model.language_model.embed_tokens", "lm_head"), linears=QWEN_LINEARS,
        smooth_groups=QWEN_SMOOTH_GROUPS, embed="model.language_model.embed_tokens",
        final_norm="model.language_model.norm", vision_out=("model.visual.merger.mlp.2",), fused=QWEN_FUSED,
        rotary_emb="model.language_model.rotary_emb",
    ))

# Qwen3-VL saves its checkpoints under the in-memory names (no legacy key layout).
register(Family(
    name="qwen3_vl", model_types=("qwen3_vl",), architectures=("Qwen3VLForConditionalGeneration",),
    language_model="model.language_model", layers="model.language_model.layers", vision=("model.visual",),
    keep_bf16=("model.language_model.embed_tokens", "lm_head"), linears=QWEN_LINEARS,
    smooth_groups=QWEN_SMOOTH_GROUPS, ckpt_language_model="model.language_model", ckpt_vision="model.visual",
    embed="model.language_model.embed_tokens", final_norm="model.language_model.norm",
    vision_out=(),   # its merger and deepstack mergers: not mapped yet, so rotations refuse Qwen3-VL
    fused=QWEN_FUSED, rotary_emb="model.language_model.rotary_emb",
))

# Text-only causal LMs: the decoder is `model`, there is no vision tower.
for _name, _types, _archs in (
    ("qwen2", ("qwen2",), ("Qwen2ForCausalLM",)),
    ("qwen3", ("qwen3",), ("Qwen3ForCausalLM",)),
    ("llama", ("llama",), ("LlamaForCausalLM",)),
):
    register(Family(
        name=_name, model_types=_types, architectures=_archs, language_model="model", layers="model.layers",
        vision=(), keep_bf16=("model.embed_tokens", "lm_head"), linears=QWEN_LINEARS,
        smooth_groups=QWEN_SMOOTH_GROUPS, ckpt_language_model="model", ckpt_vision="",
        auto_class="AutoModelForCausalLM", embed="model.embed_tokens", final_norm="model.norm", fused=QWEN_FUSED,
        rotary_emb="model.rotary_emb",
    ))


class UnsupportedModelError(ValueError):
    pass


def family_for(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(f"unsupported model_type '{model_type}' (vlmq supports: {supported})")
    return FAMILIES[model_type]


def quantized_linear_names(family: Family, num_layers: int) -> list[str]:
    """Full module paths of every linear vlmq quantizes, in layer order."""
    return [f"{family.layers}.{i}.{lin}" for i in range(num_layers) for lin in family.linears]
