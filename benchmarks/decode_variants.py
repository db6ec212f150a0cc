"""On the GPU: decode tokens/s of the lean loop (3B shape, random weights) under kernel choices
that can't be judged from a linear-level table: the Hopper TMA kernel as pick_config uses it
(qkv/o_proj at M = 2-64, the dp4a GEMV at M = 1), the same with it also at M = 1, and without it
(the pointer kernel's decode tiles). bf16 once for reference; each variant
twice (median of 5 timed runs each).

    PYTHONPATH=src python benchmarks/decode_variants.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_random_snapshot import build  # noqa: E402

from vlmq.bench import make_inputs, quantize_language_model  # noqa: E402
from vlmq.runtime.decode import LeanDecoder  # noqa: E402
from vlmq.runtime.kernels import tiles  # noqa: E402

# name: (TMA kernel on, its smallest M)
VARIANTS = {"tma (pick_config)": (True, tiles.TMA_MIN_M), "tma from M = 1": (True, 1), "no tma": (False, 1)}


def tok_s(model, inputs: dict, batch: int, new_tokens: int = 64, iters: int = 5) -> float:
    dec = LeanDecoder(model, batch, inputs["input_ids"].shape[1] + new_tokens + 64)
    times = []
    for _ in range(iters):
        dec.prefill(**inputs)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            dec.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch * (new_tokens - 1) / statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    model, processor = build("3b", "cuda")
    inputs = {b: {k: v.cuda() for k, v in make_inputs(processor, "text", b, 512, (448, 336)).items()} for b in (1, 8)}
    tma_supported = tiles.tma_supported
    with torch.no_grad():
        for b in (1, 8):
            print(f"bf16 batch {b}: tok/s", [round(tok_s(model, inputs[b], b), 1) for _ in range(2)], flush=True)
        quantize_language_model(model, backend="triton")
        for name, (tma_on, min_m) in VARIANTS.items():
            tiles.tma_supported = tma_supported if tma_on else (lambda: False)
            tiles.TMA_MIN_M = min_m
            tiles._pick_config.cache_clear()  # TMA_MIN_M is read inside
            for b in (1, 8):
                runs = [round(tok_s(model, inputs[b], b), 1) for _ in range(2)]
                print(f"w8a8 {name} batch {b}: tok/s {runs}", flush=True)


if __name__ == "__main__":
    main()
