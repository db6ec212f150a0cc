"""quant.alpha_search: per-layer SmoothQuant alpha, applied through ModelOpt, folded the same way in the export.

Real ModelOpt on CPU, real transformers models; nothing is mocked.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch

from vlmq.calib import demo_coco_root, load_coco_captions
from vlmq.calib.batches import make_batches
from vlmq.config import ConfigError, ExportConfig, QuantConfig, load_config
from vlmq.evaluate.fidelity import batch_logits, compare_logits
from vlmq.export.compressed_tensors import fold_and_quantize, load_clean_copy, save_compressed
from vlmq.models.demo import build_demo_model, build_demo_processor, inject_outliers
from vlmq.models.families import family_for, quantized_linear_names
from vlmq.quantize.alpha_search import group_error, layer_groups
from vlmq.quantize.calibrate import audit
from vlmq.quantize.fold import collect_act_amax, fold_smoothquant
from vlmq.quantize.recipe import build_modelopt_config
from vlmq.quantize.steps import quantize_lm

FAMILY = family_for("qwen2_5_vl")
LAYERS = FAMILY.layers

# The SmoothQuant-only recipe: what these ModelOpt-fake-quant comparisons and reference writers reproduce
# (the default adds rotations and GPTQ: tests/test_quantized_state.py, test_rotate.py, test_real_weights.py).
SMOOTHQUANT = ["calibrate", "smooth", "round"]


@functools.lru_cache(maxsize=1)
def outlier_setup():
    """The outlier test model (demo + inject_outliers), 12 calibration and 4 held-out samples."""
    processor = build_demo_processor()
    samples, _ = load_coco_captions(demo_coco_root(), num_samples=16, seed=0)
    calib = make_batches(processor, samples[:12], 4, 512)
    held_out = make_batches(processor, samples[12:], 4, 512)
    model = inject_outliers(build_demo_model(torch.bfloat16))
    return model, calib, held_out, batch_logits(model, held_out)


def quantized(quant: QuantConfig, exclude=(), export: ExportConfig | None = None):
    model, calib, _, _ = outlier_setup()
    fake, info = quantize_lm(copy.deepcopy(model), FAMILY, quant, lambda m: batch_logits(m, calib), exclude=exclude,
                             export=export or ExportConfig())
    audit(fake, FAMILY, len(fake.get_submodule(LAYERS)), exclude=exclude)
    return fake, info


def test_config_and_recipe():
    cfg = load_config(["quant.alpha_search=true", "quant.alpha_grid=[0.4,0.6]"])
    assert cfg.quant.alpha_search and cfg.quant.alpha_grid == [0.4, 0.6]
    assert load_config([]).quant.alpha_search is False
    for bad in (["quant.alpha_grid=[]"], ["quant.alpha_grid=[0.5,1.2]"], ["quant.alpha_search_tokens=2"]):
        with pytest.raises(ConfigError, match="quant.alpha"):
            load_config(bad)
    recipe = build_modelopt_config(cfg.quant, FAMILY)
    assert recipe["algorithm"] == {"method": "max"}   # statistics first; smoothing per linear afterwards
    inputs = [r for r in recipe["quant_cfg"] if r["quantizer_name"].endswith("input_quantizer")]
    assert inputs[0]["cfg"]["axis"] == -1
    assert build_modelopt_config(QuantConfig(), FAMILY)["algorithm"] == {"method": "max"}   # the same for one alpha


def test_group_error_prefers_migration_for_an_outlier_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[:, 3] *= 200.0                      # an activation outlier channel, ordinary weights
    w = torch.randn(32, 64, generator=gen) * 0.05
    amax = x.abs().amax(dim=0)
    errs = {a: group_error(x, amax, [w], a) for a in (0.0, 0.5, 0.8)}
    assert errs[0.5] < errs[0.0] / 5, errs  # smoothing helps a lot here
    assert group_error(x, amax, [w, w], 0.5) == pytest.approx(2 * errs[0.5])  # a group sums its members


def test_groups_share_inputs_and_drop_excluded():
    names = quantized_linear_names(FAMILY, 2)
    groups = layer_groups(FAMILY, 2, names)
    assert [len(g) for g in groups] == [3, 1, 2, 1] * 2
    groups = layer_groups(FAMILY, 2, [n for n in names if not n.endswith("0.self_attn.q_proj")])
    assert groups[0] == [f"{LAYERS}.0.self_attn.k_proj", f"{LAYERS}.0.self_attn.v_proj"]


def test_one_alpha_grid_reproduces_modelopt_smoothquant():
    """Our per-linear postprocess is ModelOpt's: a one-value grid gives the same model as mtq's smoothquant."""
    ours, info = quantized(QuantConfig(alpha_search=True, alpha_grid=[0.5], steps=SMOOTHQUANT))
    theirs, _ = quantized(QuantConfig(alpha=0.5, steps=SMOOTHQUANT))
    assert set(info.alphas.values()) == {0.5}
    mods = dict(theirs.named_modules())
    for name, module in ours.named_modules():
        if name in info.alphas:
            ref = mods[name]
            assert torch.equal(module.weight, ref.weight), name
            assert torch.equal(module.input_quantizer.pre_quant_scale, ref.input_quantizer.pre_quant_scale), name
            assert torch.equal(module.input_quantizer.amax, ref.input_quantizer.amax), name
            assert torch.equal(module.weight_quantizer.amax, ref.weight_quantizer.amax), name
    _, _, held_out, _ = outlier_setup()
    for a, b in zip(batch_logits(ours, held_out), batch_logits(theirs, held_out), strict=True):
        assert torch.equal(a, b)


def test_fold_accepts_per_linear_alphas_and_missing_statistics():
    """Folding stays exact with a different alpha per group and with linears that have no statistics
    (sensitivity fallback): q/k/v smoothed from k and v's input maxima, down_proj left unsmoothed."""
    processor = build_demo_processor()
    samples, _ = load_coco_captions(demo_coco_root(), num_samples=4, seed=3)
    batch = make_batches(processor, samples, 4, 512)[0]
    model = inject_outliers(build_demo_model(torch.float32))
    names = quantized_linear_names(FAMILY, 2)
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(0)
    act_amax = {n: 10 ** (4 * torch.rand(modules[n].in_features, generator=gen) - 2) for n in names}
    for name in (f"{LAYERS}.0.self_attn.q_proj", f"{LAYERS}.1.mlp.down_proj"):
        del act_amax[name]
    alphas = {n: (0.3 if ".0." in n else 0.8) for n in act_amax}
    with torch.no_grad():
        ref = model(**batch).logits
        folded = copy.deepcopy(model)
        result = fold_smoothquant(folded, FAMILY, act_amax, alphas)
        out = folded(**batch).logits
    assert (out - ref).norm() / ref.norm() < 1e-5
    assert f"{LAYERS}.0.self_attn.k_proj" in result.factors and f"{LAYERS}.0.self_attn.q_proj" not in result.input_amax
    assert f"{LAYERS}.1.mlp.down_proj" not in result.factors
    base = fold_smoothquant(copy.deepcopy(model), FAMILY, act_amax, 0.3).factors
    k0 = f"{LAYERS}.0.self_attn.k_proj"
    assert torch.equal(result.factors[k0], base[k0])            # layer 0 used its own alpha (0.3)
    assert not torch.equal(result.factors[f"{LAYERS}.1.mlp.gate_proj"], base[f"{LAYERS}.1.mlp.gate_proj"])


