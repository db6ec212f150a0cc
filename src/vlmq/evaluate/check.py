"""`vlmq check`: the bf16 baseline and the W8A8 checkpoint on the same inputs; metrics, gates, report.

Inputs: the infer preset's text-only prompts, its image+text prompts (on held-out COCO images), and
held-out COCO captions the calibration never used. Held-out = images outside the calibration
selection, recomputed from the export manifest (root, splits, num_samples, seed) with the same loader.
Exit codes: 0 pass (or no gates), 1 checkpoint rejected (verify failed) or a gate failed, 2 user error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmq.config import Config, ConfigError
from vlmq.evaluate.layers import LayerProbe, layer_table, smoothing_transform
from vlmq.evaluate.metrics import (
    aggregate_fidelity,
    generation_agreement,
    sequence_nll,
    token_kl,
    top1_agreement,
)

log = logging.getLogger(__name__)
EXIT_GATE_FAILED = 1
# flag -> (metric in results["metrics"], comparison that passes)
GATES = {"max_kl": ("kl_mean", "<="), "min_top1": ("top1", ">="), "max_nll_delta": ("nll_delta", "<="),
         "min_sqnr": ("sqnr_db_min", ">="), "min_recovery": ("recovery_min", ">="),
         "harness_runs": ("harness_failed_runs", "<=")}


class CheckError(ConfigError):
    """A `vlmq check` invocation that cannot run (one line, exit code 2)."""


@dataclass
class Case:
    id: str
    kind: str                 # text | image | caption
    prompt: str
    image: Path | None = None
    reference: str | None = None   # the held-out caption (kind == caption)
    held_out: bool | None = None   # whether the image is outside the calibration selection


@dataclass
class Models:
    baseline: Path
    w8a8: Path
    export_root: Path | None
    manifest: dict[str, Any]
    demo: bool


# ---------------------------------------------------------------- resolution (cheap, before loading)

def resolve_models(cfg: Config, run_dir: Path, model_dir: Path | None, baseline: Path | None) -> Models:
    from vlmq.models.demo import is_demo_snapshot, write_demo_snapshot
    from vlmq.run_context import resolve_inputs
    from vlmq.runtime.generate import checkpoint_dir

    ctx = resolve_inputs(cfg, run_dir)
    if model_dir is None:
        if cfg.arch.quantized:
            model_dir = cfg.resolve_path(cfg.arch.snapshot)
            if not model_dir.exists():
                raise CheckError(f"no W8A8 checkpoint at {model_dir} (arch {cfg.arch.name}): run `vlmq quantize` "
                                 "first (or pass --model-dir)")
        else:
            found = [ctx.export_dir / f for f in cfg.export.formats if (ctx.export_dir / f / "config.json").is_file()]
            if not found:
                raise CheckError(f"no W8A8 checkpoint in {ctx.export_dir}: run `vlmq quantize` first "
                                 "(or pass --model-dir)")
            model_dir = found[0]
    model_dir, note = checkpoint_dir(Path(model_dir).absolute())   # an export root: its export.formats[0]
    if note:
        log.info("%s", note)
        print(f"vlmq: info: {note}", file=sys.stderr)
    root = next((p for p in (model_dir, model_dir.parent) if (p / "manifest.json").is_file()), None)
    manifest = json.loads((root / "manifest.json").read_text()) if root else {}
    if baseline is None:
        recorded = Path(manifest.get("snapshot") or "/nonexistent")
        if (recorded / "config.json").is_file():
            baseline = recorded
        elif ctx.demo or manifest.get("demo"):
            baseline = write_demo_snapshot(run_dir / "demo_snapshot")  # deterministic: same bytes as quantize's
        elif not cfg.arch.quantized:
            baseline = ctx.snapshot_dir
        else:
            raise CheckError("no bf16 baseline found: pass --baseline <snapshot dir>")
    baseline = Path(baseline).absolute()
    if not (baseline / "config.json").is_file():
        raise CheckError(f"baseline snapshot not found: {baseline} (pass --baseline or run `vlmq fetch-model`)")
    if json.loads((baseline / "config.json").read_text()).get("quantization_config"):
        raise CheckError(f"--baseline {baseline} is a quantized checkpoint; it must be the bf16 snapshot")
    return Models(baseline, model_dir, root, manifest, is_demo_snapshot(baseline))


def calibration_selection(cfg: Config, manifest: dict[str, Any], demo: bool) -> dict[str, Any]:
    """How the calibration picked its samples: from the export manifest, else from the config."""
    from vlmq.calib import demo_coco_root

    calib = dict(manifest.get("config", {}).get("calib") or cfg.to_dict()["calib"])
    root = (manifest.get("calibration") or {}).get("root")
    if root is None:
        root = str(demo_coco_root() if demo and not cfg.overridden("calib.root") else cfg.resolve_path(cfg.calib.root))
    return {"source": calib["source"], "root": root, "splits": list(calib["splits"]),
            "num_samples": int(calib["num_samples"]), "seed": int(calib["seed"]), "instruction": calib["instruction"]}


def select_heldout(sel: dict[str, Any], n: int) -> tuple[list, list, dict[str, Any]]:
    """(held-out samples, calibration samples, info). Held-out = the next `n` images in the loader's seeded
    order that are not in the calibration selection (a set difference, so disjoint by construction)."""
    from vlmq.calib import CalibDataError, load_coco_captions
    from vlmq.calib.jsonl import load_jsonl
    from vlmq.calib.sources import load_text_jsonl

    info = {**sel, "requested": n, "held_out": 0, "calibration_samples": 0, "note": ""}
    loaders = {
        "coco2017": lambda k: load_coco_captions(Path(sel["root"]), sel["splits"], k, sel["seed"], sel["instruction"]),
        "jsonl": lambda k: load_jsonl(Path(sel["root"]), None, k, sel["seed"], sel["instruction"]),
        "text_jsonl": lambda k: load_text_jsonl(Path(sel["root"]), k, sel["seed"], sel["instruction"], 1),
    }
    if sel["source"] not in loaders:
        info["note"] = f"calibration source {sel['source']}: no held-out samples"
        return [], [], info
    try:
        calib, _ = loaders[sel["source"]](sel["num_samples"])
        pool, _ = loaders[sel["source"]](sel["num_samples"] + max(n, 1))
    except CalibDataError as err:
        info["note"] = f"no held-out samples: {err}"
        return [], [], info
    # Disjoint by construction: a set difference on what identifies a sample (its image, else its record).
    used = {s.image or s.source for s in calib}
    held = [s for s in pool if (s.image or s.source) not in used][:n]
    info.update(held_out=len(held), calibration_samples=len(calib),
                prefix_stable=[s.source for s in pool[: len(calib)]] == [s.source for s in calib])
    if len(held) < n:
        info["note"] = (f"only {len(held)} of {n} held-out samples: the calibration used {len(calib)} of the "
                        f"samples in {sel['root']}" + ("; image prompts reuse calibration images" if not held else ""))
    return held, calib, info


def build_cases(cfg: Config, held: list, calib: list) -> list[Case]:
    cases = [Case(f"text-{i}", "text", p) for i, p in enumerate(cfg.infer.text_prompts)]
    pictures = [(s.image, True) for s in held if s.image] or [(s.image, False) for s in calib if s.image]
    if cfg.infer.image_prompts and not pictures:
        log.warning("no COCO images available: image prompts skipped")
    for i, prompt in enumerate(cfg.infer.image_prompts if pictures else []):
        image, is_held = pictures[i % len(pictures)]
        cases.append(Case(f"image-{i}", "image", prompt, image, held_out=is_held))
    for i, s in enumerate(held):
        if s.answer:    # a held-out chat with a reference answer (COCO caption, jsonl prompt/answer)
            cases.append(Case(f"caption-{i}", "caption", s.prompt, s.image, s.answer, True))
        else:           # a held-out text passage: scored on every token of its rendered chat
            cases.append(Case(f"passage-{i}", "passage", s.prompt, None, None, True))
    return cases


# ---------------------------------------------------------------- scoring

def _move(inputs: dict, model: nn.Module) -> dict:
    dev = next(model.parameters()).device
    return {k: v.to(dev) if torch.is_tensor(v) else v for k, v in inputs.items()}


def teacher_inputs(processor, case: Case, image, gen_tokens: list[int]) -> tuple[dict, int]:
    """(inputs of the scored sequence, index of its first target token): caption = the held-out chat with
    its reference answer; prompt = the prompt followed by the baseline's greedy continuation."""
    from vlmq.runtime.generate import chat_inputs

    if case.kind == "passage":   # the passage as calibration renders it; every next token is a target
        from vlmq.models.chat import chat, render

        return dict(processor(text=[render(processor, chat(processor, case.prompt))], return_tensors="pt")), 0
    prompt = chat_inputs(processor, case.prompt, image)
    start = prompt["input_ids"].shape[1]
    if case.kind == "caption":
        from vlmq.models.chat import chat, is_text_only, render

        text = render(processor, chat(processor, case.prompt, case.reference, image is not None)).rstrip("\n")
        images = {} if is_text_only(processor) else {"images": [image] if image is not None else None}
        full = dict(processor(text=[text], return_tensors="pt", **images))
        if not torch.equal(full["input_ids"][0, :start], prompt["input_ids"][0]):
            raise RuntimeError(f"{case.id}: the chat with the answer does not extend the prompt's tokens")
        return full, start
    extra = torch.tensor([gen_tokens], dtype=prompt["input_ids"].dtype)
    for key, value in list(prompt.items()):   # per-token tensors: attention_mask, mm_token_type_ids (text = 0)
        if key != "input_ids" and torch.is_tensor(value) and value.shape == (1, start):
            fill = torch.ones_like(extra) if key == "attention_mask" else torch.zeros_like(extra)
            prompt[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    prompt["input_ids"] = torch.cat([prompt["input_ids"], extra], dim=1)
    return prompt, start


@torch.no_grad()
def score_case(ref: nn.Module, test: nn.Module, processor, case: Case, max_new_tokens: int,
               probe: LayerProbe | None = None) -> dict[str, Any]:
    from vlmq.calib import load_rgb
    from vlmq.runtime.generate import generate_text

    image = load_rgb(case.image, case.image.parent) if case.image is not None else None
    ref_text, ref_tokens = generate_text(ref, processor, case.prompt, image, max_new_tokens)
    test_text, test_tokens = generate_text(test, processor, case.prompt, image, max_new_tokens)
    inputs, start = teacher_inputs(processor, case, image, ref_tokens)
    if probe is not None:
        with probe:
            ref_logits = ref(**_move(inputs, ref), use_cache=False).logits.float().cpu()
    else:
        ref_logits = ref(**_move(inputs, ref), use_cache=False).logits.float().cpu()
    test_logits = test(**_move(inputs, test), use_cache=False).logits.float().cpu()
    ids = inputs["input_ids"]
    mask = ids != getattr(processor, "image_token_id", -1)   # next-token positions outside the image pads
    kl = token_kl(ref_logits, test_logits, mask).clamp_min(0)  # KL >= 0; negatives are float rounding
    metrics: dict[str, Any] = {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "tokens": int(mask.sum()),
                               "top1": top1_agreement(ref_logits, test_logits, mask),
                               **generation_agreement(ref_tokens, test_tokens)}
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[:, start:] = True
    if case.kind in ("caption", "passage") and ids.shape[1] - start > 1:
        metrics.update(nll_baseline=sequence_nll(ref_logits, ids, target),
                       nll_w8a8=sequence_nll(test_logits, ids, target), nll_tokens=int(ids.shape[1] - start))
    return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(case).items()},
            "baseline": {"text": ref_text, "tokens": ref_tokens}, "w8a8": {"text": test_text, "tokens": test_tokens},
            "metrics": metrics}


