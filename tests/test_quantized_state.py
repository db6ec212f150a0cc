"""The quantized state is what the compressed-tensors export writes, bit for bit, and it equals the
independent reference writer (a folded float copy of the snapshot compressed by compressed-tensors'
ModelCompressor) on the same calibration: static and dynamic activations, per-linear alphas, and a
bf16 fallback linear whose columns still absorb its group's factor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmq.calib import demo_coco_root, load_coco_captions
from vlmq.calib.batches import make_batches
from vlmq.config import ExportConfig, QuantConfig
from vlmq.evaluate.fidelity import batch_logits
from vlmq.export.compressed_tensors import (
    fold_and_quantize,
    load_clean_copy,
    save_compressed,
    write_compressed_tensors,
)
from vlmq.models.demo import build_demo_processor, inject_outliers, random_model
from vlmq.models.families import family_for, quantized_linear_names
from vlmq.quantize.fold import collect_act_amax
from vlmq.quantize.steps import quantize_lm

FAMILY = family_for("qwen2_5_vl")
FALLBACK = "model.language_model.layers.1.self_attn.k_proj"   # kept bf16; q/v in its group are quantized
SMOOTHQUANT = ["calibrate", "smooth", "round"]   # the recipe the independent reference writer reproduces


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlmq.models.demo import demo_config

    work = tmp_path_factory.mktemp("state")
    processor = build_demo_processor()
    samples, _ = load_coco_captions(demo_coco_root(), num_samples=8, seed=0)
    batches = make_batches(processor, samples, 4, 512)
    snapshot = work / "snapshot"
    inject_outliers(random_model(Qwen2_5_VLForConditionalGeneration, demo_config(), 0)).save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    return work, processor, batches, snapshot


def _quantize(snapshot: Path, batches, activations: str, quant: QuantConfig, exclude=()):
    model = load_clean_copy(snapshot, family=FAMILY)
    export = ExportConfig(activations=activations)
    return quantize_lm(model, FAMILY, quant, lambda m: batch_logits(m, batches), exclude=exclude, export=export)


@pytest.mark.parametrize("activations, alpha_search, exclude", [
    ("dynamic", False, ()), ("static", False, ()), ("dynamic", True, (FALLBACK,))])
def test_state_export_equals_reference_writer_bit_for_bit(calibrated, activations, alpha_search, exclude):
    work, processor, batches, snapshot = calibrated
    quant = QuantConfig(alpha=0.5, alpha_search=alpha_search, alpha_grid=[0.3, 0.5, 0.8], alpha_search_tokens=64,
                        steps=SMOOTHQUANT)
    model, lmq = _quantize(snapshot, batches, activations, quant, exclude)
    state = lmq.state
    tag = f"{activations}-{alpha_search}"
    new = work / f"new-{tag}"
    write_compressed_tensors(state, processor, new)

    names = [n for n in quantized_linear_names(FAMILY, 2) if n not in exclude]
    alpha = lmq.alphas or 0.5
    ref_model, qconfig, _ = fold_and_quantize(load_clean_copy(snapshot, family=FAMILY), FAMILY,
                                              collect_act_amax(model, names), names, alpha, activations)
    ref = work / f"ref-{tag}"
    save_compressed(ref_model, qconfig, ref)

    got, want = load_file(new / "model.safetensors"), load_file(ref / "model.safetensors")
    assert sorted(got) == sorted(want)
    differ = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert differ == [], differ[:5]
    got_cfg, want_cfg = (json.loads((d / "config.json").read_text()) for d in (new, ref))
    assert got_cfg == want_cfg
    # the file holds the state's own tensors
    for name, lin in state.linears.items():
        key = FAMILY.checkpoint_name(name)
        assert torch.equal(got[f"{key}.weight"], lin.weight.cpu())
        assert torch.equal(got[f"{key}.weight_scale"][:, 0], lin.weight_scale.float().cpu())
    assert (FALLBACK in state.linears) is (not exclude)
    if exclude:   # the bf16 member of the q/k/v group carries the group's factor in its columns
        assert f"{FALLBACK}.weight" in state.edits


def test_shards_and_index_when_over_the_shard_size(calibrated):
    work, processor, batches, snapshot = calibrated
    _, lmq = _quantize(snapshot, batches, "dynamic", QuantConfig(alpha=0.5, steps=SMOOTHQUANT))
    one, many = work / "one", work / "many"
    write_compressed_tensors(lmq.state, processor, one)
    files = write_compressed_tensors(lmq.state, processor, many, max_shard_bytes=200_000)
    assert len(files) > 2 and not (many / "model.safetensors").exists()
    index = json.loads((many / "model.safetensors.index.json").read_text())
    merged = {}
    for f in files:
        merged.update(load_file(many / f))
    whole = load_file(one / "model.safetensors")
    assert sorted(merged) == sorted(whole) == sorted(index["weight_map"])
    assert all(torch.equal(merged[k], whole[k]) for k in whole)


def test_a_new_step_is_one_function_and_one_config_entry(calibrated, tmp_path):
    """A step registered by name and listed in quant.steps runs in order; here it halves every alpha, so the
    state equals the one quant.alpha=0.4 gives without it."""
    from vlmq.quantize.steps import STEPS, register_step

    @register_step("halve_alpha")
    def halve_alpha(work):
        work.alphas = {name: alpha / 2 for name, alpha in work.alphas.items()}
        return work

    _, processor, batches, snapshot = calibrated
    try:
        _, halved = _quantize(snapshot, batches, "dynamic",
                              QuantConfig(alpha=0.8, steps=["rotate", "calibrate", "smooth", "halve_alpha", "gptq",
                                                            "round"]))
    finally:
        STEPS.pop("halve_alpha")
    _, direct = _quantize(snapshot, batches, "dynamic", QuantConfig(alpha=0.4))
    assert set(halved.state.alphas.values()) == {0.4}
    for name, lin in direct.state.linears.items():
        assert torch.equal(halved.state.linears[name].weight, lin.weight), name


def test_unknown_step_is_a_one_line_error(tmp_path):
    from conftest import run_cli
    from test_cli_errors import assert_one_line_error

    result = run_cli(["quantize", "quant.steps=[calibrate,rotaet,round]", f"log_root={tmp_path}",
                      f"export.dir={tmp_path / 'export'}"], cwd=tmp_path)
    assert_one_line_error(result, "unknown step 'rotaet'", "rotate, calibrate, smooth, gptq, round")
    assert not (tmp_path / "export").exists()


def test_steps_out_of_order_are_a_one_line_error(tmp_path):
    from conftest import run_cli
    from test_cli_errors import assert_one_line_error

    result = run_cli(["quantize", "quant.steps=[calibrate,rotate,smooth,round]", f"log_root={tmp_path}",
                      f"export.dir={tmp_path / 'export'}"], cwd=tmp_path)
    assert_one_line_error(result, "'rotate' must come before 'calibrate'")


def test_default_recipe_export_is_the_state_bit_for_bit_with_its_rotations(calibrated):
    """Rotations, GPTQ and the online Hadamard reach the compressed-tensors export: its int8 weights and scales
    are the state's, the lm_head is untied and rotated, and down_proj declares its input Hadamard."""
    work, processor, batches, snapshot = calibrated
    quant = QuantConfig(alpha=0.5)
    assert quant.steps == ["rotate", "calibrate", "smooth", "gptq", "round"]
    model, lmq = _quantize(snapshot, batches, "dynamic", quant)
    state = lmq.state
    assert state.rounding == "gptq" and set(state.rotations) == {"residual", "input_hadamards"}
    out = work / "default"
    write_compressed_tensors(state, processor, out)
    got = load_file(out / "model.safetensors")
    for name, lin in state.linears.items():
        key = FAMILY.checkpoint_name(name)
        assert torch.equal(got[f"{key}.weight"], lin.weight.cpu())
        assert torch.equal(got[f"{key}.weight_scale"][:, 0], lin.weight_scale.float().cpu())
        assert (lin.input_hadamard == 128 if name.endswith("down_proj") else lin.input_hadamard is None)
    # Untied and rotated: the export's lm_head is the live model's (Q^T applied, the final norm's gain folded in:
    # the random demo's gain is 1, so it equals the rotated embedding here), not the snapshot's tied one.
    original = load_clean_copy(snapshot, family=FAMILY).lm_head.weight.detach().cpu()
    assert torch.equal(got["lm_head.weight"], model.lm_head.weight.detach().cpu())
    assert not torch.equal(got["lm_head.weight"], original)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    scheme = cfg["quantization_config"]["transform_config"]["config_groups"]["R4"]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == 128
    # GPTQ changed the rounding: some int8 weight differs from round-to-nearest of the same smoothed weights
    _, rtn = _quantize(snapshot, batches, "dynamic", QuantConfig(alpha=0.5, steps=["rotate", "calibrate", "smooth",
                                                                                     "round"]))
    assert any(not torch.equal(rtn.state.linears[n].weight, lin.weight) for n, lin in state.linears.items())

