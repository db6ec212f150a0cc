"""GPTQ Hessians of CUDA inputs summed in host RAM (quant.gptq.hessian_device=cpu) equal those summed on the GPU
(skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_gptq import Masked  # noqa: E402
from vlmq.quantize.gptq import HessianCollector  # noqa: E402


def test_hessians_in_host_ram_equal_those_on_the_gpu() -> None:
    model = Masked().to("cuda")
    on_gpu = HessianCollector(model, {"lin": model.lin})
    on_cpu = HessianCollector(model, {"lin": model.lin}, device="cpu")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(4):
        model(torch.randn(2, 7, 16, device="cuda", generator=gen),
              attention_mask=torch.ones(2, 7, dtype=torch.long, device="cuda"))
    for c in (on_gpu, on_cpu):
        c.remove()
    assert on_cpu.hessian("lin").device.type == "cpu" and on_gpu.hessian("lin").device.type == "cuda"
    assert on_cpu.tokens == on_gpu.tokens == {"lin": 56}
    torch.testing.assert_close(on_cpu.hessian("lin"), on_gpu.hessian("lin").cpu(), rtol=1e-5, atol=1e-4)
