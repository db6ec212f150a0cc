"""The W8A8 GEMM kernels' logic on CPU, in Triton's interpreter (the GPU tests time and re-check
them on an H100): exact int32 accumulation and the dequant epilogue vs a float64 reference for the
pointer kernel (plain, split-K, prologue-fused quantization), the persistent TMA kernel and the
CUDA-core GEMV for decode."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch
from vlmq.runtime.kernels import w8a8_persistent as wp
from vlmq.runtime.kernels.tiles import fit_to_smem
from vlmq.runtime.kernels.triton_w8a8 import KernelConfig, w8a8_gemm_prequant, w8a8_int_gemm, w8a8_linear
from vlmq.runtime.linear import W8A8Linear

RTX3090_SMEM = 101376

seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs each run; printed for a replay
print("seed", seed)
g = torch.Generator().manual_seed(seed)
checks = tails = 0
for m, n, k in [(3, 48, 64), (20, 70, 80), (64, 100, 112)]:  # N, K not tile multiples
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    exact = (a.long() @ w.long().t()).int()
    swapped = [KernelConfig(bm, 64, 32, s, fused=False, swap_ab=True) for bm, s in ((16, 1), (32, 2))]
    for cfg in [KernelConfig(16, 16, 32, 1, fused=False), KernelConfig(16, 32, 32, 3, fused=False), *swapped]:
        assert torch.equal(w8a8_int_gemm(a, w, cfg), exact), cfg
        checks += 1
    sa, sw, b = torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g) * 1e-2, torch.randn(n, generator=g)
    out = torch.full((m, n), -7, dtype=torch.int32)  # poisoned: every element must be written
    wp.launch_persistent(a, w, out, torch.ones(m), torch.ones(n), None, True, 16, 16, 32, 2, 4, 2)
    assert torch.equal(out, exact), "persistent int32"
    y = torch.full((m, n), float("nan"))
    wp.launch_persistent(a, w, y, sa, sw, b, False, 16, 16, 32, 2, 4, 2)  # 3 programs walk all tiles
    ref = exact.double() * sa.double()[:, None] * sw.double()[None, :] + b.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6, "persistent dequant"
    checks += 2
    # a small-tile tail after the last full round of big tiles (3 interpreter programs)
    if wp.main_rows(m, n, 32, 16, 3) < m:
        tails += 1
        out = torch.full((m, n), -7, dtype=torch.int32)
        wp.launch_persistent(a, w, out, torch.ones(m), torch.ones(n), None, True, 32, 16, 32, 2, 4, 2, tail=(16, 16))
        assert torch.equal(out, exact), "persistent int32 with tail"
        y = torch.full((m, n), float("nan"))
        wp.launch_persistent(a, w, y, sa, sw, b, False, 32, 16, 32, 2, 4, 2, tail=(16, 16))
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6, "persistent dequant with tail"
    x = torch.randn(m, k, generator=g)
    layer = W8A8Linear.from_quantized(w, sw, b, backend="reference")
    q, s = layer.quantize_input(x)
    ref = (q.double() @ w.double().t()) * s.double().reshape(-1, 1) * sw.double()[None, :] + b.double()
    for cfg in [KernelConfig(16, 16, 32, 1, fused=False), KernelConfig(16, 16, 32, 2, fused=True),
                KernelConfig(16, 64, 32, 2, fused=False, swap_ab=True)]:
        y = torch.full((m, n), float("nan"))
        w8a8_linear(x, w, sw, b, out=y, config=cfg)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6, cfg
        checks += 3
assert tails >= 2, tails
# the CUDA-core GEMV for M <= 4: exact int32, and the same dequantized output as the tensor-core kernel
for m, n, k in [(1, 10, 100), (3, 48, 64), (4, 70, 300)]:
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    exact = (a.long() @ w.long().t()).int()
    sa, sw, b = torch.rand(m, generator=g) + 0.1, torch.rand(n, generator=g) * 1e-2, torch.randn(n, generator=g)
    for bn, bk in [(4, 32), (8, 128), (2, 512)]:
        gemv = KernelConfig(16, bn, bk, fused=False, gemv=True)
        assert torch.equal(w8a8_int_gemm(a, w, gemv), exact), (m, n, k, gemv)
        y = w8a8_gemm_prequant(a, sa, w, sw, b, torch.float32, config=gemv)
        y_tc = w8a8_gemm_prequant(a, sa, w, sw, b, torch.float32, config=KernelConfig(16, 16, 32, fused=False))
        assert torch.equal(y, y_tc), (m, n, k, gemv)
        checks += 2
# a tile shrunk to fit a 99 KB (RTX 3090) block still computes the exact product
small = fit_to_smem(KernelConfig(128, 256, 128, 1, 8, 8, 4, fused=False), 1, RTX3090_SMEM)
assert (small.block_k, small.block_n) != (128, 256), small
a = torch.randint(-128, 128, (130, 256), generator=g, dtype=torch.int8)
w = torch.randint(-128, 128, (300, 256), generator=g, dtype=torch.int8)
assert torch.equal(w8a8_int_gemm(a, w, small), (a.long() @ w.long().t()).int()), small
# the row-quant kernel (dynamic with a pre-quant scale, static): int8 and scales bit-exact with torch's
from vlmq.runtime.kernels.triton_w8a8 import quantize_rows
from vlmq.runtime.linear import quantize_per_token, quantize_static
for k in (200, 2048):
    x = torch.randn(9, k, generator=g) * 3
    x[2], x[3, 5] = 0.0, 80.0  # an all-zero row, an outlier
    pqs = torch.rand(k, generator=g) + 0.5
    q, s = quantize_rows(x, None, pqs)
    q_ref, s_ref = quantize_per_token(x * pqs)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref), k
    assert torch.equal(quantize_rows(x, torch.tensor(0.05), None)[0], quantize_static(x, torch.tensor(0.05))), k
    checks += 2
print("GEMM-OK", checks)
"""


