"""The W8A8 GEMMs that pick_config chooses, compiled on the CPU for the cards vlmq targets, fit those
cards' shared memory once ``fit_to_smem`` (and, for the persistent kernel, ``stages_that_fit``) has cut
them down: the pointer kernel for an RTX 3090 (sm86, 99 KB a block; no PDL, no TMA), the persistent
TMA kernel for an H100 (sm90) and a B200 (sm100, where Triton stages the output tile in shared memory).
A kernel over its card's limit fails at launch with OutOfResources; no card but the H100 is lent here."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlmq.runtime.kernels import tiles
from vlmq.runtime.kernels import triton_w8a8 as tw
from vlmq.runtime.kernels import w8a8_persistent as wp

try:  # Triton internals, stable across 3.6-3.8: skip, not fail, on a Triton that moved them
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError as exc:
    pytest.skip(f"this Triton has no ahead-of-time compile path: {exc}", allow_module_level=True)

SMEM = {86: 101376, 90: 232448, 100: 232448}  # opt-in shared memory per block
ALIGNED = ("a_ptr", "w_ptr", "out_ptr", "a_scale_ptr", "w_scale_ptr", "bias_ptr", "pqs_ptr", "ws_ptr", "lock_ptr",
           "N", "K", "stride_am", "stride_wn", "stride_om")  # fmt: skip


def _source(fn, types: dict[str, str], const: dict, aligned: tuple[str, ...] = ()) -> ASTSource:
    names = list(fn.arg_names)
    sig = {name: types.get(name, "constexpr") for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return ASTSource(fn, sig, {(names.index(key),): value for key, value in const.items()}, attrs)


def _compile_pointer(cfg: tiles.KernelConfig, k: int, arch: int):
    import triton

    types = {"a_ptr": "*i8", "w_ptr": "*i8", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "w_scale_ptr": "*fp32",
             "bias_ptr": "*bf16", "pqs_ptr": "*fp32", "ws_ptr": "*i32", "lock_ptr": "*i32",
             **dict.fromkeys(("M", "N", "K", "SPLIT_K", "stride_am", "stride_wn", "stride_om"), "i32")}  # fmt: skip
    const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
             "A_MODE": tw.A_INT8_ROWSCALE, "HAS_PQS": False, "HAS_BIAS": True, "OUT_INT32": False,
             "EVEN_K": k % cfg.block_k == 0, "AMAX_K": min(tiles.next_pow2(k), max(cfg.block_k, 16384 // cfg.block_m)),
             "USE_PDL": False, "TRIGGER": 0, "SWAP_AB": cfg.swap_ab}  # fmt: skip
    src = _source(tw._w8a8_gemm_kernel, types, const, ALIGNED)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})  # fmt: skip


def _compile_persistent(m: int, n: int, k: int, cfg: tiles.KernelConfig, stages: int, arch: int):
    import triton

    a, w = torch.zeros(m, k, dtype=torch.int8), torch.zeros(n, k, dtype=torch.int8)
    a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, cfg.block_k])
    w_desc = TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k])
    tail = (cfg.tail_m, cfg.tail_n) if cfg.tail_m else None
    a_tail = TensorDescriptor.from_tensor(a, [tail[0], cfg.block_k]) if tail else a_desc
    w_tail = TensorDescriptor.from_tensor(w, [tail[1], cfg.block_k]) if tail else w_desc
    types = {"a_desc": mangle_type(a_desc), "w_desc": mangle_type(w_desc), "a_tail_desc": mangle_type(a_tail),
             "w_tail_desc": mangle_type(w_tail), "out_ptr": "*bf16", "a_scale_ptr": "*fp32",
             "w_scale_ptr": "*fp32", "bias_ptr": "*bf16",
             **dict.fromkeys(("M", "N", "K", "M_MAIN", "stride_om"), "i32")}  # fmt: skip
    const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
             "TAIL_M": tail[0] if tail else 0, "TAIL_N": tail[1] if tail else 0, "NUM_PROGS": 132,
             "HAS_BIAS": True, "OUT_INT32": False, "USE_PDL": True}  # fmt: skip
    src = _source(wp._w8a8_persistent_kernel, types, const)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": stages})  # fmt: skip


@pytest.mark.parametrize(
    "m,n,k",
    [
        (16, 2048, 11008),  # down_proj decode (swap AB, split-K)
        (64, 22016, 2048),  # gate/up decode
        (2048, 2560, 2048),  # qkv prefill: the H100's persistent 128x256 tile, cut for the 3090
    ],
)
def test_pointer_kernel_fits_an_rtx_3090(m: int, n: int, k: int) -> None:
    cfg = tiles.fit_to_smem(tiles.pick_config(m, n, k), 1, SMEM[86])
    assert not (cfg.gemv or cfg.tma or cfg.pdl), cfg  # CPU CI: no GPU, so neither sm90 feature is picked
    compiled = _compile_pointer(dataclasses.replace(cfg, persistent=False), k, 86)
    assert compiled.metadata.shared <= SMEM[86], (cfg, compiled.metadata.shared)


@pytest.mark.parametrize("arch", [90, 100])
@pytest.mark.parametrize("m,n,k", [(2048, 2560, 2048), (4096, 22016, 2048)])
def test_persistent_kernel_fits_hopper_and_blackwell(m: int, n: int, k: int, arch: int) -> None:
    cfg = tiles.fit_to_smem(tiles.pick_config(m, n, k), 1, SMEM[arch])
    assert cfg.persistent, cfg
    stages = wp.stages_that_fit(cfg.num_stages, cfg.block_m, cfg.block_n, cfg.block_k, 2, (arch // 10, 0), SMEM[arch])
    assert stages >= 2
    compiled = _compile_persistent(m, n, k, cfg, stages, arch)
    assert compiled.metadata.shared <= SMEM[arch], (arch, cfg, stages, compiled.metadata.shared)
