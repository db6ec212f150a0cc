"""Rotations are exact math: the rotated (and smoothed) float model equals the original to float rounding,
for a text family with tied and untied embeddings (GQA) and for Qwen2.5-VL with an image through the merger."""

from __future__ import annotations

import copy

import pytest
import torch

from vlmq.calib import demo_coco_root, load_coco_captions
from vlmq.calib.batches import make_batches
from vlmq.models.demo import build_demo_model, build_demo_processor, inject_outliers, random_model
from vlmq.models.families import family_for, quantized_linear_names
from vlmq.numerics import block_hadamard, hadamard, paley_hadamard, sylvester_hadamard
from vlmq.quantize import rotate
from vlmq.quantize.fold import fold_smoothquant


def rotate_all(model, family, block: int = 32, seed: int = 0) -> None:
    _, _, head_dim = rotate.text_geometry(model)
    rotate.fold_norm_gains(model, family)
    hidden = model.config.get_text_config().hidden_size
    rotate.rotate_residual(model, family, rotate.randomized_hadamard(hidden, seed))
    rotate.rotate_values(model, family, rotate.random_orthogonal(head_dim, seed + 1))
    rotate.rotate_mlp_input(model, family, block)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_hadamard_matrices():
    h = sylvester_hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64, dtype=h.dtype), atol=1e-12) and torch.equal(h, h.T)
    x = torch.randn(5, 256, dtype=torch.float64)
    dense = torch.block_diag(*[sylvester_hadamard(64)] * 4)
    assert torch.allclose(block_hadamard(x, 64), x @ dense, atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        sylvester_hadamard(48)
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard(x, 96)
    q = rotate.random_orthogonal(48, 0)
    assert torch.allclose(q @ q.T, torch.eye(48, dtype=q.dtype), atol=1e-12)
    assert torch.equal(rotate.random_orthogonal(48, 0), q) and not torch.equal(rotate.random_orthogonal(48, 1), q)


@pytest.mark.parametrize("n", [12, 48, 576, 896, 1536, 3584])
def test_hadamard_beyond_powers_of_two(n):
    """Sylvester x Paley reaches the hidden sizes of SmolLM2 (576), Qwen2.5 0.5B/7B (896, 3584): an orthogonal
    matrix whose entries all have magnitude 1/sqrt(n), the flattest rotation there is."""
    h = hadamard(n)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=h.dtype), atol=1e-12)
    assert torch.allclose(h.abs(), torch.full_like(h, n ** -0.5), atol=1e-15)
    q = rotate.randomized_hadamard(n, 3)
    assert torch.allclose(q.abs(), h.abs()) and torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-12)


