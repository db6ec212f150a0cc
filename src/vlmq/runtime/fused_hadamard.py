"""down_proj's online block Hadamard (R4) fused into the SiLU·mul + int8 step that feeds it (Triton, CUDA; the
interpreter on CPU).

``silu_mul_hadamard`` computes silu(gate) * up like ``vlmq.runtime.fused.silu_mul``, rotated before the int8
quantization, in one pass over the row: the row as [blocks, block] times the ±1 Sylvester block (a tensor-core
dot, exact: ±1 times model-dtype values, fp32 sums), then 1/sqrt(block). The eager reference sums
x * (±1/sqrt(block)) in fp32 in another order, so where the exact value sits on a model-dtype rounding tie the
two may round apart: an int8 value then differs by one (2 of 704,512 in tests/test_hadamard_act.py); everywhere
else it is bit for bit.

At decode sizes a token's row is split over several programs ("parts") that must share the row's maximum
before they quantize: on Hopper they run as one thread-block cluster and exchange it through the cluster's
hardware barrier (split mode "cluster"), elsewhere through a barrier in global memory ("wait"). At prefill
sizes one program takes a row ("row"). All give the same values.
"""

from __future__ import annotations

import collections
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlmq.numerics import sylvester_hadamard
from vlmq.runtime.fused import round_to, warps_for
from vlmq.runtime.kernels.tiles import capability_of, interpreting, next_pow2, pdl_enter, pdl_kwargs, sm_count
from vlmq.runtime.kernels.triton_w8a8 import MIN_SCALE, quant_store, quantize_int8


@triton.jit
def _sylvester_signs(HB: tl.constexpr, LOG2_HB: tl.constexpr):
    """The HB x HB Sylvester Hadamard's entries, unnormalized: H[i, j] = (-1)^popcount(i & j)."""
    both = tl.arange(0, HB)[:, None] & tl.arange(0, HB)[None, :]
    parity = tl.zeros([HB, HB], dtype=tl.int32)
    for b in tl.static_range(LOG2_HB):
        parity = parity ^ ((both >> b) & 1)
    return (1 - 2 * parity).to(tl.float32)


@triton.jit
def _silu_mul_rotated(g, u, signs, h_scale, dt: tl.constexpr, DOT_FP32: tl.constexpr):
    """silu(g) * u rounded like torch, times the ±1 block `signs` ([blocks, HB] @ [HB, HB]), times h_scale:
    block_hadamard's fp32 result back in the model dtype (held in fp32), as the linear quantizes it."""
    y = round_to(round_to(g / (1.0 + tl.exp(-g)), dt) * u, dt)
    if DOT_FP32:  # fp32 models, and the interpreter (its bf16 dot is broken)
        z = tl.dot(y, signs.to(tl.float32), input_precision="ieee")
    else:  # y holds model-dtype values: exact as dot operands, products exact, fp32 sums
        z = tl.dot(y.to(dt), signs.to(dt), out_dtype=tl.float32)
    return round_to(z * h_scale, dt)


@triton.jit
def _silu_mul_hadamard_kernel(gu_ptr, q_ptr, s_ptr, n_cols, n_blocks, h_scale, HB: tl.constexpr,
                              LOG2_HB: tl.constexpr, NB: tl.constexpr, DOT_FP32: tl.constexpr,
                              USE_PDL: tl.constexpr):  # fmt: skip
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    blk = tl.arange(0, NB)[:, None]
    cols = blk * HB + tl.arange(0, HB)[None, :]  # the row as [blocks (padded to NB), HB]
    mask = (blk < n_blocks) & (cols >= 0)  # cols >= 0: the block mask at the tile's full shape
    dt = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    z = _silu_mul_rotated(g, u, _sylvester_signs(HB, LOG2_HB), h_scale, dt, DOT_FP32)
    quant_store(z, q_ptr + row * n_cols + cols, s_ptr + row, mask)


