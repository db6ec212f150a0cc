"""`vlmq bench` CPU smoke test: demo snapshot + demo export, and the random-shape path; JSON schema."""

from __future__ import annotations

import json
import math

import pytest

from conftest import cli_env, describe, run_cli
from vlmq.cli import EXIT_USER_ERROR
from vlmq.models.demo import write_demo_snapshot

CASES = {"text_b1", "text_b2", "image_b1", "image_b2"}


def check_results(data: dict, loop: str) -> None:
    assert data["loop"] == loop and data["device"] == "cpu"
    for key in ("versions", "date", "new_tokens", "prompt_tokens", "batch_sizes", "ratios"):
        assert key in data
    for label in ("bf16", "w8a8"):
        res = data[label]
        assert res["weight_bytes"] > 0 and "peak_gib" in res
        assert CASES <= set(res)
        for case in CASES:
            r = res[case]
            assert r["prompt_tokens"] > 0 and r["prefill_ms"] > 0 and r["decode_tok_s"] > 0
            if loop == "lean":
                assert r["graphs"] is False and len(r["tokens"]) == data["new_tokens"]
                assert "lm_prefill_ms" not in r  # timed from the prefill's CUDA graph: GPU only
        assert res["image_b1"]["prompt_tokens"] != res["text_b1"]["prompt_tokens"]
        if loop == "lean":
            assert res["image_b1"]["vision_ms"] > 0 and res["image_b1"]["vision_hf_ms"] > 0
            # merged image features of LeanVision vs transformers' tower (CPU, bf16: the same kernels)
            assert res["image_b1"]["vision_lean_vs_hf_rel"] < 1e-2
    ratios = data["ratios"]
    for case in CASES:
        bf16, w8a8, ratio = data["bf16"][case], data["w8a8"][case], ratios[case]
        # each ratio is the one its two measurements in this JSON give (W8A8 over bf16 for speed)
        assert ratio["prefill_speedup"] == round(bf16["prefill_ms"] / w8a8["prefill_ms"], 3), (case, bf16, w8a8)
        assert ratio["decode_speedup"] == round(w8a8["decode_tok_s"] / bf16["decode_tok_s"], 3), (case, bf16, w8a8)
        assert all(math.isfinite(v) for v in (ratio["prefill_speedup"], ratio["decode_speedup"],
                                               bf16["decode_tok_s"], w8a8["decode_tok_s"]))
        assert ratio["prefill_speedup"] > 0
        # The hf loop's decode time is a difference of two timings (generate(n) - generate(1)): on a noisy CPU
        # it can come out <= 0, which measure_hf clamps to 1e-9 s, a tok/s of >= 1e9 that rounds the ratio to
        # 0 or makes it huge. Otherwise the decode ratio is a positive number.
        clamped = loop == "hf" and max(bf16["decode_tok_s"], w8a8["decode_tok_s"]) >= 1e9
        assert ratio["decode_speedup"] > 0 or clamped, (case, bf16, w8a8)
    assert 0.3 < ratios["weight_bytes_ratio"] < 0.9  # int8 LM linears, bf16 embeddings + vision


ARGS = ["--batch-sizes", "1,2", "--new-tokens", "3", "--prompt-tokens", "16", "--iters", "1", "--device", "cpu"]


@pytest.mark.parametrize("loop", ["lean", "hf"])
def test_bench_on_demo_checkpoints(demo_run, tmp_path, loop):
    snapshot = write_demo_snapshot(tmp_path / "snap")
    export = demo_run.export_dir / "compressed_tensors"
    if not export.is_dir():
        export = demo_run.modelopt_dir
    out = tmp_path / "bench.json"
    result = run_cli(["bench", "--baseline", str(snapshot), "--model-dir", str(export), "--loop", loop,
                      *ARGS, "--out", str(out)], cwd=tmp_path)
    assert result.rc == 0, describe(result)
    data = json.loads(out.read_text())
    check_results(data, loop)
    assert "decode x" in result.stdout + result.stderr


def test_bench_random_shape(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in cli_env().items() if k != "COLUMNS"}   # a pipe, as in CI logs: no terminal width
    result = run_cli(["bench", "--shape", "demo", "--loop", "lean", *ARGS, "--out", str(out)], cwd=tmp_path, env=env)
    assert result.rc == 0, describe(result)
    data = json.loads(out.read_text())
    check_results(data, "lean")
    assert data["source"] == "shape=demo" and "W8A8" in data["w8a8"]["model"]
    # Printed whole in a pipe (rich's 80-column default cut headers to `bf16 pr…`), no `None GiB` on CPU.
    printed = result.stdout + result.stderr
    assert "…" not in printed, printed
    for header in ("bf16 prefill ms", "w8a8 prefill ms", "LM prefill x", "vision ms (HF's)", "text_b1", "image_b2"):
        assert header in printed, (header, printed)
    assert "peak memory n/a (CPU); weights ratio" in printed and "None" not in printed, printed


def test_bench_needs_a_model(tmp_path):
    result = run_cli(["bench", "--device", "cpu"], cwd=tmp_path)
    assert result.rc == EXIT_USER_ERROR, describe(result)
    assert result.stderr_lines == ["vlmq: error: vlmq bench needs --shape, or both --baseline and --model-dir"], \
        describe(result)


def test_tile_sweep_candidates_are_compilable_and_unique(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU sweep's candidate space (benchmarks/sweep_w8a8_tiles.py), importable without CUDA:
    power-of-two blocks (Triton's and Gluon's block shapes need them), no config timed twice."""
    from vlmq.bench import REPO_ROOT

    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    import bench_w8a8_linear
    import sweep_w8a8_tiles

    def pow2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0

    for n, k, _ in bench_w8a8_linear.SHAPES.values():
        for m in (1, 2, 3, 16, 33, 64, 2048, 8192):
            configs = sweep_w8a8_tiles.candidates(m, n, k)
            assert configs and len(set(configs)) == len(configs), (m, n, k)
            if m >= 2048:  # pointer and persistent kernels both in the race
                assert {c.persistent for c in configs} == {False, True}
            else:  # decode: the kernels built for it (GEMV, swap-AB, TMA) take part
                assert any(c.gemv or c.swap_ab or c.tma for c in configs)
            for c in configs:
                assert all(pow2(b) for b in (c.block_m, c.block_n, c.block_k)), c
                assert c.split_k >= 1 and k // c.block_k >= c.split_k or c.gemv or c.tma, c
