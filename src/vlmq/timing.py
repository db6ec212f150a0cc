"""Wall-clock timing on CPU or GPU (a CUDA device is synchronized around every timed call)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, warmup: int = 1, iters: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_times(dec: Any, inputs: dict, new_tokens: int, device: torch.device, rounds: int) -> list[float]:
    """Seconds of the `new_tokens - 1` decode steps after a prefill, once per round (prefill not timed)."""
    times = []
    for _ in range(rounds):
        dec.prefill(**inputs)
        sync(device)
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            dec.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times
