"""Score models against a baseline on the same batches: the shared core of tests, benchmarks and check."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmq.config import QuantConfig
from vlmq.evaluate.metrics import token_kl, top1_agreement
from vlmq.models.families import Family, quantized_linear_names
from vlmq.quantize.calibrate import audit, quantize
from vlmq.quantize.recipe import build_modelopt_config


@dataclass
class Fidelity:
    """A model against its baseline on the same batches. KL and top-1 over every real (unpadded) position's
    next-token distribution; NLL of the actual next token where one follows (perplexity = exp(nll))."""

    kl_mean: float
    kl_max: float
    top1: float
    tokens: int
    nll_ref: float | None = None
    nll_test: float | None = None
    nll_tokens: int = 0

    @property
    def ppl_ref(self) -> float | None:
        return None if self.nll_ref is None else math.exp(self.nll_ref)

    @property
    def ppl_test(self) -> float | None:
        return None if self.nll_test is None else math.exp(self.nll_test)

    @property
    def ppl_delta_pct(self) -> float | None:
        """Perplexity change in percent of the baseline's."""
        return None if self.nll_ref is None else 100.0 * (math.exp(self.nll_test - self.nll_ref) - 1.0)

    def to_dict(self) -> dict:
        return {**self.__dict__, "ppl_ref": self.ppl_ref, "ppl_test": self.ppl_test,
                "ppl_delta_pct": self.ppl_delta_pct}


@torch.no_grad()
def batch_logits(model: nn.Module, batches: Sequence[dict], on_device: bool = False,
                 model_dtype: bool = False) -> list[torch.Tensor]:
    """fp32 logits per batch (or in the model's own output dtype), on the CPU (or left on the model's device)."""
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits = model(**moved, use_cache=False).logits
        logits = logits if model_dtype else logits.float()
        out.append(logits if on_device else logits.cpu())
    return out


def _next_token_nll(logits: torch.Tensor, batch: dict, skip_token: int | None) -> tuple[float, int]:
    """Summed NLL of the actual next token over positions whose next token is real (not pad, not `skip_token`:
    an image placeholder, which the model is not asked to predict)."""
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    keep = mask[:, :-1] & mask[:, 1:]
    if skip_token is not None:
        keep &= ids[:, 1:] != skip_token
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return float(-logp[keep].sum()), int(keep.sum())


def compare_logits(ref: Sequence[torch.Tensor], test: Sequence[torch.Tensor], batches: Sequence[dict],
                   skip_token: int | None = None) -> Fidelity:
    """`test` against `ref` on `batches`; `skip_token` (the image placeholder id) is never an NLL target."""
    kls, agree, count = [], 0.0, 0
    nll_ref = nll_test = 0.0
    nll_tokens = 0
    for r, t, b in zip(ref, test, batches, strict=True):
        mask = b["attention_mask"]
        kls.append(token_kl(r, t, mask))
        n = int(mask.sum())
        agree += top1_agreement(r, t, mask) * n
        count += n
        (sum_ref, m), (sum_test, _) = _next_token_nll(r, b, skip_token), _next_token_nll(t, b, skip_token)
        nll_ref, nll_test, nll_tokens = nll_ref + sum_ref, nll_test + sum_test, nll_tokens + m
    kl = torch.cat(kls).clamp_min(0)   # KL >= 0; negatives are float rounding
    return Fidelity(kl_mean=float(kl.mean()), kl_max=float(kl.max()), top1=agree / count, tokens=count,
                    nll_ref=nll_ref / nll_tokens if nll_tokens else None,
                    nll_test=nll_test / nll_tokens if nll_tokens else None, nll_tokens=nll_tokens)


def merge(parts: Sequence[Fidelity]) -> Fidelity:
    """One Fidelity from per-batch ones (token-weighted), so logits never have to be held for a whole set."""
    tokens = sum(p.tokens for p in parts)
    nll_tokens = sum(p.nll_tokens for p in parts)

    def nll(key: str) -> float | None:
        return sum(getattr(p, key) * p.nll_tokens for p in parts if p.nll_tokens) / nll_tokens if nll_tokens else None

    return Fidelity(kl_mean=sum(p.kl_mean * p.tokens for p in parts) / tokens, kl_max=max(p.kl_max for p in parts),
                    top1=sum(p.top1 * p.tokens for p in parts) / tokens, tokens=tokens,
                    nll_ref=nll("nll_ref"), nll_test=nll("nll_test"), nll_tokens=nll_tokens)


