"""down_proj's online input Hadamard (R4) in the decode loop's act_linear step: every ops object rotates
before it quantizes. Reference = silu(g) * u -> block_hadamard -> per-token int8 -> int GEMM -> dequant.
ReferenceOps here; FusedOps (and the fused SiLU·mul + Hadamard + int8 kernel) on CPU in Triton's
interpreter. The GPU test (tests/gpu/test_hadamard_gpu.py) re-checks the kernel in bf16 on CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from vlmq.numerics import block_hadamard, quantize_per_token
from vlmq.runtime.decode import ReferenceOps
from vlmq.runtime.linear import W8A8Linear, int_gemm_reference


def down_linear(k: int, n: int, block: int, dtype: torch.dtype = torch.bfloat16) -> W8A8Linear:
    torch.manual_seed(1)
    lin = W8A8Linear.from_float(nn.Linear(k, n, bias=True).to(dtype), backend="reference")
    lin.input_hadamard = block
    return lin


def gate_up(m: int, i: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> torch.Tensor:
    """[1, m, 2i] with outlier channels (what the rotation spreads out)."""
    torch.manual_seed(2)
    gu = torch.randn(1, m, 2 * i) * 2
    gu[..., 3] *= 30
    gu[..., i + 7] *= 40
    return gu.to(dtype).to(device)


def reference_down(gu: torch.Tensor, lin: W8A8Linear) -> torch.Tensor:
    g, u = gu.chunk(2, dim=-1)
    x = block_hadamard((nn.functional.silu(g) * u).reshape(-1, lin.in_features), lin.input_hadamard)
    q, s = quantize_per_token(x)
    out = lin.dequantize(int_gemm_reference(q, lin.weight), s, gu.dtype)
    return out.view(*gu.shape[:-1], -1)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_reference_ops_rotate_before_quantizing() -> None:
    lin = down_linear(160, 48, 32)
    gu = gate_up(4, 160)
    assert torch.equal(ReferenceOps().act_linear(gu, lin), reference_down(gu, lin))


INTERPRETER_OPS = textwrap.dedent("""
    import torch
    from test_hadamard_act import down_linear, gate_up, reference_down, rel_err
    from vlmq.runtime import attention as AT
    from vlmq.runtime import ops as OPS
    from vlmq.runtime.decode import ReferenceOps
    ref = ReferenceOps()
    fused = OPS.FusedOps(ref)
    # 5 and 43 blocks: not powers of two; block 256: no fused kernel, the linear rotates bf16 rows
    for i, block in ((160, 32), (43 * 32, 32), (5 * 128, 128), (512, 256)):
        lin = down_linear(i, 48, block)
        gu = gate_up(3, i)
        want = reference_down(gu, lin)
        assert torch.equal(ref.act_linear(gu, lin), want), (i, block)
        assert OPS._hadamard_prequant_ok(lin, i) == (block <= 128) and not OPS._prequant_ok(lin)
        for fuse in (True, False):  # the fused kernel, and the SiLU·mul kernel + the linear's own rotation
            fused.fuse_hadamard = fuse
            rel = rel_err(fused.act_linear(gu, lin), want)
            print("act_linear", i, block, "fused" if fuse else "unfused", "rel", rel)
            # up to a bf16 ulp per output from the interpreter's GEMM epilogue (it truncates), a rare int8
            # step at a rounding tie; skipping the Hadamard gives rel ~1.5 (the weight holds W H)
            assert rel < 1e-2, (i, block, fuse, rel)
    fused.fuse_hadamard = True
    # the other producers (not used by the recipe, but never wrong): a rotating linear gets bf16 rows
    h, d = (t.contiguous() for t in gate_up(3, 64).chunk(2, dim=-1))
    w = torch.rand(64).bfloat16() + 0.5
    lin = down_linear(64, 40, 32)
    a, b = ref.add_norm_linear(h, d, w, 1e-6, lin), fused.add_norm_linear(h, d, w, 1e-6, lin)
    assert torch.equal(a[0], b[0]) and rel_err(b[1], a[1]) < 1e-2, rel_err(b[1], a[1])
    attn = torch.randn(2, 2, 3 * 5, 32).bfloat16()  # [B, Hkv, G*T, D], 6 heads
    lin = down_linear(6 * 32, 40, 64)
    assert rel_err(fused.attention_o(attn, lin, 3), ref.attention_o(attn, lin, 3)) < 1e-2
    q = torch.randn(2, 4, 1, 32).half()  # fp16: the interpreter's bf16 dot is broken
    kc, vc = torch.randn(2, 2, 128, 32).half(), torch.randn(2, 2, 128, 32).half()
    valid, cur = torch.rand(2, 128) > 0.2, torch.tensor([77])
    lin = down_linear(4 * 32, 40, 32, torch.float16)
    want = lin(AT.decode_attention_reference(q, kc, vc, valid, cur, 32**-0.5))
    assert rel_err(fused.decode_attention_o(q, kc, vc, valid, cur, 32**-0.5, lin).reshape(want.shape), want) < 1e-2
    print("OPS-OK")
