"""GPU tests for the fused Triton W8A8 kernel (skipped without CUDA)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (Triton W8A8 kernel)", allow_module_level=True)
triton = pytest.importorskip("triton", reason="Triton is not installed")

from vlmq.runtime.kernels import tiles  # noqa: E402
from vlmq.runtime.kernels import triton_w8a8 as tk  # noqa: E402
from vlmq.runtime.kernels.triton_w8a8 import KernelConfig, pick_config, quantize_rows, w8a8_int_gemm, w8a8_linear  # noqa: E402
from vlmq.runtime.linear import W8A8Linear, quantize_per_token, quantize_static  # noqa: E402

DEV = "cuda"
# (M, N, K): decode, odd M/N, prefill, LM shapes
SHAPES = [
    (1, 2048, 2048),
    (1, 2048, 11008),  # down_proj at one token: the GEMV's 4096-byte chunks (2752 words: a partial last chunk)
    (2, 2048, 11008),
    (7, 256, 2048),
    (16, 2560, 2048),
    (12, 2048, 11008),
    (33, 2048, 11008),
    (64, 11008, 2048),
    (300, 333, 200),
    (2048, 2048, 2048),
    (2051, 256, 2048),
    (4096, 2048, 11008),
]
FORCED = [
    KernelConfig(16, 32, 256, 1, fused=True),
    KernelConfig(16, 64, 256, 8, fused=True),
    KernelConfig(32, 16, 512, 4, fused=False),
    KernelConfig(16, 64, 256, 2, fused=False, pdl=True),
    KernelConfig(16, 16, 512, 1, fused=False, pdl=True),
    KernelConfig(16, 64, 256, 4, fused=False, pdl=True, swap_ab=True),
    KernelConfig(64, 128, 128, 1, 8, 8, 4, fused=False, swap_ab=True),
    KernelConfig(32, 64, 256, 2, fused=True, swap_ab=True),
    KernelConfig(128, 256, 128, 1, 8, 8, 3, fused=False),
    KernelConfig(128, 128, 128, 1, 8, 4, 4, fused=True),
    KernelConfig(128, 128, 128, 1, 8, 4, 4, fused=False, persistent=True),
    KernelConfig(128, 256, 128, 1, 4, 8, 3, fused=False, persistent=True),
    KernelConfig(128, 256, 128, 1, 4, 8, 4, fused=False, persistent=True),
    KernelConfig(128, 256, 128, 1, 4, 8, 4, fused=False, persistent=True, tail_m=64, tail_n=128),
]


def _gen(*key: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(hash(key) % (2**31))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ref64(x: torch.Tensor, layer: W8A8Linear) -> torch.Tensor:
    """float64 dequantized reference on the module's own quantized activations."""
    q, s = layer.quantize_input(x)
    acc = q.double() @ layer.weight.double().t()
    s = s.double().reshape(-1, 1) if s.dim() else s.double()
    y = acc * s * layer.weight_scale.double()[None, :]
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("cfg", [None, *FORCED], ids=lambda c: "auto" if c is None else repr(c)[13:60])
def test_int32_accumulation_exact(m: int, n: int, k: int, cfg: KernelConfig | None) -> None:
    g = _gen(m, n, k)
    for _ in range(2):  # fresh inputs each check; also catches stale split-K workspace
        a = torch.randint(-128, 128, (m, k), generator=g, device=DEV, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8)
        out = w8a8_int_gemm(a, w, config=cfg)
        ref = (a.double() @ w.double().t()).long()  # exact: |sum| < 2^53
        assert torch.equal(out.long(), ref)


def test_int32_extreme_values_exact() -> None:
    k = 11008
    a = torch.full((17, k), -128, device=DEV, dtype=torch.int8)
    w = torch.full((40, k), -128, device=DEV, dtype=torch.int8)
    for cfg in (None, KernelConfig(16, 16, 256, 8, fused=False)):
        assert (w8a8_int_gemm(a, w, config=cfg) == 128 * 128 * k).all()


