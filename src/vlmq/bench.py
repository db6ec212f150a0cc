"""`vlmq bench`: linear-level and model-level speed and peak memory, bf16 vs W8A8, in one run.

Models: a bf16 snapshot + a W8A8 export (``--baseline`` / ``--model-dir``), or an architecture
shape with random weights (``--shape 3b|small|demo``): the bf16 model is built in memory, measured,
then its language-model linears are quantized in place (per-channel int8 weights, dynamic per-token
int8 activations: the compressed-tensors dynamic layout, without SmoothQuant, which changes no
shape or kernel) and measured again.

Loops: ``lean`` (default on CUDA) = `vlmq.runtime.decode.LeanDecoder` (static KV cache, CUDA-graph
decode step and prefill, fused norm/act/rope kernels; the same loop for both models); ``hf`` =
transformers ``generate``. Prefill = prompt to first token (vision tower included for image
prompts); decode tokens/s = batch x (new_tokens - 1) / time of the decode steps. Ratios are W8A8
over bf16 for speed (higher is better) and memory (lower is better). On CPU it is a smoke test.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmq.timing import decode_times, median_time

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    """A module from the repository's benchmarks/ folder (None when running from an install). The folder
    is on sys.path while it loads, as when the script runs, for the modules it shares (bench_timing)."""
    folder = REPO_ROOT / "benchmarks"
    path = folder / f"{name}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_vlmq_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path.remove(str(folder))
    return module


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


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------


@torch.no_grad()
def quantize_language_model(model: nn.Module, backend: str = "auto") -> list[str]:
    """Replace the decoder linears of the model's family (`Family.linears`, not lm_head) that are still
    nn.Linear by dynamic per-token W8A8Linear, in place. Returns their names."""
    from vlmq.models.families import family_for, quantized_linear_names
    from vlmq.runtime.linear import W8A8Linear

    family = family_for(model.config.model_type)
    names = quantized_linear_names(family, len(model.get_submodule(family.layers)))
    done = []
    for name in names:
        parent, _, child = name.rpartition(".")
        module = model.get_submodule(name)
        if type(module) is nn.Linear:
            setattr(model.get_submodule(parent), child, W8A8Linear.from_float(module, backend=backend))
            done.append(name)
    return done


def random_model(shape: str, device: torch.device):
    """(bf16 model, processor) of an architecture shape with random weights."""
    if shape == "demo":
        from vlmq.models.demo import build_demo_model, build_demo_processor

        return build_demo_model().to(device), build_demo_processor()
    snap = _load_script("make_random_snapshot")
    if snap is None:
        raise FileNotFoundError("--shape needs benchmarks/make_random_snapshot.py (run from the repository)")
    return snap.build(shape, device.type)


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------
# model-level measurement
# ---------------------------------------------------------------------------


@torch.no_grad()
def measure_hf(model, inputs: dict, batch: int, new_tokens: int, device: torch.device, iters: int) -> dict:
    def generate(n: int) -> None:
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    t_prefill = median_time(lambda: generate(1), device, iters=iters)
    t_full = median_time(lambda: generate(new_tokens), device, iters=iters)
    return {"prefill_ms": t_prefill * 1e3, "decode_tok_s": batch * (new_tokens - 1) / max(t_full - t_prefill, 1e-9)}


@torch.no_grad()
def measure_lean(model, inputs: dict, batch: int, new_tokens: int, device: torch.device, iters: int,
                 fused_ops: bool | None) -> dict:
    from vlmq.runtime.decode import LeanDecoder

    t = inputs["input_ids"].shape[1]
    max_len = (t + new_tokens + 63) // 64 * 64
    dec = LeanDecoder(model, batch, max_len, graph_prefill=device.type == "cuda", fused_ops=fused_ops)
    t_prefill = median_time(lambda: dec.prefill(**inputs), device, iters=iters)
    out: dict[str, Any] = {"prefill_ms": t_prefill * 1e3}
    if dec.graph_prefill:  # the language model alone (the part W8A8 changes), from its prefill graph
        out["lm_prefill_ms"] = median_time(dec.replay_lm_prefill, device, iters=max(iters, 10)) * 1e3
    if "pixel_values" in inputs:
        embed = inputs["input_ids"].to(device), inputs["pixel_values"], inputs["image_grid_thw"]
        out["vision_ms"] = median_time(lambda: dec.embed_inputs(*embed), device, iters=iters) * 1e3
    times = decode_times(dec, inputs, new_tokens, device, max(1, iters))
    out["decode_tok_s"] = batch * (new_tokens - 1) / max(statistics.median(times), 1e-9)
    out["tokens"] = dec.tokens[0, : min(new_tokens, 8)].tolist()
    out["graphs"] = dec.use_graphs
    out["fused_ops"] = dec.fused_ops
    if "pixel_values" in inputs:  # after the peak is read: transformers' tower is only a comparison
        if device.type == "cuda":
            out["peak_gib"] = peak_gib(device)
        out.update(vision_vs_transformers(dec, inputs, device, iters))
    return out


def vision_vs_transformers(dec: Any, inputs: dict, device: torch.device, iters: int) -> dict[str, float]:
    """transformers' own vision forward (one SDPA call per window) timed beside the decoder's, and the
    relative L2 difference of their merged image features."""
    args = inputs["pixel_values"], inputs["image_grid_thw"]
    lean = dec._image_features(*args).float()
    dec.lean_vision = False
    try:
        hf_ms = median_time(lambda: dec._image_features(*args), device, iters=iters) * 1e3
        hf = dec._image_features(*args).float()
    finally:
        dec.lean_vision = True
    return {"vision_hf_ms": hf_ms, "vision_lean_vs_hf_rel": float((lean - hf).norm() / hf.norm().clamp_min(1e-30))}


def measure_model(model, processor, loop: str, batches: list[int], new_tokens: int, prompt_tokens: int,
                  image_size: tuple[int, int], iters: int, fused_ops: bool | None = None) -> dict[str, Any]:
    device = next(model.parameters()).device
    out: dict[str, Any] = {}
    for kind in ("text", "image"):
        for batch in batches:
            inputs = {k: v.to(device) for k, v in make_inputs(processor, kind, batch, prompt_tokens,
                                                                image_size).items()}
            _reset_peak(device)  # per-case peak; the run's peak is the largest of them
            start_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
            if loop == "lean":
                r = measure_lean(model, inputs, batch, new_tokens, device, iters, fused_ops)
            else:
                r = measure_hf(model, inputs, batch, new_tokens, device, iters)
            if start_gib is not None:
                r.setdefault("peak_gib", peak_gib(device))
                r["start_gib"] = start_gib
            r = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
            out[f"{kind}_b{batch}"] = {"prompt_tokens": int(inputs["input_ids"].shape[1]), **r}
            gc.collect()
    return out


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def run_peak(section: dict) -> float | None:
    """Peak over a model's cases (each case resets the counter, so the largest is the run's peak)."""
    peaks = [v["peak_gib"] for v in section.values() if isinstance(v, dict) and v.get("peak_gib") is not None]
    return max(peaks) if peaks else None


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        # cuBLAS keeps a workspace per stream it ran on (graph captures use side streams); without
        # this, whatever ran earlier in the process (the other model, the linear table) counts here
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------
# linear-level table (CUDA)
# ---------------------------------------------------------------------------


def linear_table(cfg, ms: list[int], rep: int = 30) -> list[dict]:
    """bf16 cuBLAS vs W8A8 per LM linear shape of ``cfg`` (benchmarks/bench_w8a8_linear.py)."""
    lb = _load_script("bench_w8a8_linear")
    return lb.model_shape_table(cfg, ms, rep) if lb is not None else []


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


def run_bench(baseline: Path | None = None, w8a8: Path | None = None, shape: str | None = None,
              device: str = "auto", backend: str = "auto", loop: str | None = None, batches=(1, 8),
              new_tokens: int = 32, prompt_tokens: int = 256, image_size=(640, 480), iters: int = 3,
              linear_ms: list[int] | None = None, fused_ops: bool | None = None) -> dict:
    from vlmq.export.manifest import package_versions
    from vlmq.models.load import pick_device

    dev = torch.device(pick_device(device))
    loop = loop or ("lean" if dev.type == "cuda" else "hf")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "versions": package_versions(), "loop": loop, "backend": backend,
        "source": f"shape={shape}" if shape else {"baseline": str(baseline), "w8a8": str(w8a8)},
        "new_tokens": new_tokens, "prompt_tokens": prompt_tokens, "image_size": list(image_size),
        "batch_sizes": list(batches), "iters": iters,
    }
    args = (loop, list(batches), new_tokens, prompt_tokens, image_size, iters, fused_ops)
    if shape:
        torch.manual_seed(0)
        model, processor = random_model(shape, dev)
        _reset_peak(dev)  # inference peak: the fp32 -> bf16 random construction is not inference
        results["bf16"] = {"model": f"bf16 random {shape}", "weight_bytes": model_bytes(model),
                           **measure_model(model, processor, *args)}
        results["bf16"]["peak_gib"] = run_peak(results["bf16"])
        if linear_ms and dev.type == "cuda":
            results["linear"] = linear_table(model.config.get_text_config(), linear_ms)
        quantize_language_model(model, backend)
        _reset_peak(dev)
        results["w8a8"] = {"model": "W8A8 dynamic per-token (weights quantized in memory)",
                           "weight_bytes": model_bytes(model), **measure_model(model, processor, *args)}
        results["w8a8"]["peak_gib"] = run_peak(results["w8a8"])
        results["w8a8"]["resident_gib"] = round(torch.cuda.memory_allocated(dev) / 2**30, 3) \
            if dev.type == "cuda" else None
        del model
    else:
        from vlmq.runtime.generate import load_any

        for label, path in (("bf16", baseline), ("w8a8", w8a8)):
            _reset_peak(dev)
            model, processor, kind = load_any(path, dev.type, backend)
            if (label == "bf16") != (kind == "bf16"):
                from vlmq.runtime.loader import CheckpointError

                want = "a bf16 snapshot" if label == "bf16" else "a W8A8 export"
                raise CheckpointError(f"{path} is {kind}, but --{'baseline' if label == 'bf16' else 'model-dir'} "
                                      f"needs {want}")
            _reset_peak(dev)  # inference peak (loading may stage tensors)
            results[label] = {"model": kind, "path": str(path), "weight_bytes": model_bytes(model),
                              **measure_model(model, processor, *args)}
            results[label]["peak_gib"] = run_peak(results[label])
            if label == "bf16" and linear_ms and dev.type == "cuda":
                results["linear"] = linear_table(model.config.get_text_config(), linear_ms)
            del model
    ratios: dict[str, Any] = {}
    for key, value in results["w8a8"].items():
        if isinstance(value, dict):
            base = results["bf16"][key]
            ratios[key] = {"prefill_speedup": round(base["prefill_ms"] / value["prefill_ms"], 3),
                           "decode_speedup": round(value["decode_tok_s"] / base["decode_tok_s"], 3)}
            if value.get("lm_prefill_ms") and base.get("lm_prefill_ms"):
                ratios[key]["lm_prefill_speedup"] = round(base["lm_prefill_ms"] / value["lm_prefill_ms"], 3)
            if value.get("peak_gib"):
                ratios[key]["peak_memory_ratio"] = round(value["peak_gib"] / base["peak_gib"], 3)
    if results["bf16"]["peak_gib"]:
        ratios["peak_memory_ratio"] = round(results["w8a8"]["peak_gib"] / results["bf16"]["peak_gib"], 3)
    ratios["weight_bytes_ratio"] = round(results["w8a8"]["weight_bytes"] / results["bf16"]["weight_bytes"], 3)
    results["ratios"] = ratios
    return results


def print_table(results: dict) -> None:
    from rich.table import Table

    from vlmq.console import console

    if results.get("linear"):
        table = Table(title="linear (us, CUDA graph, rotating weights): bf16 vs W8A8")
        for col in ("shape", "M", "bf16", "w8a8 (+quant)", "x", "w8a8 prequant", "x"):
            table.add_column(col)
        for r in results["linear"]:
            table.add_row(f"{r['shape']} {r['N']}x{r['K']}", str(r["M"]), f"{r['bf16_us']:.1f}",
                          f"{r['w8a8_us']:.1f}", f"{r['speedup']:.2f}", f"{r['w8a8_prequant_us']:.1f}",
                          f"{r['speedup_prequant']:.2f}")
        console.print(table)
    table = Table(title=f"vlmq bench on {results['device']} (loop {results['loop']}, W8A8 backend "
                        f"{results['backend']})")
    for col in ("case", "prompt tok", "bf16 prefill ms", "w8a8 prefill ms", "prefill x", "LM prefill x",
                "bf16 tok/s", "w8a8 tok/s", "decode x", "vision ms (HF's)"):
        table.add_column(col)
    for key, r in results["ratios"].items():
        if not isinstance(r, dict):
            continue
        b, w = results["bf16"][key], results["w8a8"][key]
        lm = f"{r['lm_prefill_speedup']:.2f}" if "lm_prefill_speedup" in r else "-"
        table.add_row(key, str(b["prompt_tokens"]), f"{b['prefill_ms']:.1f}", f"{w['prefill_ms']:.1f}",
                      f"{r['prefill_speedup']:.2f}", lm, f"{b['decode_tok_s']:.1f}", f"{w['decode_tok_s']:.1f}",
                      f"{r['decode_speedup']:.2f}",
                      f"{w['vision_ms']:.1f} ({w['vision_hf_ms']:.1f})" if "vision_hf_ms" in w else "-")
    console.print(table)
    if results["bf16"]["peak_gib"] is None:   # peaks are CUDA allocator figures; a CPU run has none
        peak = "peak memory n/a (CPU)"
    else:
        peak = (f"peak memory bf16 {results['bf16']['peak_gib']} GiB, w8a8 {results['w8a8']['peak_gib']} GiB "
                f"(ratio {results['ratios'].get('peak_memory_ratio')})")
    console.print(f"{peak}; weights ratio {results['ratios']['weight_bytes_ratio']}")


def bench_arguments(p: argparse.ArgumentParser) -> None:
    from vlmq.runtime import backend_choices

    p.add_argument("--baseline", type=Path, help="the bf16 snapshot")
    p.add_argument("--model-dir", type=Path,
                   help="the W8A8 export: a format folder or the export root (its first format)")
    p.add_argument("--shape", choices=("3b", "small", "demo"),
                   help="random weights of this architecture instead of checkpoints")
    p.add_argument("--loop", choices=("lean", "hf"), help="decode loop (default: lean on CUDA, hf on CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=backend_choices())
    p.add_argument("--no-fused-ops", action="store_true", help="lean loop: eager torch norm/act/rope")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--linear-ms", default="1,8,64,2048,8192", help="linear table M values (CUDA); '' = skip")
    p.add_argument("--out", type=Path, help="write the results as JSON here")


def positive_ints(text: str, flag: str) -> list[int]:
    from vlmq.config import ConfigError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated positive integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ConfigError(f"{flag} takes comma-separated positive integers, got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> int:
    from vlmq.config import ConfigError

    if not args.shape and not (args.baseline and args.model_dir):
        raise ConfigError("vlmq bench needs --shape, or both --baseline and --model-dir")
    batches, linear_ms = positive_ints(args.batch_sizes, "--batch-sizes"), positive_ints(args.linear_ms, "--linear-ms")
    if not batches or args.new_tokens < 2 or args.iters < 1 or args.prompt_tokens < 1:
        raise ConfigError("vlmq bench needs --batch-sizes, --new-tokens >= 2, --iters >= 1, --prompt-tokens >= 1")
    if args.out is not None and args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a directory; give a file path for the JSON")
    results = run_bench(args.baseline, args.model_dir, args.shape, args.device, args.backend, args.loop, batches,
                        args.new_tokens, args.prompt_tokens, iters=args.iters, linear_ms=linear_ms,
                        fused_ops=False if args.no_fused_ops else None)
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0
