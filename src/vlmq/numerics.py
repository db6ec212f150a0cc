"""The one home of vlmq's int8 and SmoothQuant numerics: the runtime, the exporters and the alpha search
all call these, so a checkpoint, its simulation and its execution cannot drift apart.

Rounding rule (decided once): symmetric int8, round half to even, clamp to [-128, 127].
- Activations multiply by the reciprocal of the scale (``round(x * (1 / s))``), as ModelOpt's fake
  quantizer and the GEMM prologue do; the scale of a per-token row is ``amax / 127`` (IEEE division).
- Weights divide by their per-output-channel scale ``amax / 127`` (the exports' bytes).
- Scales are floored at MIN_SCALE, so an all-zero row or channel stays finite and quantizes to 0.

Hadamard (the online input rotation, R4): x @ H along the last dim with H block-diagonal of normalized
Sylvester blocks (symmetric and orthogonal), computed in fp32, as vLLM's `hadamard` transform does.

SmoothQuant (ModelOpt's convention): per input channel j, ``s_j = amax_w_j^(1-a) / amax_x_j^a``; the
linear reads ``x * s`` and holds ``W / s``. Linears that read one input share the mean of their
factors; o_proj's factor is shared per (kv-head, head dim) so it can fold into v_proj's rows (GQA).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

QMIN, QMAX = -128, 127
FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn: an FP8 KV-cache scale is amax / FP8_E4M3_MAX
MIN_SCALE = 1e-10  # keeps all-zero rows finite: 0 / MIN_SCALE == 0

# ModelOpt's SmoothQuant guards (model_calib.smoothquant): zero-amax channels get s=1; s is clamped.
S_MIN, S_MAX, EPS = 1e-4, 1e4, 1.0 / (1 << 31)


# ----------------------------------------------------------------------------- int8

def quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric dynamic int8 along the last dim: ``(q int8 like x, scale fp32 of shape x.shape[:-1])``."""
    xf = x.float()
    # a 0-dim tensor on x's device: CUDA turns division by a Python scalar into a
    # reciprocal multiply, which would differ from the kernel's IEEE division by 1 ulp
    amax = xf.abs().amax(dim=-1)
    scale = (amax / amax.new_full((), float(QMAX))).clamp_min(MIN_SCALE)
    q = torch.round(xf * torch.reciprocal(scale).unsqueeze(-1)).clamp_(QMIN, QMAX).to(torch.int8)
    return q, scale


def quantize_static(x: Tensor, scale: Tensor | float) -> Tensor:
    """Symmetric int8 with one per-tensor scale."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return torch.round(x.float() * torch.reciprocal(s)).clamp_(QMIN, QMAX).to(torch.int8)


def quantize_weight_per_channel(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per output channel, scale = amax / 127: ``(w_q [N, K], scale [N] fp32)``."""
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=1) / QMAX).clamp_min(MIN_SCALE)
    return torch.round(wf / scale[:, None]).clamp_(QMIN, QMAX).to(torch.int8), scale


def fake_quant_weight(w: Tensor) -> Tensor:
    """``w`` through int8 per-channel quantization and back (fp32)."""
    q, scale = quantize_weight_per_channel(w)
    return q.float() * scale[:, None]


def fake_quant_activations(x: Tensor, activations: str, static_amax: Tensor | float | None = None) -> Tensor:
    """``x`` [tokens, K] through int8 activation quantization and back (fp32): per token (dynamic) or with
    one per-tensor scale ``static_amax / 127`` (static)."""
    if activations == "dynamic":
        q, scale = quantize_per_token(x)
        return q.float() * scale.unsqueeze(-1)
    amax = torch.as_tensor(static_amax, dtype=torch.float32, device=x.device)
    scale = (amax / QMAX).clamp_min(MIN_SCALE)
    return quantize_static(x, scale).float() * scale


# ----------------------------------------------------------------------------- SmoothQuant factors

def smoothing_factor(act_amax: Tensor, weight_amax: Tensor, alpha: float) -> Tensor:
    """Per input channel ``amax_w^(1-a) / amax_x^a`` with ModelOpt's guards."""
    act_amax, weight_amax = act_amax.float(), weight_amax.float()
    s = weight_amax.pow(1 - alpha) / act_amax.pow(alpha)
    s = torch.where(act_amax <= EPS, torch.ones_like(s), s)
    s = torch.nan_to_num(s, nan=1.0, posinf=S_MAX)
    return s.clamp(S_MIN, S_MAX)