def test_hadamard_sizes_out_of_reach():
    p = paley_hadamard(11)
    assert torch.equal(p @ p.T, 12 * torch.eye(12, dtype=p.dtype))
    with pytest.raises(ValueError, match="prime q = 3 mod 4"):
        paley_hadamard(13)
    with pytest.raises(ValueError, match="no Hadamard construction here for size 18944"):
        hadamard(18944)
    q = rotate.randomized_hadamard(18944 // 64, 0)   # 296: neither construction; a random orthogonal Q
    kinds = {(n, m): rotate.rotation_kind(n, m) for n in (296, 576, 2048) for m in ("auto", "hadamard", "orthogonal")}
    assert kinds == {(296, "auto"): "random_orthogonal", (296, "hadamard"): "random_orthogonal",
                     (296, "orthogonal"): "random_orthogonal", (576, "auto"): "random_orthogonal",
                     (576, "hadamard"): "randomized_hadamard", (576, "orthogonal"): "random_orthogonal",
                     (2048, "auto"): "randomized_hadamard", (2048, "hadamard"): "randomized_hadamard",
                     (2048, "orthogonal"): "random_orthogonal"}
    assert torch.equal(rotate.rotation_matrix(576, 5, "orthogonal"), rotate.random_orthogonal(576, 5))
    assert torch.equal(rotate.rotation_matrix(576, 5, "hadamard"), rotate.randomized_hadamard(576, 5))
    assert torch.equal(rotate.rotation_matrix(576, 5), rotate.random_orthogonal(576, 5))   # auto: unchanged
    assert torch.allclose(q @ q.T, torch.eye(296, dtype=q.dtype), atol=1e-12) and q.abs().max() > 296 ** -0.5 * 1.5


def text_model(tied: bool, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = random_model(LlamaForCausalLM, config, seed=5, dtype=torch.float32)
    with torch.no_grad():   # non-trivial gains, as in trained models
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + torch.rand_like(p) * 3)
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_rotated_text_model_is_unchanged(tied):
    family = family_for("llama")
    model = text_model(tied)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    rotated = copy.deepcopy(model)
    rotate_all(rotated, family)
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight   # untied: the final gain differs
    assert not rotated.config.tie_word_embeddings
    assert torch.equal(rotated.model.layers[0].input_layernorm.weight, torch.ones(64))
    assert rel_diff(rotated.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight) > 0.5
    with torch.no_grad():
        out = rotated(input_ids=ids).logits
    assert rel_diff(out, ref) < 1e-5
    # SmoothQuant composes after the rotation: it folds into the (now unit) norms
    names = quantized_linear_names(family, 2)
    modules = dict(rotated.named_modules())
    gen = torch.Generator().manual_seed(1)
    amax = {n: 10 ** (3 * torch.rand(modules[n].in_features, generator=gen) - 1) for n in names
            if not n.endswith("down_proj")}
    fold_smoothquant(rotated, family, amax, 0.5)
    with torch.no_grad():
        out = rotated(input_ids=ids).logits
    assert rel_diff(out, ref) < 1e-5
    # and the online Hadamard is really part of the function
    for layer in rotated.model.layers:
        layer.mlp.down_proj._forward_pre_hooks.clear()
    with torch.no_grad():
        assert rel_diff(rotated(input_ids=ids).logits, ref) > 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_a_bf16_model_keeps_its_rotated_float_tensors_in_fp32(tied):
    """The tensors that stay floating point in the checkpoint (embedding, lm_head) are kept in fp32 beside a
    bf16 model's rotated copy: equal to the same rotation of the fp32 model to fp32 rounding, while the bf16
    model holds them rounded; quantized linears and an fp32 model get none."""
    family = family_for("llama")
    half = text_model(tied).to(torch.bfloat16)
    exact = copy.deepcopy(half).to(torch.float32)   # the same bf16 values, rotated in fp32
    for model in (exact, half):
        rotate_all(model, family)
    assert rotate.precise_tensors(exact) == {}
    precise = rotate.precise_tensors(half)
    assert set(precise) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert rotate.precise_tensors(half) == {}   # read once: the copies leave the model
    params = dict(half.named_parameters())
    want = dict(exact.named_parameters())
    for name, value in precise.items():
        assert value.dtype == torch.float32
        assert torch.equal(params[name], value.to(torch.bfloat16)), name
        assert rel_diff(value, want[name]) < 1e-6 < 1e-4 < rel_diff(params[name].float(), want[name]), name


def test_paley_hadamard_rotations_leave_the_model_unchanged():
    """matrix=hadamard at widths that are not powers of two: R1 at 48 = 4 * 12, R2 at head_dim 12 (Paley 12)."""
    family = family_for("llama")
    model = text_model(tied=True, hidden=48)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    assert rotate.rotation_kind(48, "hadamard") == rotate.rotation_kind(12, "hadamard") == "randomized_hadamard"
    rotate.fold_norm_gains(model, family)
    rotate.rotate_residual(model, family, rotate.rotation_matrix(48, 0, "hadamard"))
    rotate.rotate_values(model, family, rotate.rotation_matrix(12, 1, "hadamard"))
    with torch.no_grad():
        assert rel_diff(model(input_ids=ids).logits, ref) < 1e-5


def test_rotated_qwen2_5_vl_with_image_is_unchanged():
    family = family_for("qwen2_5_vl")
    processor = build_demo_processor()
    samples, _ = load_coco_captions(demo_coco_root(), num_samples=2, seed=3)
    batch = make_batches(processor, samples, 2, 512)[0]
    assert "pixel_values" in batch
    model = inject_outliers(build_demo_model(torch.float32))
    with torch.no_grad():
        ref = model(**batch).logits
    rotated = copy.deepcopy(model)
    rotate_all(rotated, family)
    with torch.no_grad():
        out = rotated(**batch).logits
    assert rel_diff(out, ref) < 1e-5
    # without rotating the merger's output, image tokens would enter the stream unrotated
    broken = copy.deepcopy(model)
    rotate_all(broken, family)
    merger = broken.model.visual.merger.mlp[2]
    q = rotate.randomized_hadamard(merger.out_features, 0)
    with torch.no_grad():
        merger.weight.copy_(q.T.float() @ merger.weight)
        merger.bias.copy_(q.T.float() @ merger.bias)
        assert rel_diff(broken(**batch).logits, ref) > 1e-3


def test_unmapped_vision_output_is_refused():
    family = family_for("qwen3_vl")
    with pytest.raises(rotate.RotationError, match="vision outputs"):
        rotate.rotate_residual(torch.nn.Module(), family, torch.eye(4))
