"""The W8A8 GEMM kernels' logic on CPU, in Triton's interpreter (the GPU tests time and re-check
them on an H100): exact int32 accumulation and the dequant epilogue vs a float64 reference for the
pointer kernel (plain, split-K, prologue-fused quantization) and the persistent TMA kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import torch
from vlmq.runtime.kernels import w8a8_persistent as wp
from vlmq.runtime.kernels.triton_w8a8 import KernelConfig, w8a8_int_gemm, w8a8_linear
from vlmq.runtime.linear import W8A8Linear

g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))  # fresh inputs each run
checks = 0
for m, n, k in [(3, 48, 64), (20, 80, 96), (64, 80, 128)]:
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    exact = (a.long() @ w.long().t()).int()
    for cfg in [KernelConfig(16, 16, 32, 1, fused=False), KernelConfig(16, 32, 32, 3, fused=False)]:
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
    x = torch.randn(m, k, generator=g)
    layer = W8A8Linear.from_quantized(w, sw, b, backend="reference")
    q, s = layer.quantize_input(x)
    ref = (q.double() @ w.double().t()) * s.double().reshape(-1, 1) * sw.double()[None, :] + b.double()
    for cfg in [KernelConfig(16, 16, 32, 1, fused=False), KernelConfig(16, 16, 32, 2, fused=True)]:
        y = torch.full((m, n), float("nan"))
        w8a8_linear(x, w, sw, b, out=y, config=cfg)
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6, cfg
        checks += 3
print("GEMM-OK", checks)
"""


def test_gemm_kernels_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert "GEMM-OK" in proc.stdout, proc.stderr[-3000:]
