"""The fused SiLU·mul + block Hadamard + int8 kernel on CUDA (bf16 tensor-core dot; the interpreter test
in tests/test_hadamard_act.py runs its fp32 branch), and FusedOps.act_linear around it (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

from test_hadamard_act import compare_kernel, down_linear, gate_up, reference_down, rel_err  # noqa: E402
from vlmq.runtime.decode import ReferenceOps  # noqa: E402
from vlmq.runtime.ops import FusedOps  # noqa: E402


@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("n_blocks,block,dtype", [(86, 128, torch.bfloat16), (43, 32, torch.bfloat16),
                                                  (5, 128, torch.float16), (148, 128, torch.bfloat16)])
def test_silu_mul_hadamard_kernel(m: int, n_blocks: int, block: int, dtype: torch.dtype) -> None:
    bad, total = compare_kernel(m, n_blocks, block, dtype, "cuda")
    print(f"int8 mismatches at rounding ties: {bad} / {total}")


@pytest.mark.parametrize("fuse", [True, False])
def test_act_linear_rotates_on_cuda(fuse: bool) -> None:
    lin = down_linear(11008, 2048, 128).to("cuda")
    lin.backend = "triton"
    gu = gate_up(8, 11008, device="cuda")
    ops = FusedOps(ReferenceOps())
    ops.fuse_hadamard = fuse
    want = reference_down(gu, lin)
    assert rel_err(ReferenceOps().act_linear(gu, lin), want) < 1e-2
    assert rel_err(ops.act_linear(gu, lin), want) < 1e-2
