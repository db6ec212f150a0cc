"""`vlmq sensitivity` and `quant.max_kl` on a tiny model with one deliberately fragile LM linear.

The fragile linear: layer 1's down_proj reads a channel 1e8x larger than the others (up_proj row 5
scaled up, down_proj column 5 scaled down by the same factor, so the bf16 model computes the same
function). SmoothQuant's factor is clamped at 1e-4 (ModelOpt's guard), so at any alpha that channel
still dominates the per-tensor int8 range and the rest of down_proj's input rounds away.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import SMOOTHQUANT_RECIPE, describe, run_cli
from vlmq.calib import demo_coco_root, load_coco_captions
from vlmq.calib.batches import make_batches
from vlmq.config import QuantConfig
from vlmq.evaluate.fidelity import batch_logits, compare_logits
from vlmq.models.families import family_for, quantized_linear_names
from vlmq.quantize.calibrate import audit
from vlmq.quantize.recipe import build_modelopt_config
from vlmq.quantize.sensitivity import KLProbe, quantization_off, set_quant
from vlmq.quantize.steps import quantize_lm

FAMILY = family_for("qwen2_5_vl")
FRAGILE = f"{FAMILY.layers}.1.mlp.down_proj"
FRAGILE_CKPT = f"{FAMILY.ckpt_language_model}.layers.1.mlp.down_proj"
MAX_KL = 3e-4
COMMON = ["calib.num_samples=12", "quant.kl_samples=4", "quant.alpha_search=true"]

# The SmoothQuant-only recipe: what these ModelOpt-fake-quant comparisons and reference writers reproduce
# (the default adds rotations and GPTQ: tests/test_quantized_state.py, test_rotate.py, test_real_weights.py).
SMOOTHQUANT = ["calibrate", "smooth", "round"]


def make_fragile(model, factor: float = 1e8):
    with torch.no_grad():
        mlp = model.get_submodule(FAMILY.layers)[1].mlp
        mlp.up_proj.weight[5] *= factor
        mlp.down_proj.weight[:, 5] /= factor
    return model


@pytest.fixture(scope="module")
def fragile_snapshot(tmp_path_factory) -> Path:
    from transformers import AutoModelForImageTextToText

    from vlmq.models.demo import write_demo_snapshot

    path = tmp_path_factory.mktemp("fragile") / "snapshot"
    write_demo_snapshot(path)
    model = make_fragile(AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16))
    model.save_pretrained(path)
    (path / "VLMQ_DEMO").unlink()   # a snapshot of its own, not the built-in demo
    return path


def cli_args(snapshot: Path, tmp: Path) -> list[str]:
    return [f"arch.snapshot={snapshot}", f"calib.root={demo_coco_root()}", f"log_root={tmp / 'logs'}", *COMMON]


def held_out_batches(processor):
    """The 4 samples after the 12 calibration ones (what calibration_and_held_out holds out)."""
    samples, _ = load_coco_captions(demo_coco_root(), num_samples=16, seed=0)
    return make_batches(processor, samples[12:], 4, 1024)


def test_exclude_rules_match_exactly_one_linear():
    rules = build_modelopt_config(QuantConfig(steps=SMOOTHQUANT), FAMILY, exclude=[FRAGILE])["quant_cfg"]
    pattern = rules[-1]["quantizer_name"]
    assert rules[-1]["enable"] is False
    assert fnmatch.fnmatch(f"{FRAGILE}.input_quantizer", pattern)
    assert fnmatch.fnmatch(f"{FRAGILE}.weight_quantizer", pattern)
    assert not fnmatch.fnmatch(f"{FAMILY.layers}.11.mlp.down_proj.weight_quantizer", pattern)
    assert not fnmatch.fnmatch(f"{FAMILY.layers}.1.mlp.up_proj.weight_quantizer", pattern)


def demo_batches() -> list[dict]:
    """8 demo COCO samples in image+text batches of 4."""
    from vlmq.models.demo import build_demo_processor

    samples, _ = load_coco_captions(demo_coco_root(), num_samples=8, seed=0)
    return make_batches(build_demo_processor(), samples, 4, 512)


def test_toggling_keeps_smoothing_and_exclusion_is_audited():
    """Quantizers switched off with disable_quant() still apply pre_quant_scale (the weights hold W/s),
    so the all-off model is the bf16 model up to rounding; without the scale it would not be."""
    from vlmq.models.demo import build_demo_model, inject_outliers

    batches = demo_batches()
    model = inject_outliers(build_demo_model(torch.bfloat16))
    probe = KLProbe.capture(model, batches[1:])
    fake, _ = quantize_lm(copy.deepcopy(model), FAMILY, QuantConfig(steps=SMOOTHQUANT),
                          lambda m: batch_logits(m, batches[:1]))
    full = probe.kl(fake)
    with quantization_off(fake):
        floor = probe.kl(fake)
        set_quant(fake, [FRAGILE], True)
        one = probe.kl(fake)
        set_quant(fake, [FRAGILE], False)
        inputs = [m.input_quantizer for n, m in fake.named_modules() if n in set(quantized_linear_names(FAMILY, 2))]
        for q in inputs:
            q._enable_pre_quant_scale = False
        unscaled = probe.kl(fake)
        for q in inputs:
            q._enable_pre_quant_scale = True
    assert probe.kl(fake) == full   # everything restored
    assert floor < full / 5 and floor < one < full, (floor, one, full)
    assert unscaled > 100 * full, "negative control: dropping pre_quant_scale must break the model"

    excluded, _ = quantize_lm(copy.deepcopy(model), FAMILY, QuantConfig(alpha_search=True, steps=SMOOTHQUANT),
                              lambda m: batch_logits(m, batches[:1]), exclude=[FRAGILE])
    result = audit(excluded, FAMILY, 2, exclude=[FRAGILE])
    assert FRAGILE not in result.quantized and result.fallback_bf16 == [FRAGILE]
    assert not excluded.get_submodule(FRAGILE).input_quantizer.is_enabled
    assert excluded.get_submodule(FRAGILE).input_quantizer.pre_quant_scale is None


def test_sensitivity_cli_ranks_the_fragile_linear_first(fragile_snapshot, tmp_path):
    out = tmp_path / "sens.json"
    # SmoothQuant-only: the fragile linear is an injected outlier channel, which the default recipe's rotation spreads
    result = run_cli(["sensitivity", *cli_args(fragile_snapshot, tmp_path), "--out", str(out), "--top", "5",
                      SMOOTHQUANT_RECIPE], cwd=tmp_path)
    assert result.rc == 0, describe(result)
    assert result.stdout_lines[-1] == str(out)
    report = json.loads(out.read_text())
    ranking = report["ranking"]
    assert len(ranking) == 14 and ranking[0]["linear"] == FRAGILE, ranking[:3]
    assert ranking[0]["kl_alone"] > 20 * ranking[1]["kl_alone"]
    assert [r["kl_alone"] for r in ranking] == sorted((r["kl_alone"] for r in ranking), reverse=True)
    assert report["kl_none_quantized"] < ranking[0]["kl_alone"] <= 1.5 * report["kl_all_quantized"]
    assert report["held_out_samples"] == 4 and report["calibration_samples"] == 12
    assert FRAGILE in result.stderr and "KL alone" in result.stderr   # the table goes to the console (stderr)


def test_max_kl_fallback_end_to_end(fragile_snapshot, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlmq.runtime.linear import W8A8Linear
    from vlmq.runtime.loader import load_w8a8

    export = tmp_path / "export"
    result = run_cli(["quantize", *cli_args(fragile_snapshot, tmp_path), f"export.dir={export}",
                      f"quant.max_kl={MAX_KL}", "export.formats=[compressed_tensors,modelopt_hf]", SMOOTHQUANT_RECIPE],
                     cwd=tmp_path)
    assert result.rc == 0, describe(result)
    manifest = json.loads((export / "manifest.json").read_text())
    fallback = manifest["sensitivity_fallback"]
    assert manifest["modules"]["fallback_bf16"] == [FRAGILE]
    assert fallback["search"][0]["kl"] > MAX_KL, "the fragile model must miss the target when fully quantized"
    assert fallback["search"][1]["added"] == FRAGILE and fallback["search"][1]["kl"] <= MAX_KL
    assert fallback["kl_final"] <= MAX_KL and fallback["sensitivity"]["ranking"][0]["linear"] == FRAGILE
    assert FRAGILE not in manifest["modules"]["quantized"] and len(manifest["modules"]["quantized"]) == 13
    assert manifest["smoothquant"]["alpha_search"] and FRAGILE not in manifest["modules"]["alpha"]

    # Both formats: that linear is a plain bf16 weight, every other LM linear int8.
    for fmt in ("modelopt_hf", "compressed_tensors"):
        tensors = {}
        for shard in (export / fmt).glob("*.safetensors"):
            with safe_open(str(shard), "pt") as fh:
                tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
        assert tensors[f"{FRAGILE_CKPT}.weight"].dtype == torch.bfloat16, fmt
        assert not [k for k in tensors if k.startswith(FRAGILE_CKPT + ".") and not k.endswith(".weight")], fmt
        assert sum(t.dtype == torch.int8 for t in tensors.values()) == 13, fmt
    ignore = json.loads((export / "compressed_tensors" / "config.json").read_text())["quantization_config"]["ignore"]
    assert FRAGILE in ignore and FRAGILE_CKPT in ignore

    verify = run_cli(["verify", str(export)], cwd=tmp_path)
    assert verify.rc == 0 and verify.stdout.startswith("OK"), describe(verify)

    # The runtime loads both, with that linear left a bf16 nn.Linear, and both meet the KL target.
    bf16 = AutoModelForImageTextToText.from_pretrained(fragile_snapshot, dtype=torch.bfloat16).eval()
    batches = held_out_batches(AutoProcessor.from_pretrained(fragile_snapshot))
    ref = batch_logits(bf16, batches)
    for fmt in ("modelopt_hf", "compressed_tensors"):
        model, _, _ = load_w8a8(export / fmt, device="cpu")
        assert type(model.get_submodule(FRAGILE)) is torch.nn.Linear
        assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 13
        kl = compare_logits(ref, batch_logits(model, batches), batches).kl_mean
        assert kl <= MAX_KL, f"{fmt}: KL {kl:.3g} > {MAX_KL}"


def test_fused_groups_fall_back_whole():
    from vlmq.quantize.sensitivity import fused_siblings

    layer = "model.language_model.layers.3"
    qkv = [f"{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert fused_siblings(f"{layer}.self_attn.k_proj", FAMILY) == qkv
    assert fused_siblings(f"{layer}.mlp.up_proj", FAMILY) == [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"]
    assert fused_siblings(f"{layer}.mlp.down_proj", FAMILY) == [f"{layer}.mlp.down_proj"]


def test_probe_scores_row_by_row_as_a_whole_batch_comparison():
    """KLProbe.score compares one sequence at a time (GPU memory); its KL, top-1 and NLL equal one
    comparison of whole batches' fp32 logits, including the padded rows of image+text batches."""
    from vlmq.models.demo import build_demo_model

    batches = demo_batches()
    model = build_demo_model(torch.bfloat16)
    probe = KLProbe.capture(model, batches[1:])
    assert all(r.dtype == torch.bfloat16 for r in probe.ref)   # the model's own logits, not an fp32 copy
    fake, _ = quantize_lm(copy.deepcopy(model), FAMILY, QuantConfig(steps=SMOOTHQUANT),
                          lambda m: batch_logits(m, batches[:1]))
    rows = probe.score(fake)
    whole = compare_logits(batch_logits(model, batches[1:]), batch_logits(fake, batches[1:]), batches[1:])
    assert rows.tokens == whole.tokens and rows.nll_tokens == whole.nll_tokens > 0
    assert rows.kl_mean == pytest.approx(whole.kl_mean, rel=1e-5) and rows.kl_mean > 0
    assert rows.kl_max == pytest.approx(whole.kl_max, rel=1e-5)
    assert rows.top1 == pytest.approx(whole.top1, abs=1e-6)   # an fp32 mean per row
    assert rows.nll_test == pytest.approx(whole.nll_test, rel=1e-6)
