"""Per-token KL and top-1 agreement vs bf16 on the tiny model with injected outlier channels.

Variants: ModelOpt fake-quant (SmoothQuant), plain INT8 (no smoothing), and the compressed-tensors
export loaded by transformers: static vs dynamic activations, o_proj smoothed or not.

    .venv/bin/python benchmarks/fidelity_outliers.py --out tmp/bench/fidelity_outliers.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from vlmq.calib import demo_coco_root, load_coco_captions
from vlmq.calib.batches import make_batches
from vlmq.config import QuantConfig
from vlmq.evaluate.fidelity import batch_logits, compare_logits, fake_quant_copy
from vlmq.export.compressed_tensors import fold_and_quantize, load_clean_copy, save_compressed
from vlmq.models.demo import build_demo_model, build_demo_processor, inject_outliers
from vlmq.models.families import family_for, quantized_linear_names
from vlmq.quantize.fold import collect_act_amax

FAMILY = family_for("qwen2_5_vl")


def setup(workdir: Path, alpha: float = 0.5, outliers: bool = True):
    """Outlier snapshot on disk, calibration/eval batches, the SmoothQuant fake-quant model."""
    processor = build_demo_processor()
    samples, _ = load_coco_captions(demo_coco_root(), num_samples=16, seed=0)
    calib = make_batches(processor, samples[:12], 4, 512)
    held_out = make_batches(processor, samples[12:], 4, 512)
    model = build_demo_model(torch.bfloat16)
    if outliers:
        inject_outliers(model)
    snapshot = workdir / "snapshot"
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    quant = QuantConfig(alpha=alpha)
    fake = fake_quant_copy(model, FAMILY, quant, calib)
    return processor, model, fake, calib, held_out, snapshot


def export_ct(fake, snapshot: Path, out: Path, alpha: float, activations: str, smooth_o_proj: bool) -> Path:
    from transformers import AutoModelForImageTextToText

    names = quantized_linear_names(FAMILY, len(fake.get_submodule(FAMILY.layers)))
    clean = load_clean_copy(snapshot)
    clean, qconfig, _ = fold_and_quantize(
        clean, FAMILY, collect_act_amax(fake, names), names, alpha, activations, smooth_o_proj
    )
    save_compressed(clean, qconfig, out)
    for name in (
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "video_preprocessor_config.json",
    ):
        if (snapshot / name).is_file():
            shutil.copy(snapshot / name, out / name)
    return AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16).eval()


def run(alpha: float = 0.5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _, model, fake, calib, held_out, snapshot = setup(tmp, alpha)
        ref = batch_logits(model, held_out)
        results = {"modelopt_fakequant_sq": compare_logits(ref, batch_logits(fake, held_out), held_out)}
        plain = fake_quant_copy(model, FAMILY, QuantConfig(alpha=alpha), calib, smoothquant=False)
        results["plain_int8_no_smoothing"] = compare_logits(ref, batch_logits(plain, held_out), held_out)
        for activations in ("static", "dynamic"):
            for smooth_o in (True, False):
                name = f"ct_{activations}_{'o_smoothed' if smooth_o else 'o_unsmoothed'}"
                ct = export_ct(fake, snapshot, tmp / name, alpha, activations, smooth_o)
                results[name] = compare_logits(ref, batch_logits(ct, held_out), held_out)
        sizes = {p.name: sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in tmp.iterdir() if p.is_dir()}
    return {"alpha": alpha, "results": {k: v.to_dict() for k, v in results.items()}, "safetensors_bytes": sizes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = run(args.alpha)
    print(f"{'variant':32} {'KL mean':>10} {'KL max':>10} {'top-1':>7}")
    for name, r in out["results"].items():
        print(f"{name:32} {r['kl_mean']:10.5f} {r['kl_max']:10.5f} {r['top1']:7.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