def test_gemm_kernels_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert "GEMM-OK" in proc.stdout, proc.stdout[-200:] + proc.stderr[-3000:]


# opt-in shared memory per block: RTX 3090 (sm_86), A100, H100
SMEM = {"rtx3090": 101376, "a100": 166912, "h100": 232448}
LM_SHAPES = [(2560, 2048), (2048, 2048), (22016, 2048), (2048, 11008)]  # qkv, o, gate_up, down (3B)


@pytest.mark.parametrize("gpu", list(SMEM))
def test_tile_configs_fit_each_gpus_shared_memory(gpu: str) -> None:
    from vlmq.runtime.kernels.tiles import (
        SMEM_RESERVE_INT8_A,
        SMEM_RESERVE_WIDE_A,
        at_smallest_tile,
        fit_to_smem,
        pick_config,
    )

    for (n, k), m, a_bytes in itertools.product(LM_SHAPES, (1, 16, 64, 300, 2048, 8192), (1, 2, 4)):
        cfg = pick_config(m, n, k)
        fit = fit_to_smem(cfg, a_bytes, SMEM[gpu])
        if cfg.gemv:  # the decode GEMV keeps its weights in registers: no shared memory to fit
            assert m == 1 and fit == cfg, cfg
            continue
        budget = SMEM[gpu] - (SMEM_RESERVE_INT8_A if a_bytes == 1 else SMEM_RESERVE_WIDE_A)
        per_stage = fit.block_k * (fit.block_m * a_bytes + fit.block_n)
        assert 1 <= fit.num_stages <= cfg.num_stages and fit.num_stages * per_stage <= budget, (gpu, m, n, k, fit)
        assert fit.num_stages >= 2 or at_smallest_tile(fit), (gpu, fit)
        if gpu == "h100" and a_bytes == 1:  # the measured H100 tiles are used as swept
            assert (fit.block_m, fit.block_n, fit.block_k, fit.num_stages) == (
                cfg.block_m, cfg.block_n, cfg.block_k, cfg.num_stages), fit


def test_swap_ab_only_where_the_h100_sweep_won() -> None:
    """pick_config swaps A/B for gate/up at M 5-64 and down_proj at M 5-16 (sweep_swap_ab.json),
    never for qkv/o_proj, never in the GEMV's range, never at prefill."""
    from vlmq.runtime.kernels.tiles import GEMV_MAX_M, pick_config

    for (n, k), m in itertools.product(LM_SHAPES, (1, 2, 3, 4, 5, 8, 16, 17, 32, 64, 65, 512, 2048)):
        cfg = pick_config(m, n, k)
        gate_up, down = n >= 8192, k >= 8192
        want = GEMV_MAX_M < m and ((gate_up and m <= 64) or (down and m <= 16))
        assert cfg.swap_ab == want, (m, n, k, cfg)
        if cfg.swap_ab:
            assert cfg.block_n == 64 and not cfg.gemv and not cfg.persistent


def test_tma_decode_kernel_only_where_it_fits_and_won(monkeypatch: pytest.MonkeyPatch) -> None:
    """pick_config on an sm90 GPU (faked here): the TMA decode kernel for qkv/o_proj at M = 2-64
    (64 weight rows as the MMA's M side up to 32 tokens, the tokens above), never at one token, for
    gate/up or down_proj, with a static input scale, or where its shared memory can't fit (K = 4096)."""
    from vlmq.runtime.kernels import tiles

    monkeypatch.setattr(tiles, "tma_supported", lambda: True)  # part of pick_config's cache key
    for (n, k), m in itertools.product([*LM_SHAPES, (4096, 4096)], (1, 2, 3, 8, 32, 33, 64, 65, 2048)):
        cfg = tiles.pick_config(m, n, k)
        want = (n, k) in [(2560, 2048), (2048, 2048)] and 2 <= m <= 64
        assert cfg.tma == want, (m, n, k, cfg)
        assert not tiles.pick_config(m, n, k, static=True).tma
        if cfg.tma:
            assert cfg.swap_ab == (m <= 32) and cfg.block_n == (64 if m <= 32 else 32) and cfg.split_k == 1
            assert tiles.tma_smem_bytes(m, k, cfg.block_n, 1, not cfg.swap_ab) <= tiles.SM90_SMEM
    monkeypatch.setattr(tiles, "tma_supported", lambda: False)  # any other card, or another Triton
    assert not any(tiles.pick_config(m, 2560, 2048).tma for m in (2, 8, 32, 64))


def test_tma_kernel_only_with_the_triton_releases_it_was_checked_with() -> None:
    from vlmq.runtime.kernels.tiles import gluon_version_checked

    assert gluon_version_checked("3.6.0") and gluon_version_checked("3.8.1+git1234")
    assert not gluon_version_checked("3.5.1") and not gluon_version_checked("3.9.0")
    assert not gluon_version_checked("3.10.0")
