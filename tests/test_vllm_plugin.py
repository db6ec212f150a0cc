"""vlmq's vLLM plugin (integrations/vllm_cpu_hadamard): its torch hadacore_transform is the transform vlmq's
export declares (x · H_d / sqrt(d), H_d Sylvester), the one vlmq's runtime applies (vlmq.numerics.block_hadamard
with one block); vLLM itself running it on the real export is tests/test_real_weights.py and DEPLOY.md's snippet.
Its exact int8 GEMM keeps oneDNN's contract; the oneDNN defect it replaces is pinned here in vLLM's own venv."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from vlmq.numerics import block_hadamard, sylvester_hadamard

sys.path.insert(0, str(REPO_ROOT / "integrations" / "vllm_cpu_hadamard"))
from vlmq_vllm_cpu_hadamard import (  # noqa: E402
    ExactInt8Handler,
    exact_scaled_mm,
    hadacore_transform,
    x86_without_vnni,
)


@pytest.mark.parametrize("d", [1, 2, 32, 128, 512])
def test_hadacore_is_the_normalized_sylvester_transform(d):
    x = torch.randn(3, 5, d, dtype=torch.float64)
    expected = x @ sylvester_hadamard(d)
    torch.testing.assert_close(hadacore_transform(x.clone(), inplace=False), expected, rtol=1e-12, atol=1e-12)


def test_hadacore_matches_vlmq_runtime_in_bf16_and_inplace():
    x = torch.randn(4, 2 * 128, dtype=torch.bfloat16)
    blocks = x.view(8, 128)   # vLLM reshapes to head_dim blocks before calling the kernel
    out = hadacore_transform(blocks.clone(), inplace=False).view(4, 256)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, block_hadamard(x, 128))
    y = blocks.clone()
    assert hadacore_transform(y, inplace=True) is y and torch.equal(y.view(4, 256), out)


def test_hadacore_refuses_other_sizes():
    with pytest.raises(ValueError, match="power-of-two"):
        hadacore_transform(torch.zeros(2, 96))


def test_vnni_detection_reads_the_flags():
    assert x86_without_vnni("processor: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert not x86_without_vnni("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not x86_without_vnni("flags\t\t: fpu avx2 avx_vnni\n")
    assert not x86_without_vnni("Features\t: fp asimd\n")   # not x86: no flags line


@pytest.mark.parametrize("symmetric", [True, False])
def test_exact_scaled_mm_keeps_onednns_contract(symmetric):
    """output = s_x * s_w * (x_q W_q) [- s_x * zp * adj] + bias, the int32 products exact, with K past 1024."""
    g = torch.Generator().manual_seed(0)
    m, k, n = 5, 2100, 7
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w[0] = 127   # a channel whose sums leave fp32's exact range
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    x[0] = 127
    w_s, x_s = torch.rand(n, 1, generator=g) / 100, torch.rand(m, 1, generator=g) / 10
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    zp = None if symmetric else torch.randint(-5, 5, (m, 1), generator=g, dtype=torch.int32)
    adj = (w.t().sum(0, keepdim=True, dtype=torch.float32) * w_s.squeeze()) if zp is not None else None
    handler = ExactInt8Handler(w.t(), w_s, torch.bfloat16, True, zp is not None)
    assert (handler.k, handler.n) == (k, n)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    assert exact_scaled_mm(handler, x, out, x_s, zp, adj, bias) is out
    acc = x.double() @ w.double().t()
    expected = acc * x_s.double() * w_s.double().t()
    if zp is not None:
        expected = expected - x_s.double() * zp.double() * adj.double()
    expected = expected + bias.double()
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)


ONEDNN_PROBE = """
import json, torch
from vllm import _custom_ops as ops
from vlmq_vllm_cpu_hadamard import provide_int8_gemm, x86_without_vnni
torch.manual_seed(0)
cases = {}
for wmax in (127, 63):
    w = torch.randint(-wmax, wmax + 1, (128, 512), dtype=torch.int8)
    x_q, x_s, _ = ops.onednn_scaled_int8_quant(torch.randn(16, 512, dtype=torch.bfloat16) * 3, None, None, True)
    cases[wmax] = (w, torch.full((128, 1), 0.01), x_q, x_s)   # oneDNN's handler keeps pointers: keep them alive
errors = {}
for name in ("onednn", "plugin"):
    if name == "plugin":
        provide_int8_gemm()
    for wmax, (w, w_s, x_q, x_s) in cases.items():
        ref = (x_q.double() @ w.double().t()) * x_s.double().view(-1, 1) * 0.01
        h = ops.create_onednn_scaled_mm(w.t(), w_s, torch.bfloat16, True, False, 32)
        out = torch.empty(16, 128, dtype=torch.bfloat16)
        ops.onednn_scaled_mm(h, x_q, out, x_s, None, None, None)
        errors[f"{name}_{wmax}"] = ((out.double() - ref).norm() / ref.norm()).item()
print(json.dumps({"no_vnni": x86_without_vnni(), "errors": errors}))
"""


def test_onednn_int8_gemm_defect_and_the_plugins_fix(vllm_python):
    """vLLM's oneDNN W8A8 GEMM in vLLM's venv: on x86 without VNNI it is wrong for full-range int8 weights and
    right for 7-bit ones (int16 pair sums saturating), which is why the plugin replaces it there; with VNNI,
    oneDNN is right and the plugin leaves it. The plugin's GEMM is right on every CPU (bf16 output rounding)."""
    proc = subprocess.run([str(vllm_python), "-c", ONEDNN_PROBE], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    err = report["errors"]
    assert err["plugin_127"] < 0.005 and err["plugin_63"] < 0.005, report
    assert err["onednn_63"] < 0.005, report
    if report["no_vnni"]:
        assert err["onednn_127"] > 0.05, report   # measured 0.144 on an AVX2-only AMD EPYC
    else:
        assert err["onednn_127"] < 0.005, report
