"""On the GPU: decode tokens/s of the lean loop (3B shape, random weights) under kernel variants
that can't be judged from a linear-level table: where the W8A8 GEMMs let their successor launch
(programmatic dependent launch: 0 at exit, 1 at entry, 2 after the main loop), and the decode
GEMV on or off. bf16 once for reference; each variant twice (median of 5 timed runs each).

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
from vlmq.runtime.kernels import triton_w8a8 as tk  # noqa: E402

# (tensor-core GEMM trigger, GEMV trigger, GEMV on)
VARIANTS = [(2, 2, True), (1, 1, True), (2, 1, True), (1, 2, True), (2, 2, False), (1, 1, False)]


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
    gemv_tile = tiles._gemv_tile
    with torch.no_grad():
        for b in (1, 8):
            print(f"bf16 batch {b}: tok/s", [round(tok_s(model, inputs[b], b), 1) for _ in range(2)], flush=True)
        quantize_language_model(model, backend="triton")
        for gemm_trigger, gemv_trigger, gemv in VARIANTS:
            tk.GEMM_TRIGGER, tk.GEMV_TRIGGER = gemm_trigger, gemv_trigger
            tiles._gemv_tile = gemv_tile if gemv else (lambda m, n, k: None)  # off: the tensor-core decode tiles
            tiles.pick_config.cache_clear()
            for b in (1, 8):
                runs = [round(tok_s(model, inputs[b], b), 1) for _ in range(2)]
                print(f"w8a8 GEMM trigger {gemm_trigger} GEMV trigger {gemv_trigger} GEMV {'on' if gemv else 'off'}"
                      f" batch {b}: tok/s {runs}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
