"""GPTQ weight rounding (Frantar et al., 2022) for int8 per-output-channel weights.

Round-to-nearest picks each int8 weight alone. GPTQ rounds the input columns one at a time and pushes each
column's rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
reconstruction error, H = sum_x x x^T over calibration inputs. With one scale per output channel (no groups),
the scales are fixed up front (the channel's max |w| / 127, as round-to-nearest) and the columns may be
visited in any order: largest diag(H) first ("act order").

The Hessians are accumulated from the real calibration inputs by forward pre-hooks (`HessianCollector`),
once per input (q/k/v read one input, as do gate/up). SmoothQuant is applied afterwards, in closed form:
a linear that reads x * s has the Hessian diag(s) H diag(s).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from vlmq.numerics import MIN_SCALE, QMAX, QMIN


class HessianCollector:
    """Accumulates H = sum x x^T (float32, on the module's device) of each hooked module's input, over the real
    tokens only: a pre-hook on `model` reads each batch's attention_mask, and padded positions are dropped.
    Products run in fp32: a bf16 product rounds every entry to 8 bits, which on a trained model's outlier
    channels leaves H indefinite (measured: Cholesky failed on SmolLM2).

    `modules` maps a name to its module; `aliases` maps further names to one of those (linears that read the
    same input, e.g. k/v to q) and `hessian(name)` resolves them, so a shared input is accumulated once.
    `device`: where the sums live (default: each input's device); each batch's x^T x is formed on the input's
    device, then added to the sum where it lives, so "cpu" holds one product at a time in GPU memory."""

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], aliases: Mapping[str, str] | None = None,
                 device: str | torch.device | None = None):
        self.hessians: dict[str, Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.aliases = dict(aliases or {})
        self.device = torch.device(device) if device is not None else None
        self._mask: Tensor | None = None
        self._handles = [model.register_forward_pre_hook(self._read_mask, with_kwargs=True)]
        self._handles += [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _read_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self._mask = mask.bool() if isinstance(mask, Tensor) and mask.dim() == 2 else None

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if self._mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self._mask.shape):
                x = x[self._mask.to(x.device)]
            x = x.reshape(-1, x.shape[-1]).float()
            device = self.device or x.device
            if name not in self.hessians:
                self.hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=device)
                self.tokens[name] = 0
            if device == x.device:
                self.hessians[name].addmm_(x.T, x)
            else:
                self.hessians[name] += (x.T @ x).to(device)
            self.tokens[name] += x.shape[0]
        return hook

    def hessian(self, name: str) -> Tensor:
        return self.hessians[self.aliases.get(name, name)]

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hessians.values())

    def clear(self) -> None:
        self.hessians.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def shared_inputs(names: list[str], groups: list[tuple[str, ...]]) -> tuple[list[str], dict[str, str]]:
    """(the linears to hook, {other linear: the hooked one reading the same input}) from groups of layer-relative
    names (`Family.norm_groups`' consumers): e.g. k_proj and v_proj alias q_proj of the same layer."""
    keep, aliases = [], {}
    wanted = set(names)
    for name in names:
        for group in groups:
            rel_full = next((r for r in group if name.endswith("." + r)), None)
            if rel_full is None:
                continue
            layer = name[: -len(rel_full) - 1]
            first = next((f"{layer}.{r}" for r in group if f"{layer}.{r}" in wanted), name)
            if first != name:
                aliases[name] = first
            break
        if name not in aliases:
            keep.append(name)
    return keep, aliases


def smoothed_hessian(hessian: Tensor, smoothing: Tensor | None) -> Tensor:
    """The Hessian of x * s, given that of x."""
    if smoothing is None:
        return hessian
    s = smoothing.to(device=hessian.device, dtype=hessian.dtype)
    return hessian * s[:, None] * s[None, :]


@torch.no_grad()
def gptq_round(weight: Tensor, hessian: Tensor, scale: Tensor | None = None, damp: float = 0.01,
               block: int = 128, act_order: bool = True) -> tuple[Tensor, Tensor]:
    """int8 weight [N, K] and its fp32 per-channel scale [N], rounded by GPTQ against `hessian` [K, K].

    `scale` defaults to round-to-nearest's (max |w| / 127 per row). `damp` adds that fraction of the mean
    diagonal to the diagonal (numerical stability, as the paper)."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().to(w.device).clone()
    if scale is None:
        scale = (w.abs().amax(dim=1) / QMAX).clamp_min(MIN_SCALE)
    scale = scale.float().to(w.device)
    k = w.shape[1]
    dead = torch.diagonal(h) == 0        # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w, h = w[:, order], h[order][:, order]
    u = _inverse_cholesky(h, damp)
    q = torch.zeros_like(w)
    inv_scale = scale[:, None]
    for start in range(0, k, block):
        end = min(start + block, k)
        w_blk, u_blk = w[:, start:end].clone(), u[start:end, start:end]
        err_blk = torch.zeros_like(w_blk)
        for j in range(end - start):
            col = w_blk[:, j:j + 1]
            q_col = torch.round(col / inv_scale).clamp_(QMIN, QMAX)
            q[:, start + j:start + j + 1] = q_col
            err = (col - q_col * inv_scale) / u_blk[j, j]
            w_blk[:, j:] -= err @ u_blk[j:j + 1, j:]
            err_blk[:, j:j + 1] = err
        w[:, end:] -= err_blk @ u[start:end, end:]
    inverse = torch.argsort(order)
    return q[:, inverse].to(torch.int8), scale


def _inverse_cholesky(h: Tensor, damp: float, tries: int = 4) -> Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; the damping grows 10x per failed try (a
    Hessian from few tokens is singular, and fp32 sums of outlier channels can leave it barely indefinite)."""
    mean_diag = torch.diagonal(h).mean()
    for attempt in range(tries):
        damped = h.clone()
        damped.diagonal().add_(max(damp, 1e-6) * 10 ** attempt * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0:
                return inverse
    raise GPTQError(f"the Hessian stays indefinite with damping up to {damp * 10 ** (tries - 1):g} of its mean "
                    "diagonal (raise quant.gptq.damp, or calibrate on more samples)")


class GPTQError(RuntimeError):
    pass


def output_error(weight: Tensor, q: Tensor, scale: Tensor, hessian: Tensor) -> float:
    """tr((W - Q)^T... ) = sum over calibration inputs of ||(W - dequant(Q)) x||^2: the objective GPTQ lowers."""
    delta = weight.float() - q.float() * scale.float()[:, None]
    return float(((delta @ hessian.float()) * delta).sum())
