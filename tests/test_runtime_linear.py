"""CPU tests for vlmq.runtime.linear (W8A8Linear and its eager backends)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmq.runtime.linear import (
    MIN_SCALE,
    W8A8Linear,
    available_backends,
    int_gemm_fp32_blocks,
    int_gemm_int_mm,
    int_gemm_reference,
    quantize_per_token,
    quantize_static,
    register_backend,
    resolve_backend,
)

SHAPES = [(1, 64, 48), (7, 40, 33), (13, 96, 64), (32, 128, 17), (5, 24, 7)]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_forward(layer: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    """Independent reference of the documented numerics (fp32 quantization, float64 GEMM)."""
    xf = x.float().reshape(-1, layer.in_features)
    if layer.pre_quant_scale is not None:
        xf = xf * layer.pre_quant_scale
    if layer.input_scale is not None:
        s = layer.input_scale.float().reshape(1, 1).expand(xf.shape[0], 1)
    else:
        amax = xf.abs().amax(-1, keepdim=True)
        s = torch.maximum(amax / torch.tensor(127.0), torch.tensor(MIN_SCALE))
    q = torch.round(xf * (torch.tensor(1.0) / s)).clamp(-128, 127).double()
    acc = q @ layer.weight.double().t()
    y = acc * s.double() * layer.weight_scale.double()[None, :]
    if layer.bias is not None:
        y = y + layer.bias.double()
    return y.reshape(*x.shape[:-1], layer.out_features)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("gemm", [int_gemm_int_mm, int_gemm_fp32_blocks, int_gemm_reference])
def test_int_gemm_exact(m: int, k: int, n: int, gemm) -> None:
    g = _gen(m * 1000 + k * 10 + n)
    for _ in range(3):
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        out = gemm(a, w)
        assert out.dtype == torch.int32 and out.shape == (m, n)
        assert torch.equal(out.long(), a.long() @ w.long().t())


@pytest.mark.parametrize("gemm", [int_gemm_int_mm, int_gemm_fp32_blocks])
def test_int_gemm_extremes_exact(gemm) -> None:
    # All -128: the largest magnitude sum; catches int16 accumulation.
    k = 2048
    a = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.full((5, k), -128, dtype=torch.int8)
    assert torch.equal(gemm(a, w).long(), torch.full((3, 5), 128 * 128 * k))
    # 127 * 127 is odd: over 1101 products the sum is odd and above 2^24, which no fp32 holds, so a GEMM that
    # accumulates in fp32 without slicing K cannot return it. 11008 is the 3B's down_proj K.
    for k in (1101, 11008 + 1):
        a = torch.full((2, k), 127, dtype=torch.int8)
        w = torch.full((3, k), 127, dtype=torch.int8)
        assert torch.equal(gemm(a, w).long(), torch.full((2, 3), 127 * 127 * k))
    assert (a.float() @ w.float().t()).long()[0, 0] != 127 * 127 * k   # (the case this guards against)


def test_quantize_per_token_round_half_even_and_clamp() -> None:
    # amax 127 -> scale 1 exactly, so x/scale keeps the .5 ties.
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_per_token(x)
    assert torch.equal(s, torch.tensor([1.0, MIN_SCALE]))
    assert q[0].tolist() == [0, 2, 2, 0, -2, 127]
    assert q[1].tolist() == [0] * 6
    q2 = quantize_static(torch.tensor([300.0, -300.0, 1.49]), 1.0)
    assert q2.tolist() == [127, -128, 1]


def test_quantize_per_token_matches_float_reference() -> None:
    g = _gen(3)
    x = torch.randn(4, 9, 64, generator=g).to(torch.bfloat16)
    q, s = quantize_per_token(x)
    assert q.shape == x.shape and s.shape == (4, 9)
    xf = x.double()
    s_ref = xf.abs().amax(-1) / 127
    assert torch.allclose(s.double(), s_ref, rtol=1e-6)
    # every row reaches +-127 exactly once at its amax
    assert (q.abs().amax(-1) == 127).all()
    err = (q.double() * s.double()[..., None] - xf).abs()
    assert (err <= s.double()[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["int_mm", "fp32_blocks", "reference"])
def test_forward_matches_float64_reference(m, k, n, static, smooth, bias, backend) -> None:
    g = _gen(hash((m, k, n, static, smooth, bias)) % (2**31))
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    pqs = torch.rand(k, generator=g) + 0.5 if smooth else None
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    in_scale = (x.float().abs().amax() * (pqs.max() if smooth else 1.0) / 127).item() if static else None
    layer = W8A8Linear.from_float(lin, input_scale=in_scale, pre_quant_scale=pqs, backend=backend)
    for _ in range(2):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        ref = _ref_forward(layer, x)
        assert _rel(y, ref) < 8e-3  # bf16 output rounding only
        # and it is a faithful approximation of the float layer
        y_float = lin(x.float())
        assert _rel(y, y_float) < 0.1  # SQNR > 20 dB


def test_int_mm_and_reference_backends_agree_exactly_in_fp32() -> None:
    g = _gen(11)
    lin = nn.Linear(40, 33)
    layer = W8A8Linear.from_float(lin)
    x = torch.randn(2, 7, 40, generator=g)
    layer.backend = "int_mm"
    a = layer(x)
    layer.backend = "reference"
    b = layer(x)
    assert a.dtype == torch.float32 and a.shape == (2, 7, 33)
    assert torch.equal(a, b)


def test_3d_input_equals_rowwise() -> None:
    g = _gen(5)
    layer = W8A8Linear.from_float(nn.Linear(64, 24), backend="int_mm")
    x = torch.randn(3, 5, 64, generator=g)
    y = layer(x)
    rows = torch.stack([layer(x[i]) for i in range(3)])
    assert torch.equal(y, rows)
    assert layer(x[:, :0]).shape == (3, 0, 24)


def test_dynamic_is_per_token_static_is_not() -> None:
    g = _gen(6)
    lin = nn.Linear(32, 16, bias=False)
    x = torch.randn(2, 32, generator=g)
    x[1] *= 1000.0  # one loud token
    dyn = W8A8Linear.from_float(lin)
    sta = W8A8Linear.from_float(lin, input_scale=x.abs().amax().item() / 127)
    ref = lin(x)
    # per-token scaling keeps the quiet token accurate; a shared scale crushes it
    assert _rel(dyn(x)[0], ref[0]) < 0.05
    assert _rel(sta(x)[0], ref[0]) > 0.2


def test_pre_quant_scale_is_applied() -> None:
    g = _gen(7)
    lin = nn.Linear(32, 8, bias=False)
    layer = W8A8Linear.from_float(lin, pre_quant_scale=torch.rand(32, generator=g) + 0.5)
    x = torch.randn(4, 32, generator=g)
    assert _rel(layer(x), lin(x)) < 0.05
    with torch.no_grad():
        layer.pre_quant_scale.fill_(1.0)
    assert _rel(layer(x), lin(x)) > 0.05


def test_state_dict_roundtrip_with_checkpoint_shapes() -> None:
    g = _gen(8)
    src = W8A8Linear.from_float(
        nn.Linear(16, 8),
        input_scale=0.02,
        pre_quant_scale=torch.rand(16, generator=g) + 0.5,
    )
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["weight_scale"] = sd["weight_scale"].reshape(8, 1)  # exporters write [N, 1]
    sd["input_scale"] = sd["input_scale"].reshape(1)
    dst = W8A8Linear(16, 8)  # created without bias / static / smoothing buffers
    dst.load_state_dict(sd)
    assert dst.is_static and dst.weight_scale.shape == (8,) and dst.input_scale.shape == ()
    x = torch.randn(3, 16, generator=g)
    assert torch.equal(dst(x), src(x))


def test_backend_registry() -> None:
    from vlmq.runtime.linear import cpu_has_int8_dot

    assert {"int_mm", "fp32_blocks", "reference", "triton"} <= set(available_backends())
    # CPUs: torch._int_mm where oneDNN has AVX-512 (VNNI) int8 dot products, else the exact fp32 slices
    assert resolve_backend("auto", torch.device("cpu")) == ("int_mm" if cpu_has_int8_dot() else "fp32_blocks")
    with pytest.raises(ValueError, match="unknown W8A8 backend"):
        resolve_backend("nope", torch.device("cpu"))
    with pytest.raises(ValueError, match="already registered"):
        register_backend("int_mm")(lambda layer, x: x)


def test_auto_backend_by_card(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here, so the card is faked: Triton's int8 MMAs from Ampere on; a T4 (sm75) gets
    torch._int_mm; each device index is asked for its own capability (an H100 beside a T4)."""
    from vlmq.runtime import linear

    caps = {0: (7, 5), 1: (8, 6), 2: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: caps[index])
    linear.triton_available.cache_clear()
    try:
        assert [resolve_backend("auto", torch.device("cuda", i)) for i in (0, 1, 2)] == ["int_mm", "triton", "triton"]
        assert resolve_backend("triton", torch.device("cuda", 0)) == "triton"  # asked for by name: kept
    finally:
        linear.triton_available.cache_clear()