def column_amax(weights: Sequence[Tensor]) -> Tensor:
    """Per input channel max |w| over one or more weights [N_i, K]."""
    return torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def shared_factor(act_amax: Tensor, weights: Sequence[Tensor], alphas: Sequence[float]) -> Tensor:
    """One factor for linears reading one input: the mean of their own factors (as ModelOpt's export
    re-smooths fused q/k/v and gate/up)."""
    return torch.stack([smoothing_factor(act_amax, column_amax([w]).to(act_amax.device), a)
                        for w, a in zip(weights, alphas, strict=True)]).mean(dim=0)


def gqa_shared_factor(act_amax: Tensor, o_weight: Tensor, alpha: float, heads: int, kv_heads: int
                      ) -> tuple[Tensor, Tensor]:
    """o_proj's factor shared per (kv-head, head dim): input channel (h, d) comes from kv-head
    h // (heads / kv_heads), dim d, so one factor per kv-head dim lets it fold into v_proj's rows.
    Returns (s for v_proj's rows [kv_heads * head_dim], s for o_proj's columns [heads * head_dim])."""
    head_dim = o_weight.shape[1] // heads
    group = heads // kv_heads
    x_g = act_amax.float().view(kv_heads, group, head_dim).amax(dim=1)
    w_g = column_amax([o_weight]).to(x_g.device).view(kv_heads, group, head_dim).amax(dim=1)
    s_kv = smoothing_factor(x_g, w_g, alpha)
    return s_kv.reshape(-1), s_kv[:, None, :].expand(kv_heads, group, head_dim).reshape(-1)


# ----------------------------------------------------------------------------- Hadamard

class HadamardSizeError(ValueError):
    pass


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The n x n Sylvester Hadamard matrix scaled by 1/sqrt(n): symmetric and orthogonal (n a power of 2)."""
    if n < 1 or n & (n - 1):
        raise HadamardSizeError(f"a Sylvester Hadamard needs a power-of-two size, not {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def paley_hadamard(q: int) -> Tensor:
    """The (q+1) x (q+1) Hadamard matrix of Paley's first construction (q prime, q = 3 mod 4), entries +-1,
    float64: H = I + [[0, 1^T], [-1, Q]] with Q the Jacobsthal matrix Q_ij = legendre(j - i, q)."""
    if not (_is_prime(q) and q % 4 == 3):
        raise HadamardSizeError(f"Paley's construction needs a prime q = 3 mod 4, not {q}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if d in squares else -1.0 for d in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    h = torch.eye(q + 1, dtype=torch.float64)
    h[0, 1:] += 1.0
    h[1:, 0] -= 1.0
    h[1:, 1:] += chi[(idx[None, :] - idx[:, None]) % q]
    return h


def hadamard_split(n: int) -> tuple[int, int] | None:
    """(2^k, m) with n = 2^k m that hadamard(n) builds from (m = 1, or m - 1 a prime = 3 mod 4), else None."""
    two = n & -n if n > 0 else 0
    if n > 0 and n == two:
        return n, 1
    while two >= 1:
        m = n // two
        if m % 4 == 0 and (m - 1) % 4 == 3 and _is_prime(m - 1):
            return two, m
        two //= 2
    return None


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """An n x n Hadamard matrix scaled by 1/sqrt(n) (orthogonal): Sylvester for a power of two, else
    Sylvester(2^k) kron Paley(m) for n = m 2^k with m - 1 a prime = 3 mod 4 (576 = 72 * 8, 3584 = 224 * 16).
    Raises HadamardSizeError for sizes neither construction reaches."""
    split = hadamard_split(n)
    if split is None:
        raise HadamardSizeError(f"no Hadamard construction here for size {n}")
    two, m = split
    if m == 1:
        return sylvester_hadamard(n, dtype)
    return torch.kron(sylvester_hadamard(two), paley_hadamard(m - 1) / math.sqrt(m)).to(dtype)


def block_hadamard(x: Tensor, block: int) -> Tensor:
    """x @ H along the last dim, H block-diagonal with `block` x `block` normalized Sylvester blocks; computed
    in fp32 (or x's dtype if wider) and returned in x's dtype."""
    n = x.shape[-1]
    if n % block:
        raise HadamardSizeError(f"Hadamard block {block} does not divide the size {n}")
    work = torch.promote_types(x.dtype, torch.float32)
    h = _sylvester_on(block, work, x.device)
    return (x.to(work).reshape(*x.shape[:-1], n // block, block) @ h).reshape(x.shape).to(x.dtype)


@functools.lru_cache(maxsize=64)
def _sylvester_on(block: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """sylvester_hadamard(block) already on `device`: built once, so a CUDA graph that captures block_hadamard
    (after its warm-up runs) copies nothing from the host."""
    return sylvester_hadamard(block, dtype).to(device)
