"""Fidelity of exported checkpoints on the real model (SmolLM2-135M-Instruct) and real held-out text.

Every checkpoint is loaded by vlmq's runtime (real int8 GEMMs, `--backend`) and scored against one
reference on the same batches: the held-out records rendered exactly as calibration renders them
(the model's chat template), KL(ref || test) and top-1 over every real position, NLL/perplexity of
the actual next tokens. The reference is the fp32 model (so the bf16 row is the floor), or bf16.
`--val N` scores on N validation records instead (calib.jsonl records 400.., seeded order, which no
calibration of 400 texts or fewer reads): for choosing a recipe without touching the test records.
Each export runs in the float dtype its config declares (`--runtime-dtype checkpoint`, as vLLM's dtype="auto"
does: bf16, or fp16 where vlmq's `export.dtype=auto` chose it). `--runtime-dtype float32` runs every export's
float arithmetic in fp32 (the int8 GEMMs are exact either way): the checkpoint's own error without the 16-bit
runtime's; `float16` / `bfloat16` run every export in that dtype (e.g. a peer's bf16 checkpoint in fp16).

    python benchmarks/real_fidelity.py default=tmp/realrun/default/compressed_tensors \
        modelopt=tmp/realrun/default/modelopt_hf --samples 112 --json tmp/real_fidelity.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

HELDOUT = REPO_ROOT / "benchmarks" / "data" / "real_text" / "heldout.jsonl"
CALIB = REPO_ROOT / "benchmarks" / "data" / "real_text" / "calib.jsonl"
VAL_OFFSET = 400


def heldout_batches(processor, path: Path = HELDOUT, samples: int = 112, max_length: int = 1024,
                    batch_size: int = 8) -> list[dict]:
    """The first `samples` held-out records (seeded order, seed 0), batched as calibration batches them."""
    from vlmq.calib.batches import make_batches
    from vlmq.calib.jsonl import load_jsonl

    records, _ = load_jsonl(path, None, samples, 0)
    return make_batches(processor, records, batch_size, max_length)


def validation_batches(processor, samples: int) -> list[dict]:
    """calib.jsonl records VAL_OFFSET.. of the seeded order (seed 0), batched as calibration batches them."""
    from vlmq.calib.batches import make_batches
    from vlmq.calib.jsonl import load_jsonl

    records, _ = load_jsonl(CALIB, None, VAL_OFFSET + samples, 0)
    return make_batches(processor, records[VAL_OFFSET:], 8, 1024)


def score_exports(snapshot: Path, exports: dict[str, Path], samples: int, reference: str = "fp32",
                  backend: str = "auto", val: int = 0, runtime_dtype: str = "checkpoint") -> dict[str, dict]:
    """{name: Fidelity dict} for bf16 (with an fp32 reference) and each export, against the `reference`
    dtype of the snapshot. All models are loaded at once and scored batch by batch."""
    import torch

    from vlmq.evaluate.fidelity import score_models
    from vlmq.models.load import inspect_snapshot, load_model, load_processor
    from vlmq.runtime.loader import load_w8a8

    snap = inspect_snapshot(snapshot)
    processor = load_processor(snapshot)
    batches = validation_batches(processor, val) if val else heldout_batches(processor, samples=samples)
    ref = load_model(snap, {"fp32": "float32", "bf16": "bfloat16"}[reference], "cpu")
    models, info = {}, {}
    if reference == "fp32":
        models["bf16"] = load_model(snap, "bfloat16", "cpu")
    for name, path in exports.items():
        dtype = None if runtime_dtype == "checkpoint" else getattr(torch, runtime_dtype)
        models[name], _, loaded = load_w8a8(path, "cpu", dtype, backend=backend)
        info[name] = {"format": loaded.format, "activations": loaded.activations, "quantized": len(loaded.quantized),
                      "runtime_dtype": str(next(p.dtype for p in models[name].parameters()
                                                 if p.is_floating_point())).removeprefix("torch.")}
    started = time.perf_counter()
    scores = score_models(ref, models, batches)
    seconds = round(time.perf_counter() - started, 2)
    return {name: {**fid.to_dict(), **info.get(name, {}), "score_seconds_all": seconds}
            for name, fid in scores.items()}


def table(rows: dict[str, dict]) -> str:
    lines = [f"{'export':<40} {'KL':>8} {'top-1':>7} {'ppl':>8} {'Δppl %':>7} {'tokens':>7}"]
    for name, r in rows.items():
        lines.append(f"{name:<40} {r['kl_mean']:>8.4f} {r['top1']:>7.3f} {r['ppl_test']:>8.2f} "
                     f"{r['ppl_delta_pct']:>+7.2f} {r['tokens']:>7}")
    ref_ppl = next(iter(rows.values()))["ppl_ref"]
    lines.append(f"(reference perplexity {ref_ppl:.2f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="*", help="name=checkpoint_dir (split at the last =)")
    parser.add_argument("--snapshot", type=Path, default=None, help="default: the real SmolLM2 snapshot (built)")
    parser.add_argument("--samples", type=int, default=112)
    parser.add_argument("--reference", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--val", type=int, default=0, help="score N validation records of calib.jsonl instead")
    parser.add_argument("--runtime-dtype", choices=("checkpoint", "bfloat16", "float16", "float32"),
                        default="checkpoint")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.snapshot is None:
        from make_real_snapshot import build

        args.snapshot = build()
    exports = dict(item.rsplit("=", 1) for item in args.exports)
    rows = score_exports(args.snapshot, {k: Path(v) for k, v in exports.items()}, args.samples, args.reference,
                         args.backend, args.val, args.runtime_dtype)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"reference": args.reference, "samples": args.samples, "val": args.val,
                                         "runtime_dtype": args.runtime_dtype,
                                         "snapshot": str(args.snapshot), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
