"""GPTQ against its published math: the Hessian is sum x x^T, rounding with a diagonal Hessian is
round-to-nearest, and with correlated inputs GPTQ lowers the layer's output error below round-to-nearest's."""

from __future__ import annotations

import torch

from vlmq.numerics import quantize_weight_per_channel
from vlmq.quantize.gptq import HessianCollector, gptq_round, output_error, smoothed_hessian


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k ** 0.5 + torch.eye(k)
    return torch.randn(tokens, k, generator=gen) @ mix * torch.linspace(0.2, 3.0, k)


def test_hessian_collector_sums_outer_products():
    linear = torch.nn.Linear(16, 8)
    collector = HessianCollector({"lin": linear})
    xs = [torch.randn(3, 5, 16), torch.randn(7, 16)]
    for x in xs:
        linear(x)
    collector.remove()
    flat = torch.cat([x.reshape(-1, 16) for x in xs])
    assert torch.allclose(collector.hessians["lin"], flat.T @ flat, rtol=1e-5, atol=1e-4)
    assert collector.tokens["lin"] == 22
    linear(torch.randn(2, 16))   # removed: no more accumulation
    assert collector.tokens["lin"] == 22


def test_smoothed_hessian_is_that_of_the_scaled_input():
    x = correlated_inputs(64, 12)
    s = torch.rand(12) + 0.5
    assert torch.allclose(smoothed_hessian(x.T @ x, s), (x * s).T @ (x * s), rtol=1e-5, atol=1e-4)


def test_diagonal_hessian_gives_round_to_nearest():
    w = torch.randn(24, 40)
    q, scale = gptq_round(w, torch.diag(torch.rand(40) + 0.1), damp=0.0)
    q_rtn, scale_rtn = quantize_weight_per_channel(w)
    assert torch.equal(q, q_rtn) and torch.equal(scale, scale_rtn)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    k = 96
    x = correlated_inputs(2048, k)
    hessian = x.T @ x
    w = torch.randn(48, k) * torch.linspace(0.5, 2, k)
    q_rtn, s_rtn = quantize_weight_per_channel(w)
    rtn = output_error(w, q_rtn, s_rtn, hessian)
    for act_order in (True, False):
        q, s = gptq_round(w, hessian, block=32, act_order=act_order)
        assert q.dtype == torch.int8 and torch.equal(s, s_rtn)
        assert output_error(w, q, s, hessian) < 0.8 * rtn, act_order
    # measured on held-out inputs of the same distribution too (not only the calibration ones)
    x_new = correlated_inputs(2048, k, seed=0)[1024:]
    q, s = gptq_round(w, correlated_inputs(1024, k, seed=0)[:1024].T @ correlated_inputs(1024, k, seed=0)[:1024])
    err_gptq = ((x_new @ (w - q.float() * s[:, None]).T) ** 2).sum()
    err_rtn = ((x_new @ (w - q_rtn.float() * s_rtn[:, None]).T) ** 2).sum()
    assert err_gptq < err_rtn


def test_dead_inputs_are_zeroed_not_nan():
    x = correlated_inputs(256, 32)
    x[:, 5] = 0
    w = torch.randn(8, 32)
    q, scale = gptq_round(w, x.T @ x)
    assert torch.isfinite(scale).all() and (q[:, 5] == 0).all()