def apply_gates(metrics: dict[str, Any], thresholds: dict[str, float | None]) -> tuple[list[dict], str]:
    """Each set threshold -> a gate; a metric that could not be computed fails its gate."""
    gates = []
    for flag, limit in thresholds.items():
        if limit is None:
            continue
        key, op = GATES[flag]
        value = metrics.get(key)
        passed = value is not None and (value <= limit if op == "<=" else value >= limit)
        gates.append({"name": flag, "metric": key, "op": op, "threshold": limit, "value": value, "passed": passed})
    verdict = "ungated" if not gates else ("pass" if all(g["passed"] for g in gates) else "fail")
    return gates, verdict


# ---------------------------------------------------------------- the command

def run_check(cfg: Config, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from vlmq.console import library_chatter_to_log
    from vlmq.evaluate import harness
    from vlmq.export.manifest import package_versions
    from vlmq.models.families import quantized_linear_names
    from vlmq.runtime.generate import load_any
    from vlmq.runtime.loader import load_w8a8
    from vlmq.verify import verify_export

    timings: dict[str, float] = {}
    started = time.perf_counter()
    models = resolve_models(cfg, run_dir, args.model_dir, args.baseline)
    harness_runs = harness.prepare({"lm_eval": args.lm_eval_tasks, "lmms_eval": args.lmms_tasks}, models.w8a8)
    problems, summary, warnings = verify_export(models.w8a8)
    if problems:
        raise CheckRejected(f"{models.w8a8} failed `vlmq verify`: {problems[0]}")
    for warning in warnings:   # the export's other format is damaged; the one checked here is intact
        log.warning("%s", warning)
        print(f"vlmq: warning: {warning}", file=sys.stderr)
    sel = calibration_selection(cfg, models.manifest, models.demo)
    held, calib, held_info = select_heldout(sel, cfg.infer.heldout_samples)
    cases = build_cases(cfg, held, calib)
    timings["prepare"] = round(time.perf_counter() - started, 3)

    t = time.perf_counter()
    with library_chatter_to_log():
        ref, processor, ref_kind = load_any(models.baseline, cfg.device, args.backend)
        test, _, info = load_w8a8(models.w8a8, cfg.device, backend=args.backend)
    if ref_kind != "bf16":
        raise CheckError(f"baseline {models.baseline} did not load as a bf16 snapshot ({ref_kind})")
    timings["load"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    text_cfg = info.config.get("text_config", info.config)
    names = [n for n in quantized_linear_names(info.family, text_cfg["num_hidden_layers"]) if n in info.quantized]
    cols, rows = smoothing_transform(ref, test, names, info.format, info.family)
    mods = dict(test.named_modules())
    if info.format == "modelopt_hf":
        factors = {n: mods[n].pre_quant_scale for n in names if mods[n].pre_quant_scale is not None}
        source = "pre_quant_scale"
    else:
        factors, source = cols, "derived from the folded weights (int8-rounding accurate)"
    probe = LayerProbe(ref, test, names, cols, rows)
    samples = []
    with library_chatter_to_log():
        for case in cases:
            samples.append(score_case(ref, test, processor, case, cfg.infer.max_new_tokens, probe))
            log.info("%s: %s", case.id, samples[-1]["metrics"])
    layers = layer_table(probe, factors, source)
    metrics = aggregate_fidelity(samples, layers)
    timings["score"] = round(time.perf_counter() - t, 3)
    device = str(next(test.parameters()).device)
    del ref, test, probe

    thresholds = {"max_kl": args.max_kl, "min_top1": args.min_top1, "max_nll_delta": args.max_nll_delta,
                  "min_sqnr": args.min_sqnr, "min_recovery": args.min_recovery}
    t = time.perf_counter()
    evals = harness.run_all(harness_runs, models.baseline, models.w8a8, run_dir, cfg.device,
                            {"lm_eval": args.lm_eval_limit, "lmms_eval": args.lmms_limit})
    if harness_runs:   # a requested harness run that failed fails the check, like a gate
        timings["harnesses"] = round(time.perf_counter() - t, 3)
        done = [r for r in evals.values() if r]
        metrics["recovery_min"] = harness.recovery_min(done)
        metrics["harness_failed_runs"] = sum(len(r["errors"]) for r in done)
        thresholds["harness_runs"] = 0
    gates, verdict = apply_gates(metrics, thresholds)
    return {
        "schema_version": 1, "tool": "vlmq check", "label": args.label or run_dir.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command_line": " ".join(sys.argv),
        "demo": models.demo, "device": device,
        "baseline": {"path": str(models.baseline), "kind": ref_kind},
        "model": {"path": str(models.w8a8), "format": info.format, "activations": info.activations,
                  "quantized_linears": len(info.quantized), "verify": summary},
        "versions": package_versions(), "config": cfg.to_dict(), "heldout": held_info,
        "samples": samples, "metrics": metrics, "layers": layers, "gates": gates, "verdict": verdict,
        "lm_eval": evals["lm_eval"], "lmms_eval": evals["lmms_eval"],
        "manifest": {k: v for k, v in models.manifest.items() if k != "files"},
        "timings_s": timings, "run_dir": str(run_dir),
    }


class CheckRejected(Exception):
    """The checkpoint failed `vlmq verify`: exit code 1, no metrics."""


def check_arguments(p: argparse.ArgumentParser) -> None:
    from vlmq.runtime import backend_choices

    p.add_argument("--model-dir", type=Path,
                   help="the W8A8 checkpoint: a format folder or the export root (default: the export of this config)")
    p.add_argument("--baseline", type=Path, help="the bf16 snapshot (default: the one the export was made from)")
    p.add_argument("--label", help="names the run in the report (baseline / w8a8 / anything)")
    p.add_argument("--max-kl", type=float, help="gate: mean per-token KL(bf16 || W8A8) in nats must be <= X")
    p.add_argument("--min-top1", type=float, help="gate: top-1 agreement must be >= Y")
    p.add_argument("--max-nll-delta", type=float, help="gate: held-out caption NLL delta (W8A8 - bf16) <= Z")
    p.add_argument("--min-sqnr", type=float, help="gate: the worst layer's output SQNR in dB must be >= S")
    p.add_argument("--lm-eval-tasks", help="run lm-eval on both checkpoints (vLLM), e.g. vlmq_text_mc,vlmq_text_ppl")
    p.add_argument("--lm-eval-limit", type=int, help="lm-eval --limit (examples per task)")
    p.add_argument("--lmms-tasks", help="run lmms-eval on both checkpoints (vLLM), e.g. vlmq_demo_caption,mmmu_val")
    p.add_argument("--lmms-limit", type=int, help="lmms-eval --limit (examples per task)")
    p.add_argument("--min-recovery", type=float,
                   help="gate: every harness task's first metric, W8A8/bf16 (bf16/W8A8 if lower is better), >= X")
    p.add_argument("--backend", default="auto", choices=backend_choices(), help="W8A8 GEMM backend")


def cmd_check(args: argparse.Namespace) -> int:
    from vlmq.config import load_config
    from vlmq.console import console, make_run_dir, setup_logging
    from vlmq.evaluate.report import check_summary, write_outputs

    for flag in ("max_kl", "min_top1", "max_nll_delta", "min_recovery"):
        value = getattr(args, flag)
        if value is not None and (value != value or value < 0):
            raise CheckError(f"--{flag.replace('_', '-')} must be a number >= 0, got {value}")
    for flag in ("lm_eval_limit", "lmms_limit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CheckError(f"--{flag.replace('_', '-')} must be an integer >= 1, got {value}")
    if args.min_recovery is not None and not (args.lm_eval_tasks or args.lmms_tasks):
        raise CheckError("--min-recovery gates harness scores: add --lm-eval-tasks and/or --lmms-tasks")
    cfg = load_config(list(args.overrides))
    run_dir = make_run_dir(cfg.log_root, cfg.run_name)
    args.log_file = setup_logging(run_dir, "check.log")
    try:
        results = run_check(cfg, run_dir, args)
    except CheckRejected as err:
        print(f"vlmq: check: REJECTED {err}", file=sys.stderr)
        return EXIT_GATE_FAILED
    paths = write_outputs(results, run_dir)
    console.print(check_summary(results))
    failed = [g for g in results["gates"] if not g["passed"]]
    for g in failed:
        print(f"vlmq: check: gate {g['name']} failed: {g['metric']}={g['value']} (needs {g['op']} {g['threshold']})",
              file=sys.stderr)
    for run in (r for r in (results["lm_eval"], results["lmms_eval"]) if r):
        for label, error in run["errors"].items():
            print(f"vlmq: check: {run['harness']} run on {label} failed: {error}", file=sys.stderr)
    print(f"{results['verdict'].upper()} {paths['report']}")
    return EXIT_GATE_FAILED if failed else 0