def test_split_k_workspace_left_zero() -> None:
    g = _gen(5)
    a = torch.randint(-128, 128, (5, 2048), generator=g, device=DEV, dtype=torch.int8)
    w = torch.randint(-128, 128, (2048, 2048), generator=g, device=DEV, dtype=torch.int8)
    w8a8_int_gemm(a, w, config=KernelConfig(16, 32, 256, 8, fused=False))
    torch.cuda.synchronize()
    for ws, locks in tk._WORKSPACES.values():
        assert not ws.any() and not locks.any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_rows_matches_torch_exactly(dtype: torch.dtype) -> None:
    g = _gen(1)
    for k in (2048, 11008, 200):
        x = (torch.randn(37, k, generator=g, device=DEV) * 3).to(dtype)
        x[3, 5] = 80.0  # outlier
        x[4] = 0.0  # all-zero row
        pqs = torch.rand(k, generator=g, device=DEV) + 0.5
        q, s = quantize_rows(x, None, pqs)
        q_ref, s_ref = quantize_per_token(x.float() * pqs)
        assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
        sc = torch.tensor(0.05, device=DEV)
        q2, _ = quantize_rows(x, sc, None)
        assert torch.equal(q2, quantize_static(x.float(), sc))


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("static,smooth,bias", list(itertools.product([False, True], repeat=3)))
def test_linear_matches_float64_reference(m: int, n: int, k: int, static: bool, smooth: bool, bias: bool) -> None:
    g = _gen(m, n, k, static, smooth, bias)
    w_q = torch.randint(-127, 128, (n, k), generator=g, device=DEV, dtype=torch.int8)
    w_s = torch.rand(n, generator=g, device=DEV) * 1e-3 + 1e-4
    b = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16) if bias else None
    pqs = torch.rand(k, generator=g, device=DEV) + 0.5 if smooth else None
    in_s = 0.04 if static else None
    layer = W8A8Linear.from_quantized(w_q, w_s, b, in_s, pqs, backend="triton")
    cfgs = [None, *FORCED] if (m, n) in ((7, 256), (300, 333)) else [None]
    for cfg in cfgs:
        # fp16: the checkpoints export.dtype=auto writes for text models (vlmq.quantize.peaks)
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 4e-3), (torch.float16, 1e-3)):
            x = (torch.randn(m, k, generator=g, device=DEV) * 2).to(dtype)
            out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)  # poisoned
            y = w8a8_linear(x, w_q, w_s, b, layer.input_scale, pqs, out=out, config=cfg)
            assert y.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
            ref = _ref64(x, layer)
            # fp32 out: only fp32 epilogue rounding; bf16 out: bf16 rounding (2^-9); fp16 out: 2^-11
            assert _rel(out, ref) < tol, (cfg, dtype)


def test_module_backend_and_3d_input() -> None:
    g = _gen(9)
    lin = torch.nn.Linear(2048, 256, bias=True, device=DEV)
    layer = W8A8Linear.from_float(lin)
    assert layer.backend == "auto"
    x = torch.randn(2, 9, 2048, generator=g, device=DEV).to(torch.bfloat16)
    y = layer(x)  # auto -> triton on CUDA
    layer.backend = "int_mm"
    y_ref = layer(x)
    layer.backend = "reference"
    y_64 = layer(x)
    assert y.shape == (2, 9, 256) and y.dtype == torch.bfloat16
    assert _rel(y, y_64) < 4e-3 and _rel(y_ref, y_64) < 4e-3
    assert _rel(y.float(), lin(x.float())) < 0.1


def test_deterministic_and_pick_config_buckets() -> None:
    g = _gen(10)
    x = torch.randn(48, 2048, generator=g, device=DEV).to(torch.bfloat16)
    w_q = torch.randint(-128, 128, (2048, 2048), generator=g, device=DEV, dtype=torch.int8)
    w_s = torch.rand(2048, generator=g, device=DEV) * 1e-3
    a = w8a8_linear(x, w_q, w_s)
    b = w8a8_linear(x, w_q, w_s)
    assert torch.equal(a, b)
    assert pick_config(1, 2048, 2048).gemv and not pick_config(1, 2048, 2048, static=True).gemv
    assert pick_config(16, 2048, 2048).block_m == 16 and not pick_config(16, 2048, 2048).gemv
    assert pick_config(8192, 2048, 2048).block_m >= 64
    tma = tiles.tma_supported()  # sm90 with a Triton the Gluon kernel was checked with
    assert pick_config(16, 2560, 2048).tma == tma and not pick_config(16, 2560, 2048, static=True).tma
    assert pick_config(2, 2048, 2048).tma == tma and pick_config(2, 2048, 2048).gemv != tma


