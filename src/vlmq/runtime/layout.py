"""Which modules of a transformers model the lean decode loop (`decode.LeanDecoder`) runs, read from the
model's `Family`: the embedding, rotary embedding, final norm and lm_head, and per decoder layer its two
RMSNorm gains, the fused q/k/v and gate/up linears, o_proj and down_proj.

A decoder layer's roles come from the family's data alone: o and down are the family's value and MLP pairs'
consumers, q/k/v and gate/up its fused groups that end in their producers (v, up), and the norms the
`smooth_groups` producers that feed those groups. A family or model that lacks one of them, or a layer with
weights outside them (e.g. Qwen3's q/k norms), is refused with one line (`LeanDecodeError`): the loop would
otherwise compute another function.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vlmq.models.families import Family
from vlmq.runtime.fusion import fuse_linears


class LeanDecodeError(ValueError):
    """A model the lean decode loop cannot run as it is (one line)."""


@dataclass(frozen=True)
class LayerRoles:
    """A decoder layer's modules by role, relative to the layer."""

    ln1: str
    qkv: tuple[str, ...]
    o: str
    ln2: str
    gate_up: tuple[str, ...]
    down: str

    def modules(self) -> tuple[str, ...]:
        return (self.ln1, *self.qkv, self.o, self.ln2, *self.gate_up, self.down)


@dataclass
class DecodeLayer:
    """One decoder layer as the loop runs it."""

    ln1: Tensor
    qkv: nn.Module
    o: nn.Module
    ln2: Tensor
    gate_up: nn.Module
    down: nn.Module


def _fused_ending_in(family: Family, member: str, size: int, what: str) -> tuple[str, ...]:
    group = next((g for g in family.fused if member in g), None)
    if group is None or len(group) != size or group[-1] != member:
        raise LeanDecodeError(f"the lean decode loop needs the {what} linears as one fused group ending in "
                              f"{member}; family {family.name} has fused={list(family.fused)}")
    return group


def _norm_feeding(family: Family, readers: tuple[str, ...], what: str) -> str:
    group = next((g for g in family.norm_groups if set(g.consumers) == set(readers)), None)
    if group is None:
        raise LeanDecodeError(f"the lean decode loop needs the norm that feeds the {what} linears "
                              f"{list(readers)}; family {family.name} maps none in its smooth_groups")
    return group.producer


def layer_roles(family: Family) -> LayerRoles:
    """A decoder layer's roles from the family's data (`LeanDecodeError` if it does not map one)."""
    if family.value_pair is None or family.mlp_pair is None:
        raise LeanDecodeError(f"the lean decode loop needs the v -> o and up -> down pairs; family "
                              f"{family.name} does not map them in its smooth_groups")
    (v, o), (up, down) = family.value_pair, family.mlp_pair
    qkv = _fused_ending_in(family, v, 3, "q/k/v")
    gate_up = _fused_ending_in(family, up, 2, "gate/up")
    return LayerRoles(_norm_feeding(family, qkv, "q/k/v"), qkv, o, _norm_feeding(family, gate_up, "gate/up"),
                      gate_up, down)


def submodule(model: nn.Module, path: str, family: Family, what: str) -> nn.Module:
    """`model.get_submodule(path)`, or one line saying which of the family's fields does not resolve."""
    if not path:
        raise LeanDecodeError(f"the lean decode loop needs the {what}; family {family.name} does not map it")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise LeanDecodeError(f"family {family.name}'s {what} {path!r} is not a module of this "
                              f"{type(model).__name__}") from None


def _check_covered(layer: nn.Module, roles: LayerRoles, prefix: str) -> None:
    """Every module of the layer with weights of its own is one the loop runs (or inside one)."""
    wired = roles.modules()
    for name, module in layer.named_modules():
        inside = any(name == w or name.startswith(w + ".") for w in wired)
        if not inside and next(module.parameters(recurse=False), None) is not None:
            raise LeanDecodeError(f"{prefix}.{name} has weights that the lean decode loop does not run "
                                  f"(it runs {', '.join(wired)})")
    for norm in (roles.ln1, roles.ln2):
        params = sorted(n for n, _ in layer.get_submodule(norm).named_parameters())
        if params != ["weight"]:
            raise LeanDecodeError(f"{prefix}.{norm} is not an RMSNorm with one gain (parameters {params}); "
                                  "the lean decode loop runs RMSNorm")


def _check_qkv(qkv: list[nn.Module], sizes: tuple[int, int, int], prefix: str, names: tuple[str, ...]) -> None:
    got = tuple(m.out_features for m in qkv)
    if got != sizes:
        raise LeanDecodeError(f"{prefix}: {'/'.join(names)} have {got} outputs, not the heads' {sizes} "
                              "(q, k, v in that order)")


def decode_layers(model: nn.Module, family: Family, qkv_sizes: tuple[int, int, int]) -> list[DecodeLayer]:
    """Every decoder layer's roles, the q/k/v and gate/up linears fused (`fusion.fuse_linears`)."""
    roles = layer_roles(family)
    out = []
    for i, layer in enumerate(submodule(model, family.layers, family, "decoder layers")):
        prefix = f"{family.layers}.{i}"
        mods = {rel: submodule(layer, rel, family, "decoder layer module") for rel in roles.modules()}
        _check_covered(layer, roles, prefix)
        qkv = [mods[rel] for rel in roles.qkv]
        _check_qkv(qkv, qkv_sizes, prefix, roles.qkv)
        out.append(DecodeLayer(mods[roles.ln1].weight, fuse_linears(qkv), mods[roles.o], mods[roles.ln2].weight,
                               fuse_linears([mods[rel] for rel in roles.gate_up]), mods[roles.down]))
    return out
