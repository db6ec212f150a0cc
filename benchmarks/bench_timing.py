"""The timing harness the GPU benchmarks share (bench_w8a8_linear.py, sweep_w8a8_tiles.py,
bench_read_floor.py, bench_o_proj_input.py): rotating input/weight sets sized past L2, CUDA-graph and
eager timing through triton's do_bench, and compiling kernel configs ahead in worker processes."""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch
from triton.testing import do_bench

from vlmq.runtime.kernels.triton_w8a8 import w8a8_linear

L2_BYTES_TARGET = 150e6  # rotate until the weights alone are ~3x the 50 MB L2


def n_rot(m: int, n: int, k: int) -> int:
    return int(min(256, max(2, math.ceil(L2_BYTES_TARGET / (n * k + 2 * m * k)))))


def make_sets(m: int, n: int, k: int, bias: bool, r: int, seed: int = 0) -> dict[str, list]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    sets: dict[str, list] = {"x": [], "w_bf16": [], "w_q": [], "w_s": [], "b": []}
    for _ in range(r):
        sets["x"].append(torch.randn(m, k, generator=g, device=dev).to(torch.bfloat16))
        sets["w_bf16"].append((torch.randn(n, k, generator=g, device=dev) * 0.02).to(torch.bfloat16))
        sets["w_q"].append(torch.randint(-128, 128, (n, k), generator=g, device=dev, dtype=torch.int8))
        sets["w_s"].append(torch.rand(n, generator=g, device=dev) * 1e-3 + 1e-4)
        sets["b"].append(torch.randn(n, generator=g, device=dev).to(torch.bfloat16) if bias else None)
    return sets


@functools.lru_cache(maxsize=1)
def _capture_stream() -> torch.cuda.Stream:
    return torch.cuda.Stream()  # one for all captures: cuBLAS keeps a workspace per stream


def time_graph(fn: Callable[[int], Any], r: int, rep: int = 40) -> float:
    """Median microseconds per call of fn(i), i over r rotating sets, replayed from a graph."""
    for i in range(r):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = _capture_stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        for i in range(r):
            fn(i)
    torch.cuda.synchronize()
    ms = do_bench(graph.replay, warmup=5, rep=rep, return_mode="median")
    del graph
    return ms * 1e3 / r


def time_eager(fn: Callable[[int], Any], r: int, rep: int = 40) -> float:
    def loop() -> None:
        for i in range(r):
            fn(i)

    return do_bench(loop, warmup=5, rep=rep, return_mode="median") * 1e3 / r


# -- compile ahead (for the table and the sweep) ------------------------------------


def _warm_items(items: list[tuple]) -> int:
    """Worker: compile (into Triton's disk cache) every (m, n, k, bias, cfg) once."""
    done = 0
    for m, n, k, bias, cfg in items:
        try:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            wq = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
            ws = torch.rand(n, device="cuda")
            b = torch.randn(n, device="cuda").to(torch.bfloat16) if bias else None
            w8a8_linear(x, wq, ws, b, config=cfg)
            done += 1
        except Exception as e:  # noqa: BLE001 - reported, the sweep skips this config
            print(f"compile failed {cfg}: {e!r}"[:300], file=sys.stderr)
    torch.cuda.synchronize()
    return done


def precompile(items: list[tuple], jobs: int) -> None:
    # One representative per compile key: M==1 and K divisibility change specialization.
    keyed = {
        (m == 1, k, bias, dataclasses.replace(cfg, split_k=min(cfg.split_k, 2))): (m, min(n, 2048), k, bias, cfg)
        for m, n, k, bias, cfg in items
    }
    work = list(keyed.values())
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx) as ex:
        n_ok = sum(ex.map(_warm_items, [work[i::jobs] for i in range(jobs)]))
    print(f"precompiled {n_ok}/{len(work)} variants in {time.time() - t0:.0f}s", flush=True)