@pytest.mark.parametrize("m", [2048, 4096])
def test_persistent_tail_on_qkv_prefill_shapes(m: int) -> None:
    """The production path for qkv at prefill: persistent TMA kernel + small-tile tail, bf16 out."""
    from vlmq.runtime.kernels import w8a8_persistent

    n, k = 2560, 2048
    cfg = pick_config(m, n, k)
    assert cfg.persistent and cfg.tail_m, cfg
    g = _gen(m, n, k, 11)
    w_q = torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8)
    w_s = torch.rand(n, generator=g, device=DEV) * 1e-3 + 1e-4
    b = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g, device=DEV).to(torch.bfloat16)
    q, s = quantize_rows(x)
    assert w8a8_persistent.supported(q, w_q)
    assert w8a8_persistent.main_rows(m, n, cfg.block_m, cfg.block_n, w8a8_persistent.num_programs(q.device)) < m
    out = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)  # poisoned
    tk._launch(q, w_q, out, s, w_s, b, None, tk.A_INT8_ROWSCALE, False, cfg)
    assert not torch.isnan(out).any()
    ref = (q.double() @ w_q.double().t()) * s.double()[:, None] * w_s.double()[None, :] + b.double()
    assert _rel(out, ref) < 4e-3
    assert torch.equal(w8a8_int_gemm(q, w_q, cfg), (q.double() @ w_q.double().t()).to(torch.int32))


def _graphed(chain: Callable[[], list[torch.Tensor]]) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """Run ``chain`` once (compiles its kernels), then capture it in a CUDA graph: (graph, its outputs)."""
    chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain()
    return graph, outs


def _check_exact_and_as_pointer_kernel(q: torch.Tensor, w: torch.Tensor, cfg: KernelConfig, pdl: bool,
                                       g: torch.Generator) -> None:  # fmt: skip
    """``cfg``'s kernel on int8 ``q`` [M, K] x ``w`` [N, K] into poisoned outputs: the int32 result
    exact, the dequantized bf16 output (+ bias) bit-identical to the pointer kernel's (same int32,
    same fp32 epilogue order) and within 4e-3 of a float64 reference."""
    m, n = q.shape[0], w.shape[0]
    ones_m, ones_n = torch.ones(m, device=DEV), torch.ones(n, device=DEV)
    s = torch.rand(m, generator=g, device=DEV) + 0.01
    w_s = torch.rand(n, generator=g, device=DEV) * 1e-3 + 1e-4
    b = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16)
    out = torch.full((m, n), -7, device=DEV, dtype=torch.int32)
    y = torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16)
    torch.cuda.synchronize()  # under PDL the kernel reads w, w_scale, bias before its wait
    tk._launch(q, w, out, ones_m, ones_n, None, None, tk.A_INT8_ROWSCALE, True, cfg, pdl=pdl)
    assert torch.equal(out.long(), (q.double() @ w.double().t()).long())
    tk._launch(q, w, y, s, w_s, b, None, tk.A_INT8_ROWSCALE, False, cfg, pdl=pdl)
    y_ptr = tk.w8a8_gemm_prequant(q, s, w, w_s, b, config=KernelConfig(16, 32, 256, 1, fused=False))
    assert torch.equal(y, y_ptr)
    ref = (q.double() @ w.double().t()) * s.double()[:, None] * w_s.double()[None, :] + b.double()
    assert _rel(y, ref) < 4e-3


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(2560, 2048), (2048, 2048), (22016, 2048), (2048, 11008), (333, 200), (333, 203)])
@pytest.mark.parametrize("pdl", [False, True])
def test_gemv_decode_exact_and_same_as_tensor_cores(m: int, n: int, k: int, pdl: bool) -> None:
    """The CUDA-core GEMV for M <= 4 (pick_config's choice at M = 1; dp4a where K % 4 == 0, plain
    int32 products otherwise): exact int32, and dequantized output identical to the tensor-core
    kernel's (same int32, same fp32 epilogue), poisoned output."""
    g = _gen(m, n, k, 12)
    for bn, bk in ((4, 2048), (8, 1024), (1, 4096)):
        q = torch.randint(-128, 128, (m, k), generator=g, device=DEV, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8)
        _check_exact_and_as_pointer_kernel(q, w, KernelConfig(16, bn, bk, fused=False, pdl=pdl, gemv=True), pdl, g)


