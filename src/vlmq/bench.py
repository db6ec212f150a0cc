"""`vlmq bench`: prefill latency, decode tokens/s and peak memory, bf16 vs W8A8, in one run.

Both models see the same inputs and the same generation loop; ratios are W8A8 over bf16 for
speed (higher is better) and for memory (lower is better). On CPU it is a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmq.cli import register_command


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


def make_inputs(processor, kind: str, batch: int, prompt_tokens: int, image_size: tuple[int, int]) -> dict:
    """Deterministic inputs: `text` = a prompt of about prompt_tokens tokens; `image` = one drawn image + text."""
    from PIL import Image, ImageDraw

    words = ("the quick brown fox jumps over the lazy dog while eight bit integers keep the model small "
             "and fast on tensor cores ").split()
    text = " ".join(words[i % len(words)] for i in range(prompt_tokens))
    content: list[dict] = [{"type": "text", "text": text if kind == "text" else "Describe this image in detail."}]
    images = None
    if kind == "image":
        image = Image.new("RGB", image_size, (120, 170, 220))
        draw = ImageDraw.Draw(image)
        draw.ellipse((40, 40, image_size[0] // 2, image_size[1] // 2), fill=(220, 60, 40))
        content.insert(0, {"type": "image"})
        images = [image] * batch
    chat = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    ids = processor.tokenizer(text if kind == "text" else "", add_special_tokens=False)["input_ids"]
    if kind == "text":
        chat = processor.tokenizer.decode(ids[:prompt_tokens])
    return dict(processor(text=[chat] * batch, images=images, padding=True, return_tensors="pt"))


@torch.no_grad()
def measure_model(model, processor, batches: list[int], new_tokens: int, prompt_tokens: int,
                  image_size: tuple[int, int], iters: int) -> dict[str, Any]:
    device = next(model.parameters()).device
    out: dict[str, Any] = {}
    for kind in ("text", "image"):
        for batch in batches:
            inputs = {k: v.to(device) for k, v in make_inputs(processor, kind, batch, prompt_tokens,
                                                                image_size).items()}

            def generate(n: int, inputs: dict = inputs) -> None:
                model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

            t_prefill = median_time(lambda: generate(1), device, iters=iters)
            t_full = median_time(lambda: generate(new_tokens), device, iters=iters)
            decode_s = max(t_full - t_prefill, 1e-9)
            out[f"{kind}_b{batch}"] = {
                "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "prefill_ms": round(t_prefill * 1e3, 3),
                "decode_tok_s": round(batch * (new_tokens - 1) / decode_s, 2),
            }
    return out


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def run_bench(baseline: Path, w8a8: Path, device: str = "auto", backend: str = "auto", batches=(1, 8),
              new_tokens: int = 32, prompt_tokens: int = 256, image_size=(640, 480), iters: int = 3) -> dict:
    from vlmq.commands import load_any
    from vlmq.export.manifest import package_versions
    from vlmq.models.load import pick_device

    dev = torch.device(pick_device(device))
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                               "versions": package_versions(), "new_tokens": new_tokens,
                               "prompt_tokens": prompt_tokens, "image_size": list(image_size), "backend": backend}
    for label, path in (("bf16", baseline), ("w8a8", w8a8)):
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        model, processor, kind = load_any(path, dev.type, backend)
        weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        results[label] = {"model": kind, "path": str(path), "weight_bytes": weights,
                          **measure_model(model, processor, list(batches), new_tokens, prompt_tokens,
                                          image_size, iters)}
        results[label]["peak_gib"] = peak_gib(dev)
        del model
    ratios = {}
    for key, value in results["w8a8"].items():
        if isinstance(value, dict):
            base = results["bf16"][key]
            ratios[key] = {"prefill_speedup": round(base["prefill_ms"] / value["prefill_ms"], 3),
                           "decode_speedup": round(value["decode_tok_s"] / base["decode_tok_s"], 3)}
    if results["bf16"]["peak_gib"]:
        ratios["peak_memory_ratio"] = round(results["w8a8"]["peak_gib"] / results["bf16"]["peak_gib"], 3)
    ratios["weight_bytes_ratio"] = round(results["w8a8"]["weight_bytes"] / results["bf16"]["weight_bytes"], 3)
    results["ratios"] = ratios
    return results


def print_table(results: dict) -> None:
    from rich.table import Table

    from vlmq.console import console

    table = Table(title=f"vlmq bench on {results['device']} (W8A8 backend {results['backend']})")
    for col in ("case", "prompt tok", "bf16 prefill ms", "w8a8 prefill ms", "prefill x",
                "bf16 tok/s", "w8a8 tok/s", "decode x"):
        table.add_column(col)
    for key, r in results["ratios"].items():
        if not isinstance(r, dict):
            continue
        b, w = results["bf16"][key], results["w8a8"][key]
        table.add_row(key, str(b["prompt_tokens"]), f"{b['prefill_ms']:.1f}", f"{w['prefill_ms']:.1f}",
                      f"{r['prefill_speedup']:.2f}", f"{b['decode_tok_s']:.1f}", f"{w['decode_tok_s']:.1f}",
                      f"{r['decode_speedup']:.2f}")
    console.print(table)
    console.print(f"peak memory bf16 {results['bf16']['peak_gib']} GiB, w8a8 {results['w8a8']['peak_gib']} GiB; "
                  f"weights ratio {results['ratios']['weight_bytes_ratio']}")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", type=Path, required=True, help="the bf16 snapshot")
    p.add_argument("--model-dir", type=Path, required=True, help="the W8A8 export (either format)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the results as JSON here")


@register_command("bench", "prefill/decode speed and peak memory, bf16 vs W8A8, same run")
def cmd_bench(args: argparse.Namespace) -> int:
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    results = run_bench(args.baseline, args.model_dir, args.device, args.backend, batches, args.new_tokens,
                        args.prompt_tokens, iters=args.iters)
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


cmd_bench.add_arguments = _bench_args  # type: ignore[attr-defined]
