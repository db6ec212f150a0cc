"""Peer benchmark: quantize the same real model on the same calibration texts as vlmq, with
llm-compressor 0.14.0.1, and export compressed-tensors W8A8 checkpoints to compare against vlmq's.

Recipes (both W8A8: int8 per-channel symmetric weights, int8 dynamic per-token activations,
targets Linear, lm_head ignored; SmoothQuant with llm-compressor's default Llama mappings):
    llmc_sq_gptq   SmoothQuantModifier(smoothing_strength=0.8) + GPTQModifier(scheme="W8A8")
    llmc_sq_rtn    SmoothQuantModifier(smoothing_strength=0.8) + QuantizationModifier(scheme="W8A8")

Calibration data: exactly vlmq's selection. The script first runs itself under the project venv
(`.venv/bin/python ... --dump-calib`), which picks the samples with vlmq's own
`vlmq.calib.jsonl.load_jsonl(path, None, N, seed)` and renders each as vlmq does (tokenizer chat
template, messages=[{"role": "user", "content": text}], no assistant turn, no generation prompt,
at most --max-length tokens), and writes the texts and their token ids to a JSON file. The
llm-compressor side then calibrates on those token ids (one sample per batch, no padding).

Each recipe runs in its own child process (clean llm-compressor session, independent timing).
The wall time recorded is load + calibrate/quantize (oneshot) + save, excluding Python imports;
the child's whole wall time including imports is recorded too.

    bash benchmarks/setup_llmcompressor.sh          # builds .venv-llmc once
    .venv-llmc/bin/python benchmarks/peer_llmcompressor.py [--num-samples 128] [--recipes llmc_sq_gptq,llmc_sq_rtn]

Writes tmp/peers/<name>/ (compressed-tensors checkpoint + tokenizer + peer_run.json) and prints
one table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "tmp" / "real" / "smollm2-135m-instruct"
DEFAULT_CALIB = REPO_ROOT / "benchmarks" / "data" / "real_text" / "calib.jsonl"
DEFAULT_OUT = REPO_ROOT / "tmp" / "peers"
PROJECT_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
RECIPES = ("llmc_sq_gptq", "llmc_sq_rtn")
SMOOTHING_STRENGTH = 0.8

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


# --------------------------------------------------------------------------- project venv side


def dump_calib(args: argparse.Namespace) -> None:
    """(Runs in the project venv.) vlmq's calibration selection, rendered and tokenized, to JSON."""
    from transformers import AutoTokenizer

    from vlmq.calib.jsonl import load_jsonl

    samples, stats = load_jsonl(Path(args.calib), None, args.num_samples, args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    records, shortened = [], 0
    for s in samples:
        if s.image is not None or s.answer:
            raise SystemExit(f"{s.source}: expected a plain text record (no image, no answer)")
        prompt = s.prompt
        for _ in range(4):  # vlmq's rule: shorten the text token-wise until the rendered chat fits
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
            ids = tok(text)["input_ids"]
            if len(ids) <= args.max_length:
                break
            p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
            prompt = tok.decode(p_ids[: len(p_ids) - (len(ids) - args.max_length)], skip_special_tokens=True).strip()
            shortened += 1
        else:
            raise SystemExit(f"{s.source}: cannot fit {args.max_length} tokens")
        records.append({"source": s.source, "text": text, "input_ids": ids})
    out = {
        "calib": str(args.calib),
        "model": str(args.model),
        "num_samples": len(records),
        "requested": args.num_samples,
        "seed": args.seed,
        "max_length": args.max_length,
        "shortened": shortened,
        "tokens": sum(len(r["input_ids"]) for r in records),
        "skipped": dict(stats.skipped),
        "records": records,
    }
    Path(args.dump_calib).parent.mkdir(parents=True, exist_ok=True)
    Path(args.dump_calib).write_text(json.dumps(out))
    print(f"dumped {len(records)} samples ({out['tokens']} tokens) to {args.dump_calib}")


# --------------------------------------------------------------------------- llm-compressor side


def build_recipe(name: str) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

    smooth = SmoothQuantModifier(smoothing_strength=SMOOTHING_STRENGTH)  # mappings: inferred (Llama default)
    if name == "llmc_sq_gptq":
        return [smooth, GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    if name == "llmc_sq_rtn":
        return [smooth, QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    raise SystemExit(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")


def dump(modifier) -> dict:
    """A modifier's settings as JSON-able values (tuples -> lists, anything else -> str)."""
    return json.loads(json.dumps(modifier.model_dump(exclude_none=True), default=str))


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("llmcompressor", "torch", "transformers", "compressed-tensors")}


def run_one(args: argparse.Namespace) -> None:
    """(Child, in .venv-llmc.) One recipe: load, oneshot, save; peer_run.json beside the export."""
    t_proc = float(args.t_proc)
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = args.one
    calib = json.loads(Path(args.calib_json).read_text())
    records = calib["records"]
    out = Path(args.out_root) / name
    if out.exists():
        shutil.rmtree(out)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t_load = time.perf_counter() - t0

    # The peer calibrates on vlmq's token ids; say whether its own tokenizer would agree.
    retok_mismatch = sum(tokenizer(r["text"])["input_ids"] != r["input_ids"] for r in records)
    ds = Dataset.from_dict({
        "input_ids": [r["input_ids"] for r in records],
        "attention_mask": [[1] * len(r["input_ids"]) for r in records],
    })
    recipe = build_recipe(name)

    t1 = time.perf_counter()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=recipe,
        max_seq_length=calib["max_length"],
        num_calibration_samples=len(records),
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    t_oneshot = time.perf_counter() - t1

    t2 = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    t_save = time.perf_counter() - t2
    t_total = time.perf_counter() - t0

    qcfg = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    result = {
        "name": name,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": f"{os.cpu_count()}-core CPU, no GPU (torch threads {torch.get_num_threads()})",
        # Other processes share the cores: the 1-minute load average before and after the run.
        "loadavg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "versions": versions(),
        "model": str(args.model),
        "dtype": args.dtype,
        "recipe": [{"modifier": type(m).__name__, **{k: v for k, v in dump(m).items() if not k.endswith("_")}}
                   for m in recipe],
        "recipe_yaml": (out / "recipe.yaml").read_text() if (out / "recipe.yaml").is_file() else None,
        "num_samples": len(records),
        "calib": {k: calib[k] for k in ("calib", "requested", "seed", "max_length", "shortened", "tokens")},
        "calib_json": str(args.calib_json),
        "calib_sha256": hashlib.sha256(Path(args.calib_json).read_bytes()).hexdigest(),
        "retokenize_mismatches": retok_mismatch,
        "wall_s": {"load": round(t_load, 2), "oneshot": round(t_oneshot, 2), "save": round(t_save, 2),
                   "total": round(t_total, 2), "process_with_imports": round(time.time() - t_proc, 2)},
        "export": {"dir": str(out), "safetensors_bytes": size, "quant_method": qcfg.get("quant_method"),
                   "format": qcfg.get("format")},
    }
    (out / "peer_run.json").write_text(json.dumps(result, indent=2) + "\n")


# --------------------------------------------------------------------------- driver


def print_table(rows: list[dict]) -> None:
    head = ["name", "samples", "tokens", "load s", "oneshot s", "save s", "total s", "proc s", "MB", "format"]
    body = [[r["name"], str(r["num_samples"]), str(r["calib"]["tokens"]),
             *(f"{r['wall_s'][k]:.1f}" for k in ("load", "oneshot", "save", "total", "process_with_imports")),
             f"{r['export']['safetensors_bytes'] / 1e6:.1f}", str(r["export"]["format"])] for r in rows]
    body = [row + [f"{r['loadavg_1m']['before']:.1f}/{r['loadavg_1m']['after']:.1f}"]
            for row, r in zip(body, rows, strict=True)]
    head = head + ["load1 before/after"]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    for line in [head, ["-" * w for w in widths], *body]:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)))
    if rows:
        v = rows[0]["versions"]
        print(" ".join(f"{k} {v[k]}" for k in v) + f"; {rows[0]['machine']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--calib", default=str(DEFAULT_CALIB), help="vlmq text JSONL")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="vlmq calib.seed")
    ap.add_argument("--max-length", type=int, default=1024, help="vlmq calib.max_length")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out-root", default=str(DEFAULT_OUT))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--calib-json", help="use this dump instead of making one with the project venv")
    ap.add_argument("--project-python", default=str(PROJECT_PYTHON))
    ap.add_argument("--dump-calib", help=argparse.SUPPRESS)  # project-venv mode
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--t-proc", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.dump_calib:
        return dump_calib(args)
    if args.one:
        return run_one(args)

    names = [n for n in args.recipes.split(",") if n]
    for n in names:
        if n not in RECIPES:
            raise SystemExit(f"unknown recipe {n!r}; choose from {', '.join(RECIPES)}")
    if not (Path(args.model) / "config.json").is_file():
        raise SystemExit(f"no model at {args.model}; run: .venv/bin/python benchmarks/make_real_snapshot.py")
    out_root = Path(args.out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    calib_json = args.calib_json
    if calib_json is None:
        calib_json = str(out_root / f"calib_n{args.num_samples}_seed{args.seed}_len{args.max_length}.json")
        subprocess.run([args.project_python, __file__, "--dump-calib", calib_json, "--model", args.model,
                        "--calib", args.calib, "--num-samples", str(args.num_samples), "--seed", str(args.seed),
                        "--max-length", str(args.max_length)], check=True, cwd=REPO_ROOT)
    rows = []
    for n in names:
        print(f"== {n}", flush=True)
        subprocess.run([sys.executable, __file__, "--one", n, "--t-proc", repr(time.time()),
                        "--calib-json", calib_json, "--model", args.model, "--dtype", args.dtype,
                        "--out-root", str(out_root)], check=True, cwd=REPO_ROOT)
        rows.append(json.loads((out_root / n / "peer_run.json").read_text()))
    print()
    print_table(rows)


if __name__ == "__main__":
    main()
