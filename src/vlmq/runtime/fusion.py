"""Fused q/k/v and gate/up linears for the decode loop, without duplicating weight memory.

``fuse_linears([q, k, v])`` concatenates the weights (and biases, weight scales) once and
rebinds every part module to a view of the concatenation, so the HF forward still works on the
same storage. Both bf16 ``nn.Linear`` and ``W8A8Linear`` fuse when their activation handling
agrees (same static scale / pre-quant scale, or all dynamic); otherwise ``_Concat`` runs them
one by one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlmq.runtime.linear import W8A8Linear


def can_fuse(mods: list[nn.Module]) -> bool:
    """One GEMM can serve ``mods``: same linear type, dtype, bias presence and activation handling."""
    if all(type(m) is nn.Linear for m in mods):
        return len({m.weight.dtype for m in mods}) == 1 and len({m.bias is None for m in mods}) == 1
    if all(isinstance(m, W8A8Linear) for m in mods):
        first = mods[0]
        same_bias = len({m.bias is None for m in mods}) == 1
        dyn = all(m.input_scale is None and m.pre_quant_scale is None for m in mods)
        static = all(
            m.input_scale is not None and torch.equal(m.input_scale, first.input_scale)
            and (m.pre_quant_scale is None) == (first.pre_quant_scale is None)
            and (m.pre_quant_scale is None or torch.equal(m.pre_quant_scale, first.pre_quant_scale))
            for m in mods
        )
        return same_bias and (dyn or static) and len({m.backend for m in mods}) == 1
    return False


def _rebind(mod: nn.Module, name: str, value: Tensor) -> None:
    if isinstance(mod, nn.Linear):
        setattr(mod, name, nn.Parameter(value, requires_grad=False))
    else:
        setattr(mod, name, value)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))]) if rows > t.shape[0] else t


@torch.no_grad()
def fuse_linears(mods: list[nn.Module], pad_to: int = 1) -> nn.Module:
    """One linear over the concatenated outputs of ``mods``; each module keeps a view of it. With
    ``pad_to``, each part's outputs are padded with zero rows to a multiple of it (cuBLAS picks slow
    kernels for odd sizes such as the vision MLP's 3420): part i is columns [i * padded, ...)."""
    if not can_fuse(mods):
        return _Concat(mods)
    cached = getattr(mods[0], "_lean_fused", None)  # a second decoder on the same model: no new copy
    if cached is not None and cached[1] == (pad_to, *(m.weight.data_ptr() for m in mods)):
        return cached[0]
    sizes = [m.out_features for m in mods]
    padded = [_round_up(n, pad_to) for n in sizes]
    names = ["weight", "bias"] + (["weight_scale"] if isinstance(mods[0], W8A8Linear) else [])
    cat = {n: torch.cat([_pad_rows(getattr(m, n), p) for m, p in zip(mods, padded, strict=True)])
           for n in names if getattr(mods[0], n) is not None}  # fmt: skip
    for n, t in cat.items():
        for m, part, size in zip(mods, t.split(padded), sizes, strict=True):
            _rebind(m, n, part[:size])
    first = mods[0]
    if isinstance(first, nn.Linear):
        fused = nn.Linear(first.in_features, sum(padded), bias=first.bias is not None, device="meta")
        fused.weight = nn.Parameter(cat["weight"], requires_grad=False)
        if first.bias is not None:
            fused.bias = nn.Parameter(cat["bias"], requires_grad=False)
        return _remember(mods, fused, pad_to)
    fused = W8A8Linear(first.in_features, sum(padded), bias=first.bias is not None, static=first.is_static,
                       pre_quant_scale=first.pre_quant_scale is not None, device="meta", backend=first.backend)
    for n, t in cat.items():
        setattr(fused, n, t)
    for n in ("input_scale", "pre_quant_scale"):
        if getattr(first, n) is not None:
            setattr(fused, n, getattr(first, n))
    return _remember(mods, fused, pad_to)


@torch.no_grad()
def pad_input_features(linear: nn.Linear, pad_to: int) -> nn.Linear:
    """``linear`` over inputs zero-padded to a multiple of ``pad_to`` (the padded weight columns are
    zero); the module keeps a view of the first ``in_features`` columns."""
    cached = getattr(linear, "_lean_padded", None)  # a second runner on the same model: no new copy
    if cached is not None and cached.weight.data_ptr() == linear.weight.data_ptr():
        return cached
    k = linear.in_features
    if k % pad_to == 0:
        return linear
    weight = torch.cat([linear.weight, linear.weight.new_zeros(linear.out_features, _round_up(k, pad_to) - k)], 1)
    linear.weight = nn.Parameter(weight[:, :k], requires_grad=False)
    padded = nn.Linear(weight.shape[1], linear.out_features, bias=linear.bias is not None, device="meta")
    padded.weight = nn.Parameter(weight, requires_grad=False)
    if linear.bias is not None:
        padded.bias = linear.bias
    object.__setattr__(linear, "_lean_padded", padded)
    return padded


def _remember(mods: list[nn.Module], fused: nn.Module, pad_to: int) -> nn.Module:
    object.__setattr__(mods[0], "_lean_fused", (fused, (pad_to, *(m.weight.data_ptr() for m in mods))))
    return fused


class _Concat(nn.Module):
    """Fallback when the parts cannot share one GEMM (e.g. different static input scales)."""

    def __init__(self, mods: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(mods)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)