def test_gemv_waits_for_its_producer_in_a_pdl_chain() -> None:
    """The decode chain as the loop runs it: a quant kernel that lets the GEMV launch at its entry,
    then the GEMV (weights loaded before its wait), captured in a CUDA graph over fresh inputs; a
    GEMV that read the activations before the producer's writes landed would see the previous ones."""
    g = _gen(13)
    n, k, reps = 2560, 2048, 8
    w = torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8)
    w_s = torch.rand(n, generator=g, device=DEV) * 1e-3 + 1e-4
    b = torch.randn(n, generator=g, device=DEV).to(torch.bfloat16)
    xs = [(torch.randn(1, k, generator=g, device=DEV) * (i + 1)).to(torch.bfloat16) for i in range(reps)]
    cfg = pick_config(1, n, k)
    assert cfg.gemv and cfg.pdl

    def chain() -> list[torch.Tensor]:
        outs = []
        for x in xs:
            q, s = quantize_rows(x, pdl=True)
            outs.append(tk.w8a8_gemm_prequant(q, s, w, w_s, b, config=cfg))
        return outs

    graph, outs = _graphed(chain)
    for _ in range(3):
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for x, o in zip(xs, outs, strict=True):
            q, s = quantize_per_token(x.float())
            ref = (q.double() @ w.double().t()) * s.double().reshape(-1, 1) * w_s.double()[None, :] + b.double()
            assert _rel(o, ref) < 4e-3


HOPPER = pytest.mark.skipif(not tiles.tma_supported(), reason="the TMA decode kernel needs sm90 and Triton 3.6-3.8")


@HOPPER
@pytest.mark.parametrize("m", [1, 5, 8, 16, 33, 64])
@pytest.mark.parametrize("n,k", [(2560, 2048), (2048, 2048), (22016, 2048), (200, 256)])
@pytest.mark.parametrize("split", [1, 2, 4])
@pytest.mark.parametrize("rows,swap", [(64, True), (64, False), (32, False), (16, False)])
def test_tma_decode_exact_and_same_as_pointer_kernel(m: int, n: int, k: int, split: int, rows: int, swap: bool) -> None:
    """The Gluon kernel (weights by TMA before the PDL wait; weight rows or tokens as the wgmma's M
    side; split-K through the workspace): exact int32, dequantized output identical to the pointer
    kernel's (same int32, same fp32 epilogue order), poisoned outputs fully written, split-K
    workspace and counters left zeroed."""
    if k % (split * 128):
        pytest.skip(f"K = {k} has no {split}-way split into 128-wide steps")
    g = _gen(m, n, k, split, rows, swap, 14)
    pdl = (m + split) % 2 == 0  # half the cases without PDL
    cfg = KernelConfig(max(8, triton.next_power_of_2(m)), rows, 128, split, fused=False, pdl=pdl, tma=True,
                       swap_ab=swap)  # fmt: skip
    q = torch.randint(-128, 128, (m, k), generator=g, device=DEV, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8)
    if not tk.tma_decode_usable(q, w, cfg):
        assert tiles.tma_smem_bytes(m, k, rows, split, not swap) > tiles.max_shared_memory(0), "only shared memory"
        pytest.skip("does not fit in shared memory")
    _check_exact_and_as_pointer_kernel(q, w, cfg, pdl, g)
    if split > 1:
        torch.cuda.synchronize()
        ws, locks = tk._WORKSPACES[("cuda", q.device.index or 0)]
        assert not ws.any() and not locks.any()


