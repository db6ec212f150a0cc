"""Fidelity metrics of a quantized model against its bf16 baseline (logits in, numbers out)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_kl(ref_logits: torch.Tensor, test_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(ref || test) of next-token distributions at each kept position, in nats (1-D)."""
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    test = F.log_softmax(test_logits.float(), dim=-1)
    kl = (ref.exp() * (ref - test)).sum(dim=-1)
    return kl[mask.bool()] if mask is not None else kl.flatten()


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    same = ref_logits.argmax(-1) == test_logits.argmax(-1)
    same = same[mask.bool()] if mask is not None else same.flatten()
    return float(same.float().mean())


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor, target_mask: torch.Tensor) -> float:
    """Mean negative log-likelihood of the tokens where target_mask is set (next-token shifted)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:]
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    keep = target_mask[:, 1:].bool()
    return float(-picked[keep].mean())


def perplexity(nll: float) -> float:
    return math.exp(nll)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    ref, test = ref.float(), test.float()
    noise = (ref - test).pow(2).mean()
    if noise == 0:
        return math.inf
    return float(10 * torch.log10(ref.pow(2).mean() / noise))


def token_overlap(a: list[int], b: list[int]) -> float:
    """Fraction of positions (over the longer sequence) where two generations agree."""
    if not a and not b:
        return 1.0
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return same / max(len(a), len(b))
