"""vlmq.runtime: both export formats run with integer math and agree with ModelOpt's fake quant."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant_fixtures import demo_quant
from vlmq.calib import demo_coco_root, load_rgb
from vlmq.evaluate.fidelity import batch_logits, compare_logits
from vlmq.runtime.generate import generate_text
from vlmq.runtime.linear import W8A8Linear
from vlmq.runtime.loader import CheckpointError, load_w8a8


@pytest.fixture(scope="module")
def dq():
    return demo_quant()


def test_modelopt_export_runs_like_modelopt_fake_quant(dq):
    """In float32 (where ModelOpt's fake-quant values are exact), the runtime on the exported
    tensors reproduces ModelOpt's fake-quant model (after export's re-smoothing, which is what the
    checkpoint holds). What remains is ModelOpt's export rounding W/scale in bf16 for a few weights
    (5e-4 relative per layer), whose flips cascade through later activation quantizers: measured
    KL 2.0e-5 between them vs 8.3e-5 for quantization itself."""
    model, _, info = load_w8a8(dq.exports["modelopt_hf"], device="cpu", dtype=torch.float32)
    assert info.format == "modelopt_hf" and info.activations == "static" and info.smoothing_scales
    assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == len(dq.names)
    rt = batch_logits(model, dq.held_out)
    between = compare_logits(dq.resmoothed_fp32_logits, rt, dq.held_out)
    quant_error = compare_logits(dq.ref_logits, dq.resmoothed_fp32_logits, dq.held_out)
    assert between.kl_mean < 0.5 * quant_error.kl_mean, (between, quant_error)
    assert between.top1 >= 0.9


@pytest.mark.parametrize("fmt", ["modelopt_hf", "ct_static", "ct_dynamic"])
def test_runtime_close_to_bf16_and_generates(dq, fmt):
    model, processor, info = load_w8a8(dq.exports[fmt], device="cpu")
    assert all(not isinstance(m, W8A8Linear) for n, m in model.named_modules() if n.startswith("model.visual"))
    assert model.get_submodule("model.visual.blocks.0.attn.qkv").weight.dtype == torch.bfloat16
    fid = compare_logits(dq.ref_logits, batch_logits(model, dq.held_out), dq.held_out)
    fake = compare_logits(dq.ref_logits, dq.fake_logits, dq.held_out)
    assert fid.kl_mean < 2 * fake.kl_mean, (fid, fake)
    _, text_tokens = generate_text(model, processor, "Write a haiku about the sea.", max_new_tokens=5)
    image_path = sorted((demo_coco_root() / "val2017").glob("*.jpg"))[1]
    image = load_rgb(image_path, image_path.parent)
    _, image_tokens = generate_text(model, processor, "Describe this image.", image, max_new_tokens=5)
    assert text_tokens and image_tokens


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_refuses_tensors_that_disagree_with_config(dq, tmp_path):
    bad = _copy(dq.exports["ct_dynamic"], tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="input_scale missing"):
        load_w8a8(bad, device="cpu")

    bad2 = _copy(dq.exports["ct_static"], tmp_path / "bad2")
    sd = load_file(bad2 / "model.safetensors")
    sd["visual.blocks.0.attn.qkv.weight"] = sd["visual.blocks.0.attn.qkv.weight"].to(torch.int8)
    save_file(sd, bad2 / "model.safetensors")
    with pytest.raises(CheckpointError, match="vision tower must stay bf16"):
        load_w8a8(bad2, device="cpu")

    bad3 = _copy(dq.exports["modelopt_hf"], tmp_path / "bad3")
    cfg = json.loads((bad3 / "config.json").read_text())
    del cfg["quantization_config"]
    (bad3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method"):
        load_w8a8(bad3, device="cpu")


def test_cuda_device_refused_with_one_line(dq, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_w8a8 on a CUDA device that isn't there: a one-line error before any file is read
    (the card count is faked for the index check: no GPU here)."""
    from vlmq.models.load import SnapshotError

    with pytest.raises(SnapshotError, match=r"^device=cuda:0 was asked for but no CUDA device is visible$"):
        load_w8a8(dq.exports["ct_dynamic"], device="cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SnapshotError, match=r"^device=cuda:2 was asked for but only 2 CUDA device\(s\) are visible$"):
        load_w8a8(dq.exports["ct_dynamic"], device="cuda:2")
    with pytest.raises(SnapshotError, match="is not a device"):
        load_w8a8(dq.exports["ct_dynamic"], device="cuda:x")