""")


def run_interpreted(script: str, marker: str) -> str:
    pytest.importorskip("triton")
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert marker in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_fused_ops_rotate_before_quantizing_in_triton_interpreter() -> None:
    run_interpreted(INTERPRETER_OPS, "OPS-OK")


INTERPRETER_KERNEL = textwrap.dedent("""
    import torch
    from test_hadamard_act import compare_kernel, gate_up
    from vlmq.runtime.fused_hadamard import silu_mul_hadamard_fits
    assert silu_mul_hadamard_fits(128, 11008) and silu_mul_hadamard_fits(128, 18944)  # 3B, 7B down_proj
    assert not any(silu_mul_hadamard_fits(b, w) for b, w in ((8, 64), (128, 1000), (256, 512), (128, 512 * 128)))
    stats = [compare_kernel(m, nb, block, dtype) for m, nb, block, dtype in (
        (4, 5, 32, torch.bfloat16), (3, 43, 32, torch.bfloat16), (64, 86, 128, torch.bfloat16),
        (2, 1, 16, torch.bfloat16), (3, 5, 128, torch.float32), (2, 43, 64, torch.float16))]
    print("mismatches", stats)
    # the split kernel, bit for bit the row kernel's values; here with one part per row only (the interpreter
    # runs programs one after another, so a part waiting for another would wait forever; tests/gpu runs it
    # with several): its barrier still runs, and leaves every row's arrival count zero
    from vlmq.runtime.fused_hadamard import HADAMARD_MAX_PARTS, _sync_slots, silu_mul_hadamard
    for m, nb, block, dtype, part_blocks in ((2, 5, 128, torch.float16, 16), (1, 16, 64, torch.bfloat16, 16),
                                             (3, 43, 32, torch.bfloat16, 64), (2, 40, 16, torch.float32, 64)):
        gu = gate_up(m, nb * block, dtype).reshape(m, -1)
        gu[0] = 0.0
        q_row, s_row = silu_mul_hadamard(gu, block, "row")
        slots = _sync_slots(gu.device).view(-1, HADAMARD_MAX_PARTS + 2)
        before = slots[:m, 1].clone()
        # split mode "cluster" with one part has nothing to exchange: the same kernel without a cluster
        modes = ("wait", "wait", "cluster") if nb <= part_blocks else ("wait", "wait")
        for split, signs_in_kernel in zip(modes, (False, True, False)):
            q, s = silu_mul_hadamard(gu, block, split, part_blocks=part_blocks, signs_in_kernel=signs_in_kernel)
            assert torch.equal(q, q_row) and torch.equal(s, s_row), (m, nb, block, part_blocks)
        assert not slots[:, 0].any() and torch.equal(slots[:m, 1], before + len(modes))  # a generation per call
    print("split kernels: bit for bit")
    print("KERNEL-OK")
