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


def token_overlap(a: list[int], b: list[int]) -> float:
    """Fraction of positions (over the longer sequence) where two generations agree."""
    if not a and not b:
        return 1.0
    same = sum(x == y for x, y in zip(a, b, strict=False))
    return same / max(len(a), len(b))


def generation_agreement(ref: list[int], test: list[int]) -> dict[str, float | bool]:
    """Greedy-generation agreement: exact match of the token ids and positional token overlap."""
    return {"exact_match": list(ref) == list(test), "token_overlap": token_overlap(list(ref), list(test))}


def weighted_mean(values: list[float], weights: list[int]) -> float | None:
    """Mean of `values` weighted by `weights` (e.g. per-sample means by token counts); None when empty."""
    total = sum(weights)
    if not values or total == 0:
        return None
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


def range_summary(amax: torch.Tensor) -> dict[str, float]:
    """Per-channel activation maxima of one layer's input -> max, median and their ratio (outlier-ness)."""
    a = amax.detach().float().flatten()   # pre_quant_scale is a Parameter: no autograd warning
    top, med = float(a.max()), float(a.median())
    return {"max": top, "median": med, "ratio": top / med if med > 0 else math.inf}


def _significant(w: torch.Tensor, frac: float) -> torch.Tensor:
    """Entries at least `frac` of their row's largest magnitude (small ones carry mostly rounding noise)."""
    a = w.abs()
    return a >= frac * a.amax(dim=1, keepdim=True).clamp_min(1e-30)


def column_factors(w_ref: torch.Tensor, w_deq: torch.Tensor, frac: float = 0.3) -> torch.Tensor:
    """Per-input-channel c with w_deq ~= w_ref / c (columns): recovers a smoothing factor folded into a
    quantized weight, to within int8 rounding (median of |w_ref / w_deq| over a column's large entries).
    Columns without large entries get 1."""
    w_ref, w_deq = w_ref.float(), w_deq.float()
    keep = _significant(w_ref, frac) & (w_deq != 0)
    ratio = torch.where(keep, (w_ref / torch.where(keep, w_deq, 1.0)).abs(), torch.nan)
    c = ratio.nanmedian(dim=0).values
    return torch.nan_to_num(c, nan=1.0)


def row_factors(w_ref: torch.Tensor, w_deq: torch.Tensor, col: torch.Tensor, frac: float = 0.3) -> torch.Tensor:
    """Per-output-channel r with w_deq ~= diag(r) w_ref diag(1/col): the output-row scaling a producer
    linear carries when the next linear's smoothing was folded into its rows (e.g. up_proj, v_proj)."""
    w_ref, w_deq = w_ref.float(), w_deq.float() * col.float()[None, :]
    keep = _significant(w_ref, frac) & (w_ref != 0)
    ratio = torch.where(keep, (w_deq / torch.where(keep, w_ref, 1.0)).abs(), torch.nan)
    return torch.nan_to_num(ratio.nanmedian(dim=1).values, nan=1.0)


def aggregate_fidelity(samples: list[dict], layers: list[dict]) -> dict:
    """Run-level metrics from per-sample metrics (token-weighted) and the per-layer table of `vlmq check`."""
    m = [s["metrics"] for s in samples]
    tokens = [x["tokens"] for x in m]
    caps = [x for x in m if "nll_baseline" in x]
    nll_b = weighted_mean([x["nll_baseline"] for x in caps], [x["nll_tokens"] for x in caps])
    nll_q = weighted_mean([x["nll_w8a8"] for x in caps], [x["nll_tokens"] for x in caps])
    finite = [x["sqnr_db"] for x in layers if x["sqnr_db"] is not None]
    return {
        "samples": len(m), "tokens": sum(tokens),
        "kl_mean": weighted_mean([x["kl_mean"] for x in m], tokens),
        "kl_max": max((x["kl_max"] for x in m), default=None),
        "top1": weighted_mean([x["top1"] for x in m], tokens),
        "generation_exact": sum(x["exact_match"] for x in m) / len(m) if m else None,
        "generation_overlap": sum(x["token_overlap"] for x in m) / len(m) if m else None,
        "caption_samples": len(caps), "nll_baseline": nll_b, "nll_w8a8": nll_q,
        "nll_delta": None if nll_b is None else nll_q - nll_b,
        "ppl_baseline": None if nll_b is None else math.exp(nll_b),
        "ppl_w8a8": None if nll_q is None else math.exp(nll_q),
        "ppl_delta": None if nll_b is None else math.exp(nll_q) - math.exp(nll_b),
        "sqnr_db_mean": sum(finite) / len(finite) if finite else None,
        "sqnr_db_min": min(finite) if finite else None,
    }
