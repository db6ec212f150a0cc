"""The fused SiLU·mul + block Hadamard + int8 kernel on CUDA (bf16 tensor-core dot; the interpreter test
in tests/test_hadamard_act.py runs its fp32 branch), and FusedOps.act_linear around it (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_hadamard_act import compare_kernel, down_linear, gate_up, reference_down, rel_err  # noqa: E402
from vlmq.runtime.decode import ReferenceOps  # noqa: E402
from vlmq.runtime.fused_hadamard import (  # noqa: E402
    HADAMARD_MAX_CLUSTER,
    HADAMARD_MAX_PARTS,
    HADAMARD_PART_BLOCKS,
    _sync_slots,
    launch_in_clusters,
    silu_mul_hadamard,
)
from vlmq.runtime.ops import FusedOps  # noqa: E402


@pytest.mark.parametrize("split", ["row", "wait", "cluster", None])
@pytest.mark.parametrize("m", [1, 8, 64])
@pytest.mark.parametrize("n_blocks,block,dtype", [(86, 128, torch.bfloat16), (43, 32, torch.bfloat16),
                                                  (5, 128, torch.float16), (148, 128, torch.bfloat16)])
def test_silu_mul_hadamard_kernel(m: int, n_blocks: int, block: int, dtype: torch.dtype, split: str | None) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if split == "wait" and m * -(-n_blocks // HADAMARD_PART_BLOCKS) > sms:  # parts that might not all be resident
        with pytest.raises(ValueError, match="one program per SM"):
            silu_mul_hadamard(gate_up(m, n_blocks * block, dtype, "cuda").reshape(m, -1), block, split)
        return
    if split == "cluster" and -(-n_blocks // HADAMARD_PART_BLOCKS) > HADAMARD_MAX_CLUSTER:
        with pytest.raises(ValueError, match="at most 8 parts"):
            silu_mul_hadamard(gate_up(m, n_blocks * block, dtype, "cuda").reshape(m, -1), block, split)
        return
    # peaks left in the sync slots by an earlier test (the same seeded inputs in another split mode) would hide a
    # barrier that does not synchronize: a huge one instead
    _sync_slots(torch.device("cuda")).view(-1, HADAMARD_MAX_PARTS + 2)[:, 2:].fill_(0x7F000000)
    bad, total = compare_kernel(m, n_blocks, block, dtype, "cuda", split)
    print(f"int8 mismatches at rounding ties: {bad} / {total}")


@pytest.mark.parametrize("split,part_blocks,signs_in_kernel,warps",
                         [("wait", 16, False, 4), ("wait", 16, True, 4), ("wait", 32, False, 4), ("wait", 16, False, 2),
                          ("cluster", 16, False, 4), ("cluster", 16, True, 4), ("cluster", 32, False, 4),
                          ("cluster", 16, False, 2)])
def test_split_kernel_is_the_row_kernel_bit_for_bit_and_repeatable(split: str, part_blocks: int, signs_in_kernel: bool,
                                                                    warps: int) -> None:
    """Same values as one program per row, call after call (the barrier resets itself), also when replayed
    from a CUDA graph. Consecutive calls take inputs whose peaks differ and run back to back (no host sync in
    between, so under PDL each starts while the previous one finishes): a part that took the previous call's
    peak would show."""
    gu = gate_up(8, 11008, device="cuda").reshape(8, -1)
    inputs = [gu, gu * 2, gu * 0.5]
    wants = [silu_mul_hadamard(x, 128, "row") for x in inputs]
    kw = {"part_blocks": part_blocks, "signs_in_kernel": signs_in_kernel, "warps": warps}
    outs = [silu_mul_hadamard(inputs[k % 3], 128, split, **kw) for k in range(60)]
    torch.cuda.synchronize()
    for k, (q, s) in enumerate(outs):
        assert torch.equal(q, wants[k % 3][0]) and torch.equal(s, wants[k % 3][1]), k
    arrived = _sync_slots(gu.device).view(-1, HADAMARD_MAX_PARTS + 2)[:, 0]
    assert not arrived.any()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [silu_mul_hadamard(inputs[k % 3], 128, split, **kw) for k in range(6)]
    for _ in range(3):
        for q, s in outs:
            q.fill_(0)
            s.fill_(0)
        graph.replay()
        torch.cuda.synchronize()
        for k, (q, s) in enumerate(outs):
            assert torch.equal(q, wants[k % 3][0]) and torch.equal(s, wants[k % 3][1]), k
    assert not arrived.any()


@triton.jit
def _cluster_ids_kernel(out_ptr, CLUSTER: tl.constexpr):
    part = tl.program_id(0)
    row = tl.program_id(1)
    rank = tl.inline_asm_elementwise("mov.u32 $0, %cluster_ctarank;", "=r,r", [part], dtype=tl.int32, is_pure=True,
                                     pack=1)  # fmt: skip
    size = tl.inline_asm_elementwise("mov.u32 $0, %cluster_nctarank;", "=r,r", [part], dtype=tl.int32,
                                     is_pure=True, pack=1)  # fmt: skip
    at = out_ptr + (row * CLUSTER + part) * 3
    tl.store(at, part)
    tl.store(at + 1, rank)
    tl.store(at + 2, size)


@pytest.mark.skipif(torch.cuda.get_device_capability() < (9, 0), reason="thread-block clusters need Hopper")
def test_launch_in_clusters_makes_each_programs_ctas_one_cluster() -> None:
    """A grid of (1, rows) with cluster 6 runs 6 CTAs per row, program_id(0) their rank in a cluster of 6."""
    out = torch.full((3 * 6, 3), -1, dtype=torch.int32, device="cuda")
    launch_in_clusters(_cluster_ids_kernel, (1, 3), 6, (out,), {"CLUSTER": 6})
    torch.cuda.synchronize()
    part = torch.arange(6, dtype=torch.int32, device="cuda").repeat(3)
    assert torch.equal(out[:, 0], part) and torch.equal(out[:, 1], part) and bool((out[:, 2] == 6).all())


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