""")


def bf16_tie_distance(x: torch.Tensor) -> torch.Tensor:
    """|x - the nearest midpoint between two adjacent bf16 values|, in bf16 ulps at x (x float64)."""
    ulp = torch.exp2(torch.floor(torch.log2(x.abs().clamp_min(1e-30))) - 7)
    return ((x / ulp) - torch.floor(x / ulp) - 0.5).abs()


def compare_kernel(m: int, n_blocks: int, block: int, dtype: torch.dtype, device: str = "cpu",
                   split: str | None = None) -> tuple[int, int]:
    """silu_mul_hadamard vs the eager reference; returns (int8 mismatches, elements). The kernel sums ±x
    exactly and scales once, the reference accumulates x * (±1/sqrt(block)) in fp32: the two can land on
    either side of a model-dtype rounding tie, and only there may an int8 value differ (by one)."""
    from vlmq.numerics import sylvester_hadamard
    from vlmq.runtime.fused import silu_mul
    from vlmq.runtime.fused_hadamard import silu_mul_hadamard

    i = n_blocks * block
    gu = gate_up(m, i, dtype, device).reshape(m, 2 * i)
    gu[0] = 0.0  # an all-zero row: scale MIN_SCALE, q 0
    q, s = silu_mul_hadamard(gu, block, split)
    g, u = gu.chunk(2, dim=-1)
    # on CUDA the kernels' SiLU is within a bf16 ulp of torch's (tests/gpu/test_decode_gpu.py): start
    # the reference from the SiLU·mul kernel's own product there; the interpreter matches torch exactly
    y = silu_mul(gu, False) if gu.is_cuda else nn.functional.silu(g) * u
    q_ref, s_ref = quantize_per_token(block_hadamard(y, block))
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == (m, i) and s.shape == (m,)
    assert torch.equal(q[0], q_ref[0]) and torch.equal(s[0], s_ref[0])
    diff = (q.int() - q_ref.int()).abs()
    bad = diff > 0
    assert int(diff.max()) <= 1, (m, n_blocks, block, dtype)
    assert int(bad.sum()) <= max(2, q.numel() // 10_000), (int(bad.sum()), q.numel())  # measured: 3e-6
    if dtype != torch.float32:  # every differing value sat on a model-dtype rounding tie
        exact = (y.cpu().double().reshape(m, n_blocks, block) @ sylvester_hadamard(block)).reshape(m, i)
        assert (bf16_tie_distance(exact[bad.cpu()]) < 2**-10).all() if dtype == torch.bfloat16 else True
    assert torch.allclose(s, s_ref, rtol=2**-7, atol=0), (s / s_ref - 1).abs().max()
    return int(bad.sum()), q.numel()


def test_silu_mul_hadamard_kernel_in_triton_interpreter() -> None:
    out = run_interpreted(INTERPRETER_KERNEL, "KERNEL-OK")
    print(out)


def test_benchmark_rotated_down_proj_computes_the_same_linear() -> None:
    """benchmarks/bench_down_hadamard.py compares like with like: its rotated down_proj (W H requantized,
    input_hadamard) gives the plain one's output up to int8 rounding."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        from bench_down_hadamard import rotated
    finally:
        sys.path.pop(0)
    plain = down_linear(512, 64, 0)
    rot = rotated(plain, 128)
    x = torch.randn(5, 512).bfloat16()
    assert rot.input_hadamard == 128 and rel_err(rot(x), plain(x)) < 2e-2


def test_benchmark_kernel_path_charges_each_kernel_with_its_push_of_the_latest_end() -> None:
    """bench_down_hadamard's --profile arithmetic: under PDL a kernel starts early and waits, so its duration is
    not its cost; the end increments are, and they sum to the span."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        from bench_down_hadamard import kernel_path
    finally:
        sys.path.pop(0)
    timeline = [("gemv", 0.0, 10.0), ("silu", 2.0, 13.0),  # silu launched early: busy 11, but only 3 past gemv
                ("gemv", 4.0, 20.0), ("tiny", 5.0, 6.0),   # tiny ends inside gemv's span: no increment
                ("silu", 21.0, 22.0)]
    path = kernel_path(list(reversed(timeline)))  # any input order
    assert path["gemv"] == {"calls": 2, "busy_us": 26.0, "end_increment_us": 17.0}
    assert path["silu"] == {"calls": 2, "busy_us": 12.0, "end_increment_us": 5.0}  # 3, then 2 (the idle 20-21 too)
    assert path["tiny"]["end_increment_us"] == 0.0
    assert sum(r["end_increment_us"] for r in path.values()) == 22.0  # the span


def test_benchmark_variants_bind_the_split_kernels_knobs_where_the_decode_loop_calls_it() -> None:
    """The tuning variants reach the decode loop: FusedOps calls ``vlmq.runtime.ops.silu_mul_hadamard``, which
    the benchmark rebinds for the variant's run, then restores."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        from bench_down_hadamard import VARIANTS, hadamard_keywords
    finally:
        sys.path.pop(0)
    from vlmq.runtime import ops

    original = ops.silu_mul_hadamard
    with hadamard_keywords(VARIANTS["hadamard fused 32 blocks per part"][3]):
        assert ops.silu_mul_hadamard.keywords == {"part_blocks": 32} and ops.silu_mul_hadamard.func is original
    assert ops.silu_mul_hadamard is original