def test_pdl_and_tma_only_where_card_and_triton_have_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Programmatic dependent launch needs sm90+ and a Triton with griddepcontrol (3.4+; torch 2.6/2.7
    ship 3.2/3.3); the TMA decode kernel needs sm90 exactly. Asked per current device."""
    from vlmq.runtime.kernels import tiles

    device = {"index": 0}
    caps = {0: (8, 6), 1: (9, 0), 2: (10, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device["index"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: caps[index])
    monkeypatch.setattr(tiles, "interpreting", lambda: False)
    monkeypatch.setattr(tiles, "_gluon_hopper_importable", lambda: True)
    tiles._capability.cache_clear()
    try:
        seen = []
        for index in (0, 1, 2):
            device["index"] = index
            seen.append((tiles.pdl_supported(), tiles.tma_supported(), tiles.pick_config(16, 2560, 2048).pdl))
        assert seen == [(False, False, False), (True, True, True), (True, False, True)]
        monkeypatch.setattr(tiles, "TRITON_HAS_PDL", False)
        device["index"] = 1
        assert not tiles.pdl_supported() and not tiles.tma_supported() and not tiles.pick_config(16, 2560, 2048).pdl
    finally:
        tiles._capability.cache_clear()


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="int8"):
        W8A8Linear.from_quantized(torch.zeros(4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="weight_scale"):
        W8A8Linear.from_quantized(torch.zeros(4, 4, dtype=torch.int8), torch.ones(3))
    layer = W8A8Linear(8, 4)
    with pytest.raises(ValueError, match="last dim"):
        layer(torch.randn(2, 9))