def export_kl(fake, alphas, activations: str, tmp: Path) -> float:
    """compressed-tensors export of `fake`'s calibration, loaded by transformers, KL vs bf16."""
    from transformers import AutoModelForImageTextToText

    model, _, held_out, ref = outlier_setup()
    snapshot = tmp / "snapshot"
    if not snapshot.exists():
        model.save_pretrained(snapshot)
    names = quantized_linear_names(FAMILY, 2)
    clean, qconfig, _ = fold_and_quantize(load_clean_copy(snapshot), FAMILY, collect_act_amax(fake, names), names,
                                          alphas, activations)
    out = tmp / f"ct_{activations}_{id(fake)}"
    save_compressed(clean, qconfig, out)
    loaded = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.bfloat16).eval()
    return compare_logits(ref, batch_logits(loaded, held_out), held_out).kl_mean


@functools.lru_cache(maxsize=1)
def fixed_default():
    return quantized(QuantConfig(alpha=0.5, steps=SMOOTHQUANT))[0]


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_alpha_search_never_worse_than_default_on_outlier_model(tmp_path, activations):
    """Held-out KL vs bf16 of ModelOpt's fake-quant and of the compressed-tensors export (loaded by
    transformers), alpha search vs the fixed default 0.5; no tolerance."""
    _, _, held_out, ref = outlier_setup()
    fixed = fixed_default()
    export = ExportConfig(activations=activations)
    searched, info = quantized(QuantConfig(alpha_search=True, steps=SMOOTHQUANT), export=export)
    assert info.search is not None and len(info.search.groups) == 8
    assert info.search.targets[0] == ["static", False] and info.search.targets[-1] == [activations, True]
    assert len(set(info.alphas.values())) > 1, "the outlier model should not want one alpha everywhere"
    for g in info.search.groups:                # each group's pick is its grid minimum, 0.5 included
        assert g["score"][f"{g['alpha']:g}"] <= g["score"]["0.5"]
    kl = {
        "modelopt_fake_quant": (compare_logits(ref, batch_logits(fixed, held_out), held_out).kl_mean,
                                compare_logits(ref, batch_logits(searched, held_out), held_out).kl_mean),
        f"compressed_tensors_{activations}": (export_kl(fixed, 0.5, activations, tmp_path),
                                              export_kl(searched, info.alphas, activations, tmp_path)),
    }
    print(info.search.histogram(), {k: (f"{a:.3g}", f"{b:.3g}") for k, (a, b) in kl.items()})
    for variant, (default, search) in kl.items():
        assert search <= default, f"{variant}: alpha search KL {search:.3g} > alpha=0.5 KL {default:.3g}"