@pytest.mark.parametrize("capability,mma", [(90, "wgmma.mma_async"), (80, "mma.sync")])
def test_fused_kernel_compiles_to_a_tensor_core_dot(capability: int, mma: str) -> None:
    """The bf16 branch (the GPU's; the interpreter runs the fp32 one) compiled ahead of time on the CPU for
    the 3B row (86 blocks of 128 padded to 128): a tensor-core dot whose ±1 block fits shared memory."""
    pytest.importorskip("triton")
    try:  # Triton internals (3.6-3.8): skip, not fail, on a Triton that moved them
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        pytest.skip(f"no ahead-of-time compile path in this Triton: {exc}")
    from vlmq.runtime import fused_hadamard as FU

    const = {"HB": 128, "LOG2_HB": 7, "NB": 128, "DOT_FP32": False, "USE_PDL": capability >= 90}
    sig = {"gu_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "n_cols": "i32", "n_blocks": "i32",
           "h_scale": "fp32", **dict.fromkeys(const, "constexpr")}
    src = ASTSource(FU._silu_mul_hadamard_kernel, sig, const)
    options = {"num_warps": FU.warps_for(128 * 128)}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    assert mma in compiled.asm["ptx"]
    assert compiled.metadata.shared <= 64 * 1024, compiled.metadata.shared
    # the split kernel: 16 blocks per program, a barrier through global atomics
    for in_kernel, warps in ((False, 4), (True, 4), (False, 2)):
        const = {"HB": 128, "LOG2_HB": 7, "BPP": FU.HADAMARD_PART_BLOCKS, "MAX_PARTS": FU.HADAMARD_MAX_PARTS,
                 "DOT_FP32": False, "SIGNS_IN_KERNEL": in_kernel, "CLUSTER": 0, "USE_PDL": capability >= 90}
        sig = {"gu_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "signs_ptr": "*bf16", "sync_ptr": "*i32",
               "n_cols": "i32", "n_blocks": "i32", "n_parts": "i32", "h_scale": "fp32",
               **dict.fromkeys(const, "constexpr")}
        split = triton.compile(ASTSource(FU._silu_mul_hadamard_split_kernel, sig, const),
                               target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
        ptx = split.asm["ptx"]
        assert "mma.sync" in ptx and split.metadata.shared <= 64 * 1024  # 16-row tiles: below wgmma's 64
        # one thread per program arrives (tid 0's predicate), never every thread; the wait reads volatile
        assert "atom.global.gpu.acq_rel.add" in ptx and "setp.eq.b32" in ptx and "ld.volatile.global" in ptx
        # the last part publishes the generation before it zeroes the count (session 15: +0.4 % decode)
        assert ptx.index("atom.global.gpu.release.exch") < ptx.index("atom.global.gpu.relaxed.exch")
    if capability < 90:
        return
    # split mode "cluster" (Hopper): compiled for one CTA, no atomics; each part stores its peak, then the cluster's
    # barrier (arrive with release, wait with acquire), then every part's peak is read
    const.update(SIGNS_IN_KERNEL=False, CLUSTER=6)
    cluster = triton.compile(ASTSource(FU._silu_mul_hadamard_split_kernel, sig, const),
                             target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})
    ptx = cluster.asm["ptx"]
    assert cluster.metadata.num_ctas == 1 and "atom." not in ptx and "%clusterid" not in ptx
    arrive = ptx.index("barrier.cluster.arrive.release.aligned")
    wait = ptx.index("barrier.cluster.wait.acquire.aligned")
    peak_store = ptx.rindex("st.global.b32", 0, arrive)
    assert peak_store < arrive < wait < ptx.index("ld.volatile.global.b32", wait)
    # the launcher reads the cluster size from the binary's launch metadata, which launch_in_clusters rewrites
    assert FU._triton_packs_cluster_size() and FU.cluster_metadata(cluster, 6) == (4, 6, cluster.metadata.shared)
    cluster.packed_metadata = (4, 2, 0)
    with pytest.raises(RuntimeError, match="cannot launch on this Triton"):
        FU.cluster_metadata(cluster, 6)


@pytest.mark.parametrize("capability,split", [((9, 0), "cluster"), ((8, 6), "wait")])
def test_split_mode_splits_a_row_only_while_every_part_can_be_resident(monkeypatch: pytest.MonkeyPatch,
                                                                        capability: tuple[int, int],
                                                                        split: str) -> None:
    """The launcher's rule: split a row over several programs only where rows x parts fits one program per SM
    (an H100's 132 here; the queries need a GPU, so their answers are given), else one program per row; never
    off CUDA, nor where a row is one part. The parts form a thread-block cluster on Hopper (at most 8 of them),
    else they wait for each other through global memory (an RTX 3090 is 8.6)."""
    from vlmq.runtime import fused_hadamard as FU

    monkeypatch.setattr(FU, "sm_count", lambda device: 132)
    monkeypatch.setattr(FU, "capability_of", lambda device: capability)
    cuda = torch.device("cuda")
    assert FU._parts(11008, 128, FU.HADAMARD_PART_BLOCKS) == 6   # the 3B's down_proj input
    assert [FU.hadamard_split_mode(m, 11008, 128, cuda) for m in (1, 8, 22, 23, 64)] == [split] * 3 + ["row"] * 2
    assert FU.hadamard_split_mode(1, 11008, 128, torch.device("cpu")) == "row"
    assert FU.hadamard_split_mode(1, 16 * 128, 128, cuda) == "row"   # one part: nothing to wait for
    assert FU.hadamard_split_mode(1, 18944, 128, cuda) == "wait"     # 7B: 10 parts, more than a cluster takes
    with pytest.raises(ValueError, match="needs a GPU"):  # off CUDA a row's parts cannot run at once
        FU.silu_mul_hadamard(torch.zeros(1, 2 * 11008, dtype=torch.bfloat16), 128, "cluster")
