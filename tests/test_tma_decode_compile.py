"""The Hopper TMA decode kernel (Gluon) compiled for sm90 on the CPU, without a GPU: it builds with
this Triton, and its PTX issues the weight copy before the PDL wait and the activation copy after
it, lets the next kernel launch once the weights have landed, and fits the shared memory that
``tiles.tma_smem_bytes`` plans for. The GPU tests run it (tests/gpu/test_triton_w8a8.py)."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper", reason="this Triton has no Gluon Hopper module")
from vlmq.runtime.kernels import tiles  # noqa: E402

if not tiles.gluon_version_checked():
    pytest.skip("pick_config does not use the TMA kernel with this Triton", allow_module_level=True)

try:  # Triton internals (stable across 3.6-3.8): skip, not fail, on a Triton that moved them
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
except ImportError as exc:
    pytest.skip(f"this Triton has no ahead-of-time Gluon compile path: {exc}", allow_module_level=True)

from vlmq.runtime.kernels import w8a8_tma_decode as td  # noqa: E402


def _compile(m: int, n: int, k: int, rows: int, split: int, tokens_m: bool, out_int32: bool, bias: bool):
    import triton

    steps = k // (split * tiles.TMA_BLOCK_K)
    bt = tiles.tma_token_block(m, tokens_m)
    w_desc = td._steps_view(torch.zeros(n, k, dtype=torch.int8), rows, steps)
    a_desc = td._steps_view(torch.zeros(m, k, dtype=torch.int8), bt, steps)
    const = {"K_STEPS": steps, "SPLIT_K": split, "TOKENS_M": tokens_m, "HAS_BIAS": bias, "OUT_INT32": out_int32,
             "USE_PDL": True, "num_warps": 4}  # fmt: skip
    sig = {"w_desc": mangle_type(w_desc), "a_desc": mangle_type(a_desc), "out_ptr": "*i32" if out_int32 else "*bf16",
           "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16" if bias else "*fp32",
           "ws_ptr": "*i32", "lock_ptr": "*i32", "M": "i32", "N": "i32", "stride_om": "i32",
           **dict.fromkeys(const, "constexpr")}  # fmt: skip
    src = GluonASTSource(td._tma_decode_kernel, sig, const)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}), steps


@pytest.mark.parametrize(
    "m,n,k,rows,split,tokens_m,out_int32,bias",
    [
        (8, 2560, 2048, 64, 1, False, False, True),  # qkv at batch 8: weight rows as the M side
        (64, 2048, 2048, 32, 1, True, False, False),  # o_proj at 64 tokens: tokens as the M side
        (16, 2048, 2048, 64, 2, False, True, False),  # split-K through the workspace, raw int32
        (33, 200, 256, 16, 1, True, False, True),
    ],
)
def test_weights_stream_before_the_pdl_wait(m, n, k, rows, split, tokens_m, out_int32, bias) -> None:
    compiled, steps = _compile(m, n, k, rows, split, tokens_m, out_int32, bias)
    ptx = compiled.asm["ptx"]
    events = [(mt.start(), mt.group(0)) for mt in re.finditer(
        r"cp\.async\.bulk\.tensor|griddepcontrol\.wait|griddepcontrol\.launch_dependents|mbarrier\.try_wait|wgmma\.mma_async",
        ptx)]  # fmt: skip
    kinds = [e[1] for e in events]
    copies = [i for i, kind in enumerate(kinds) if kind == "cp.async.bulk.tensor"]
    assert len(copies) == 2, "one 3-D TMA box per operand"
    wait = kinds.index("griddepcontrol.wait")
    assert copies[0] < wait < copies[1], "weights are copied before the PDL wait, activations after it"
    trigger = kinds.index("griddepcontrol.launch_dependents")
    first_mbar_wait = kinds.index("mbarrier.try_wait")
    first_mma = kinds.index("wgmma.mma_async")
    assert first_mbar_wait < trigger < first_mma, "the next kernel launches once the weights are in"
    assert kinds.count("wgmma.mma_async") == steps * tiles.TMA_BLOCK_K // 32  # k = 32 per int8 wgmma
    assert kinds.count("griddepcontrol.wait") == 1 and kinds.count("griddepcontrol.launch_dependents") == 1
    assert compiled.metadata.shared <= tiles.tma_smem_bytes(m, k, rows, split, tokens_m)
