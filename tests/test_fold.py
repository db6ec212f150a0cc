"""SmoothQuant folding is exact math: the folded float model equals the unsmoothed one."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmq.calib import demo_coco_root, load_coco_captions
from vlmq.calib.batches import make_batches
from vlmq.models.demo import build_demo_model, build_demo_processor, inject_outliers
from vlmq.models.families import family_for, quantized_linear_names
from vlmq.quantize.fold import fold_smoothquant, smoothing_factor

FAMILY = family_for("qwen2_5_vl")


@pytest.fixture(scope="module")
def setup():
    processor = build_demo_processor()
    samples, _ = load_coco_captions(demo_coco_root(), num_samples=4, seed=3)
    batch = make_batches(processor, samples, 4, 512)[0]
    model = inject_outliers(build_demo_model(torch.float32))
    gen = torch.Generator().manual_seed(0)
    names = quantized_linear_names(FAMILY, len(model.get_submodule(FAMILY.layers)))
    modules = dict(model.named_modules())
    # Arbitrary positive activation maxima spanning four decades: folding must be exact for any.
    act_amax = {n: 10 ** (4 * torch.rand(modules[n].in_features, generator=gen) - 2) for n in names}
    with torch.no_grad():
        ref = model(**batch).logits
    return model, batch, act_amax, ref


@pytest.mark.parametrize("smooth_o_proj", [True, False])
def test_folded_model_matches_unsmoothed(setup, smooth_o_proj):
    model, batch, act_amax, ref = setup
    folded = copy.deepcopy(model)
    result = fold_smoothquant(folded, FAMILY, act_amax, alpha=0.5, smooth_o_proj=smooth_o_proj)
    assert any((s - 1).abs().max() > 0.5 for s in result.factors.values()), "factors must be non-trivial"
    assert ("model.language_model.layers.0.self_attn.o_proj" in result.factors) == smooth_o_proj
    with torch.no_grad():
        out = folded(**batch).logits
    rel = (out - ref).norm() / ref.norm()
    assert rel < 1e-5, f"folded model differs from the original by {rel:.2e} (float32 rounding is ~1e-7)"
    # the weights did change: folding is not a no-op
    gain_before = model.get_submodule(FAMILY.layers)[0].input_layernorm.weight
    assert not torch.allclose(folded.get_submodule(FAMILY.layers)[0].input_layernorm.weight, gain_before)


def test_gqa_factors_shared_per_kv_group(setup):
    model, _, act_amax, _ = setup
    folded = copy.deepcopy(model)
    result = fold_smoothquant(folded, FAMILY, act_amax, alpha=0.5, smooth_o_proj=True)
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    group = text.num_attention_heads // text.num_key_value_heads
    s = result.factors["model.language_model.layers.0.self_attn.o_proj"].view(text.num_key_value_heads, group, head_dim)
    assert torch.equal(s, s[:, :1].expand_as(s)), "q-heads sharing a kv-head must share o_proj factors"


def test_per_head_o_proj_factors_would_break_exactness(setup):
    """Negative control: the GQA constraint matters. Scaling o_proj columns per q-head while v_proj
    (shared by the group) can only take one factor per kv-head changes the model."""
    model, batch, _, ref = setup
    broken = copy.deepcopy(model)
    attn = broken.get_submodule(FAMILY.layers)[0].self_attn
    s = torch.linspace(0.5, 2.0, attn.o_proj.in_features)   # differs between heads of a group
    with torch.no_grad():
        attn.o_proj.weight /= s[None, :]
        kv_rows = attn.v_proj.out_features
        attn.v_proj.weight *= s[:kv_rows, None]
        attn.v_proj.bias *= s[:kv_rows]
        out = broken(**batch).logits
    assert (out - ref).norm() / ref.norm() > 1e-3


def test_smoothing_factor_guards():
    act = torch.tensor([0.0, 1.0, 100.0, 1e-12])
    w = torch.tensor([1.0, 1.0, 1.0, 1.0])
    s = smoothing_factor(act, w, 0.5)
    assert s[0] == 1 and s[3] == 1, "zero-amax channels keep s=1"
    assert torch.isclose(s[2], torch.tensor(0.1))
    assert torch.all(s >= 1e-4) and torch.all(s <= 1e4)
