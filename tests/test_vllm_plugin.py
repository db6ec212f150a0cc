"""vlmq's vLLM plugin (integrations/vllm_cpu_hadamard): its torch hadacore_transform is the transform vlmq's
export declares (x · H_d / sqrt(d), H_d Sylvester), the one vlmq's runtime applies (vlmq.numerics.block_hadamard
with one block); vLLM itself running it on the real export is tests/test_real_weights.py and DEPLOY.md's snippet."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO_ROOT
from vlmq.numerics import block_hadamard, sylvester_hadamard

sys.path.insert(0, str(REPO_ROOT / "integrations" / "vllm_cpu_hadamard"))
from vlmq_vllm_cpu_hadamard import hadacore_transform  # noqa: E402


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
