"""Score models against a baseline on the same batches: the shared core of tests, benchmarks and check."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlmq.config import QuantConfig
from vlmq.evaluate.metrics import token_kl, top1_agreement
from vlmq.models.families import Family
from vlmq.quantize.calibrate import audit, quantize
from vlmq.quantize.recipe import build_modelopt_config


@dataclass
class Fidelity:
    kl_mean: float
    kl_max: float
    top1: float
    tokens: int

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@torch.no_grad()
def batch_logits(model: nn.Module, batches: Sequence[dict]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out.append(model(**moved, use_cache=False).logits.float().cpu())
    return out


def compare_logits(ref: Sequence[torch.Tensor], test: Sequence[torch.Tensor], batches: Sequence[dict]) -> Fidelity:
    kls, agree, count = [], 0.0, 0
    for r, t, b in zip(ref, test, batches, strict=True):
        mask = b["attention_mask"]
        kls.append(token_kl(r, t, mask))
        n = int(mask.sum())
        agree += top1_agreement(r, t, mask) * n
        count += n
    kl = torch.cat(kls)
    return Fidelity(kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1=agree / count, tokens=count)


def modelopt_quantize(model: nn.Module, family: Family, quant: QuantConfig, batches: Sequence[dict],
                      smoothquant: bool = True) -> nn.Module:
    """ModelOpt INT8 W8A8 (SmoothQuant, or plain max calibration when smoothquant=False) in place."""
    recipe = build_modelopt_config(quant, family)
    if not smoothquant:
        recipe["algorithm"] = "max"

    def loop(m: nn.Module) -> None:
        batch_logits(m, batches)

    model = quantize(model, recipe, loop)
    audit(model, family, len(model.get_submodule(family.layers)))
    return model


def fake_quant_copy(model: nn.Module, family: Family, quant: QuantConfig, batches: Sequence[dict],
                    smoothquant: bool = True) -> nn.Module:
    return modelopt_quantize(copy.deepcopy(model), family, quant, batches, smoothquant)