@triton.jit
def _cluster_sync(x):
    """Every thread of every CTA in this thread-block cluster arrives (release: its earlier stores, global ones
    included, become visible to the cluster) and waits for all (acquire). Returns 0 (for a dependent address).
    Launched without its cluster the barrier syncs one CTA only, and the parts would read each other's peaks
    unsynchronized: only ``launch_in_clusters`` may launch a kernel that calls it."""
    return tl.inline_asm_elementwise("barrier.cluster.arrive.release.aligned;\n\t"
                                     "barrier.cluster.wait.acquire.aligned;\n\tmov.u32 $0, 0;",
                                     "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)  # fmt: skip


@triton.jit
def _silu_mul_hadamard_split_kernel(gu_ptr, q_ptr, s_ptr, signs_ptr, sync_ptr, n_cols, n_blocks, n_parts, h_scale,
                                    HB: tl.constexpr, LOG2_HB: tl.constexpr, BPP: tl.constexpr,
                                    MAX_PARTS: tl.constexpr, DOT_FP32: tl.constexpr, SIGNS_IN_KERNEL: tl.constexpr,
                                    CLUSTER: tl.constexpr, USE_PDL: tl.constexpr):  # fmt: skip
    """``_silu_mul_hadamard_kernel`` with a row's blocks spread over ``n_parts`` programs (BPP blocks each),
    so a decode token's row runs on several SMs. The row's int8 scale needs every part's max, exchanged
    through the row's slot in ``sync_ptr`` ([arrived, generation, peak of each part]) by a sense-reversing
    barrier: each part stores its peak and arrives; the last to arrive advances the generation, then zeroes
    the count; the others wait for that, then read every peak and quantize their own tile. Every part must be
    resident at once, which the launcher guarantees (at most one program per SM). With CLUSTER (the row's parts
    launched as one thread-block cluster of that size, Hopper) the exchange is the cluster's hardware barrier
    instead: store the peak, arrive (release) and wait (acquire), read every peak; no atomics, no polling, and
    the hardware schedules a cluster's CTAs together."""
    pdl_enter(USE_PDL)
    part = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    slot = sync_ptr + row * (MAX_PARTS + 2)
    j = tl.arange(0, HB)
    blk = part * BPP + tl.arange(0, BPP)[:, None]
    cols = blk * HB + j[None, :]
    mask = (blk < n_blocks) & (cols >= 0)
    dt = gu_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if SIGNS_IN_KERNEL:
        signs = _sylvester_signs(HB, LOG2_HB).to(signs_ptr.dtype.element_ty)
    else:
        signs = tl.load(signs_ptr + j[:, None] * HB + j[None, :])
    if not CLUSTER:  # this call's generation; it advances only once every part arrived
        generation = tl.load(slot + 1, volatile=True)
    z = _silu_mul_rotated(g, u, signs, h_scale, dt, DOT_FP32)
    # peaks are >= 0, where fp32 bits order like int32
    tl.store(slot + 2 + part, tl.max(tl.where(mask, tl.abs(z), 0.0)).to(tl.int32, bitcast=True))
    tl.debug_barrier()  # the peak's store before the arrival (released by it)
    p = tl.arange(0, MAX_PARTS)
    if CLUSTER:
        arrived = _cluster_sync(part)  # 0, and the peaks' loads depend on it: they cannot move above the wait
        peaks = tl.load(slot + 2 + arrived + p, mask=p < n_parts, other=0, volatile=True)
        peak = tl.max(peaks.to(tl.float32, bitcast=True))
    else:
        last = tl.atomic_add(slot, 1, sem="acq_rel") == n_parts - 1
        if last:
            tl.atomic_xchg(slot + 1, generation + 1, sem="release")
            # the count's reset after the release, off the waiters' path: the next call's parts arrive only once
            # this kernel has finished (every kernel of the PDL chain waits for its predecessor)
            tl.atomic_xchg(slot, 0, sem="relaxed")
        now = tl.load(slot + 1, volatile=True)
        while now == generation:
            now = tl.load(slot + 1, volatile=True)
        tl.atomic_add(slot + 1, 0, sem="acquire")  # thread 0's; the block barrier extends it
        tl.debug_barrier()
        peaks = tl.load(slot + 2 + p, mask=p < n_parts, other=0, volatile=True).to(tl.float32, bitcast=True)
        peak = tl.max(peaks)
    scale = tl.maximum(tl.div_rn(peak, 127.0), MIN_SCALE)
    if part == 0:
        tl.store(s_ptr + row, scale)
    tl.store(q_ptr + row * n_cols + cols, quantize_int8(z, tl.div_rn(1.0, scale)), mask=mask)


HADAMARD_MIN_BLOCK = 16  # tl.dot's smallest operand side
HADAMARD_MAX_BLOCK = 128  # the ±1 block sits in shared memory as a dot operand: 32 KB in bf16 (512 would take 512 KB)
HADAMARD_MAX_TILE = 32768  # [padded blocks, block] elements in one program's registers (7B: 148 x 128 -> 256 x 128)


def silu_mul_hadamard_fits(block: int, width: int) -> bool:
    """Whether ``silu_mul_hadamard`` takes a row of ``width`` with this Hadamard block size."""
    if not HADAMARD_MIN_BLOCK <= block <= HADAMARD_MAX_BLOCK or block & (block - 1) or width % block:
        return False
    return max(HADAMARD_MIN_BLOCK, next_pow2(width // block)) * block <= HADAMARD_MAX_TILE


HADAMARD_PART_BLOCKS = 16  # blocks per program of the split kernel (tl.dot's smallest M)
HADAMARD_MAX_PARTS = 32  # programs per row of the split kernel (72B's 29568-wide down_proj input: 15)
HADAMARD_MAX_CLUSTER = 8  # the portable thread-block cluster size (split mode "cluster")
SPLIT_MODES = ("row", "wait", "cluster")
_SYNC_ROWS = 1024  # rows of the split kernel's sync slots ("wait" launches at most one program per SM)


@functools.cache   # never evicted: a captured CUDA graph keeps reading it
def _signs_on(block: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The unnormalized ±1 Sylvester block on `device` (exact in any float dtype), built once before any
    CUDA graph captures the kernel."""
    return (sylvester_hadamard(block) * math.sqrt(block)).round().to(dtype).to(device).contiguous()


@functools.cache
def _sync_slots(device: torch.device) -> Tensor:
    """Per row [arrived, generation, peak of each part]; `arrived` is zero between calls. One set per device:
    calls on one device must not overlap in time (one decode stream: two streams running the kernel at once
    would count each other's arrivals)."""
    return torch.zeros(_SYNC_ROWS * (HADAMARD_MAX_PARTS + 2), dtype=torch.int32, device=device)


def _parts(width: int, block: int, part_blocks: int) -> int:
    return math.ceil(width // block / part_blocks)


def cluster_ok(parts: int, device: torch.device) -> bool:
    """Whether a row's ``parts`` can run as one thread-block cluster here: Hopper or newer, at most the portable
    cluster size, and a Triton whose launch metadata ``launch_in_clusters`` knows."""
    return parts <= HADAMARD_MAX_CLUSTER and capability_of(device) >= (9, 0) and _triton_packs_cluster_size()


@functools.cache
def _triton_packs_cluster_size() -> bool:
    """Whether this Triton's CUDA backend packs launch metadata as (num_warps, num_ctas, shared) (3.6-3.8)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend

        meta = collections.namedtuple("meta", "num_warps num_ctas shared cluster_dims")(4, 2, 64, (2, 1, 1))
        return tuple(CUDABackend.pack_metadata(None, meta)) == (4, 2, 64)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - another Triton: no cluster launch, split mode "wait"
        return False


def hadamard_split_mode(m: int, width: int, block: int, device: torch.device) -> str:
    """How ``silu_mul_hadamard`` spreads M rows: one program per row where the rows alone fill the GPU
    (prefill) or off CUDA; else each row over several programs that exchange their maxima. On Hopper, with at
    most 8 parts, they form a thread-block cluster ("cluster": 1.8 % faster decode than "wait" at batch 1 on an
    H100, BENCHMARKS.md); elsewhere (Ampere, or more parts) they wait for each other through global memory ("wait"),
    which needs them all resident at once: at most one program per SM (assuming no other kernel holds SMs for
    good, e.g. a collective spinning on another stream). Triton's interpreter runs programs one after
    another, so there a part waiting for another would wait forever: one program per row."""
    parts = _parts(width, block, HADAMARD_PART_BLOCKS)
    if device.type != "cuda" or interpreting() or not 2 <= parts <= HADAMARD_MAX_PARTS:
        return "row"
    if m * parts > min(sm_count(device), _SYNC_ROWS):
        return "row"
    return "cluster" if cluster_ok(parts, device) else "wait"


def silu_mul_hadamard(gu: Tensor, block: int, split: str | None = None, *, part_blocks: int = HADAMARD_PART_BLOCKS,
                      signs_in_kernel: bool = False, warps: int = 4) -> tuple[Tensor, Tensor]:
    """silu(gate) * up from gate_up [M, 2I], times the block-diagonal normalized Sylvester Hadamard
    (``vlmq.numerics.block_hadamard``), as (int8 [M, I], fp32 scale [M]) for down_proj. ``split``: one of
    SPLIT_MODES, None = ``hadamard_split_mode``'s choice; every mode gives the same values. ``part_blocks``,
    ``signs_in_kernel`` (the ±1 block built in registers rather than read) and ``warps`` (per program) tune the
    split modes (benchmarks)."""
    m, two_i = gu.shape
    i = two_i // 2
    if not silu_mul_hadamard_fits(block, i):
        raise ValueError(f"no fused Hadamard for block {block} over {i} columns")
    split = split or hadamard_split_mode(m, i, block, gu.device)
    if split not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {split!r}; choose from {SPLIT_MODES}")
    q = torch.empty((m, i), dtype=torch.int8, device=gu.device)
    s = torch.empty(m, dtype=torch.float32, device=gu.device)
    dot_fp32 = interpreting() or gu.dtype == torch.float32
    # h_scale: sylvester_hadamard's fp64 1/sqrt(block), rounded to fp32 at the launch like its .to(fp32)
    h_scale = 1.0 / math.sqrt(block)
    if split == "row":
        nb = max(HADAMARD_MIN_BLOCK, next_pow2(i // block))
        _silu_mul_hadamard_kernel[(m,)](gu, q, s, i, i // block, h_scale, HB=block,
                                        LOG2_HB=block.bit_length() - 1, NB=nb, DOT_FP32=dot_fp32,
                                        num_warps=warps_for(nb * block), **pdl_kwargs())  # fmt: skip
        return q, s
    if part_blocks < HADAMARD_PART_BLOCKS or part_blocks & (part_blocks - 1):
        raise ValueError(f"part_blocks must be a power of two >= {HADAMARD_PART_BLOCKS}, not {part_blocks}")
    parts = _parts(i, block, part_blocks)
    if parts > 1 and (interpreting() or not gu.is_cuda):
        raise ValueError(f"split mode {split!r} with several parts per row needs a GPU (programs that run at once)")
    if m > _SYNC_ROWS or parts > HADAMARD_MAX_PARTS:
        raise ValueError(f"split mode {split!r} takes at most {_SYNC_ROWS} rows of {HADAMARD_MAX_PARTS} parts, "
                         f"not {m} of {parts}")
    cluster = parts if split == "cluster" and parts > 1 else 0  # one part: nothing to exchange
    if cluster and not cluster_ok(parts, gu.device):
        raise ValueError(f"split mode 'cluster' needs a Hopper GPU and at most {HADAMARD_MAX_CLUSTER} parts "
                         f"per row, not {parts}")
    if not cluster and gu.is_cuda and m * parts > sm_count(gu.device):
        raise ValueError(f"split mode 'wait' needs at most one program per SM: {m} rows x {parts} parts "
                         f"> {sm_count(gu.device)} SMs")
    args = (gu, q, s, _signs_on(block, gu.dtype, gu.device), _sync_slots(gu.device), i, i // block, parts, h_scale)
    options = {"HB": block, "LOG2_HB": block.bit_length() - 1, "BPP": part_blocks, "MAX_PARTS": HADAMARD_MAX_PARTS,
               "DOT_FP32": dot_fp32, "SIGNS_IN_KERNEL": signs_in_kernel, "CLUSTER": cluster, "num_warps": warps,
               **pdl_kwargs()}
    if cluster:
        launch_in_clusters(_silu_mul_hadamard_split_kernel, (1, m), cluster, args, options)
    else:
        _silu_mul_hadamard_split_kernel[(parts, m)](*args, **options)
    return q, s


def launch_in_clusters(kernel: triton.JITFunction, grid: tuple[int, ...], cluster: int, args: tuple,
                       options: dict) -> None:
    """Launch ``kernel`` with every program replaced by a thread-block cluster of ``cluster`` CTAs along x (the
    x grid becomes ``grid[0] * cluster``; program_id(0) is the CTA's). Triton launches clusters only for a
    kernel compiled with ``num_ctas`` > 1, which also splits every tensor across the CTAs (and, in Triton 3.6,
    fails to compile this kernel's reductions): so compile it for one CTA and set the cluster size in the
    launch metadata of its cached binary, which the launcher reads on every launch. The kernel must take
    ``cluster`` as a constexpr, so each cluster size is a binary of its own."""
    compiled = kernel.warmup(*args, grid=grid, **options)
    compiled = compiled.result() if hasattr(compiled, "result") else compiled
    compiled.packed_metadata = cluster_metadata(compiled, cluster)
    kernel[grid](*args, **options)


def cluster_metadata(compiled, cluster: int) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """The launch metadata of a one-CTA ``compiled`` kernel with its cluster size set to ``cluster``. Raises where
    this Triton packs it otherwise (Triton 3.6-3.8: (num_warps, num_ctas, shared)): a launch without the cluster
    would let each part read the others' peaks unsynchronized."""
    packed, meta = compiled.packed_metadata, compiled.metadata
    # the launcher sizes scratch buffers by the compiled num_ctas (1): the kernel must use none
    scratch = getattr(meta, "global_scratch_size", 0) or getattr(meta, "profile_scratch_size", 0)
    if scratch or packed not in ((meta.num_warps, 1, meta.shared), (meta.num_warps, cluster, meta.shared)):
        raise RuntimeError(f"split mode 'cluster' cannot launch on this Triton (launch metadata {packed!r}); "
                           "use split mode 'wait'")
    return (meta.num_warps, cluster, meta.shared)