@torch.no_grad()
def score_models(ref: nn.Module, tests: dict[str, nn.Module], batches: Sequence[dict],
                 skip_token: int | None = None) -> dict[str, Fidelity]:
    """Every model in `tests` against `ref`, batch by batch (memory: the models and one batch's logits)."""
    parts: dict[str, list[Fidelity]] = {name: [] for name in tests}
    for batch in batches:
        ref_logits = batch_logits(ref, [batch])
        for name, model in tests.items():
            parts[name].append(compare_logits(ref_logits, batch_logits(model, [batch]), [batch], skip_token))
    return {name: merge(p) for name, p in parts.items()}


@dataclass
class KLProbe:
    """Held-out batches and the bf16 model's logits on them: score any later model on the same inputs."""

    batches: list[dict]
    ref: list[torch.Tensor]
    skip_token: int | None = None   # the image placeholder id: not an NLL target

    @classmethod
    def capture(cls, model: nn.Module, batches: Sequence[dict], skip_token: int | None = None) -> KLProbe:
        """The reference logits stay on the model's device (on a GPU, not in host RAM) in the model's own output
        dtype (bf16 logits upcast to fp32 would double them: 8 samples of a 152k-vocabulary model at 1k tokens
        are 2.4 GB in bf16)."""
        return cls(list(batches), batch_logits(model, batches, on_device=True, model_dtype=True), skip_token)

    def score(self, model: nn.Module) -> Fidelity:
        """One batch's logits at a time (in the model's dtype), compared one sequence at a time: the fp32
        softmax temporaries are one row's, not the batch's (a batch of 8 image+text samples of the 3B in fp32
        peaked at 28 GiB of GPU memory on an H200)."""
        device = self.ref[0].device
        parts = []
        for ref, batch in zip(self.ref, self.batches, strict=True):
            test = batch_logits(model, [batch], on_device=True, model_dtype=True)[0].to(device)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            for i in range(ids.shape[0]):
                row = {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]}
                parts.append(compare_logits([ref[i:i + 1]], [test[i:i + 1]], [row], self.skip_token))
            del test
        return merge(parts)

    def kl(self, model: nn.Module) -> float:
        return self.score(model).kl_mean

    @property
    def samples(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.batches)

    @property
    def tokens(self) -> int:
        return int(sum(int(b["attention_mask"].sum()) for b in self.batches))


def modelopt_quantize(model: nn.Module, family: Family, quant: QuantConfig, batches: Sequence[dict],
                      smoothquant: bool = True) -> nn.Module:
    """ModelOpt INT8 W8A8 in place: SmoothQuant at quant.alpha (ModelOpt's own smoothing after its max
    calibration, as `quantize_lm` does), or plain int8 with per-tensor input maxima (smoothquant=False)."""
    from vlmq.quantize.alpha_search import apply_smoothquant

    recipe = build_modelopt_config(quant, family)
    if not smoothquant:   # per-tensor input statistics straight away: nothing to smooth with
        recipe["quant_cfg"] = [{**r, "cfg": {**r["cfg"], "axis": None}} if "cfg" in r and
                               r["quantizer_name"].endswith("input_quantizer") else r for r in recipe["quant_cfg"]]

    def loop(m: nn.Module) -> None:
        batch_logits(m, batches)

    model = quantize(model, recipe, loop)
    num_layers = len(model.get_submodule(family.layers))
    if smoothquant:
        apply_smoothquant(model, dict.fromkeys(quantized_linear_names(family, num_layers), float(quant.alpha)))
    audit(model, family, num_layers)
    return model


def fake_quant_copy(model: nn.Module, family: Family, quant: QuantConfig, batches: Sequence[dict],
                    smoothquant: bool = True) -> nn.Module:
    return modelopt_quantize(copy.deepcopy(model), family, quant, batches, smoothquant)