@pytest.mark.parametrize("m,n,k", [(2048, 2560, 2048), (512, 2048, 2048), (300, 2048, 11008)])
def test_prefill_gemms_wait_for_their_producer_in_a_pdl_chain(m: int, n: int, k: int) -> None:
    """Prefill as the loop runs it on Hopper: quantize (PDL) -> GEMM launched early with PDL (the
    persistent kernel with its small-tile tail at 2048 x 2560, the pointer kernel at mid M), four
    times over in a CUDA graph; every replay gets fresh activations and NaN-filled outputs."""
    g = _gen(m, n, k, 17)
    cfg = pick_config(m, n, k)
    assert cfg.pdl == tiles.pdl_supported()
    ws = [torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8) for _ in range(4)]
    w_s = torch.rand(n, generator=g, device=DEV) * 1e-3 + 1e-4
    xs = [torch.empty(m, k, device=DEV, dtype=torch.bfloat16) for _ in range(4)]

    def chain() -> list[torch.Tensor]:
        outs = []
        for x, w in zip(xs, ws, strict=True):
            q, s = quantize_rows(x, pdl=cfg.pdl)
            outs.append(tk.w8a8_gemm_prequant(q, s, w, w_s, config=cfg))
        return outs

    for x in xs:
        x.normal_(generator=g)
    graph, outs = _graphed(chain)
    for rep in range(2):
        for x in xs:
            x.copy_(torch.randn(m, k, generator=g, device=DEV) * (rep + 2))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for x, w, o in zip(xs, ws, outs, strict=True):
            q, s = quantize_per_token(x.float())
            ref = (q.double() @ w.double().t()) * s.double().reshape(-1, 1) * w_s.double()[None, :]
            assert _rel(o, ref) < 4e-3


@HOPPER
@pytest.mark.parametrize("m", [2, 8, 64])
def test_tma_config_on_a_misaligned_view_falls_back_exactly(m: int) -> None:
    """pick_config's TMA tile on activations TMA can't address (a view 8 bytes off a 16-byte
    boundary) runs on the pointer kernel instead, with the same exact int32 result."""
    g = _gen(m, 16)
    n, k = 2560, 2048
    cfg = pick_config(m, n, k)
    assert cfg.tma
    buf = torch.randint(-128, 128, (m * k + 8,), generator=g, device=DEV, dtype=torch.int8)
    q = buf[8:].view(m, k)
    w = torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8)
    assert not tk.tma_decode_usable(q, w, cfg)
    out = w8a8_int_gemm(q, w, config=dataclasses.replace(cfg, fused=False))
    assert torch.equal(out.long(), (q.double() @ w.double().t()).long())


@HOPPER
def test_tma_decode_chain_waits_for_each_producer() -> None:
    """A chain as the decode loop runs it, captured in a CUDA graph: quantize (PDL) -> TMA GEMM
    (weights before its wait) -> quantize the GEMM's output -> the next TMA GEMM ..., all launched
    early. A GEMM that read its activations before its producer finished would see stale rows."""
    g = _gen(15)
    m, n, k, depth = 8, 2048, 2048, 6
    ws = [torch.randint(-128, 128, (n, k), generator=g, device=DEV, dtype=torch.int8) for _ in range(depth)]
    w_ss = [torch.rand(n, generator=g, device=DEV) * 2e-3 + 1e-4 for _ in range(depth)]
    x0 = torch.randn(m, k, generator=g, device=DEV).to(torch.bfloat16)
    cfgs = [KernelConfig(8, rows, 128, split, fused=False, pdl=True, tma=True, swap_ab=rows == 64)
            for rows, split in ((64, 1), (32, 1), (64, 2), (16, 1), (32, 2), (64, 4))]

    def chain() -> list[torch.Tensor]:
        outs, h = [], x0
        for w, w_s, cfg in zip(ws, w_ss, cfgs, strict=True):
            q, s = quantize_rows(h, pdl=True)
            h = tk.w8a8_gemm_prequant(q, s, w, w_s, config=cfg)
            outs.append(h)
        return outs

    graph, outs = _graphed(chain)
    for rep in range(3):
        x0.copy_(torch.randn(m, k, generator=g, device=DEV) * (rep + 1))
        for o in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        h = x0
        for o, w, w_s in zip(outs, ws, w_ss, strict=True):
            q, s = quantize_per_token(h.float())
            ref = (q.double() @ w.double().t()) * s.double().reshape(-1, 1) * w_s.double()[None, :]
            assert _rel(o, ref) < 4e-3
            h = o
