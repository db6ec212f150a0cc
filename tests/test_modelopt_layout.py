"""ModelOpt's layout (modelopt_hf) is written from the quantized state like compressed-tensors: its tensors are
the state's bit for bit, it computes what the static compressed-tensors export of the same state computes
(exactly: pre_quant_scale is ones), it stays close to ModelOpt's own exporter of the same calibration, it carries
the rotations and GPTQ, and a state with an online Hadamard (R4) is refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import describe, run_cli
from test_quantized_state import FAMILY, SMOOTHQUANT, _quantize, calibrated  # noqa: F401 (fixture)
from vlmq.config import QuantConfig, RotateConfig
from vlmq.evaluate.fidelity import batch_logits, score_models
from vlmq.export.compressed_tensors import write_compressed_tensors
from vlmq.export.modelopt_hf import ModelOptLayoutError, modelopt_reference_export, write_modelopt_hf
from vlmq.numerics import QMAX
from vlmq.runtime.loader import inspect_checkpoint, load_w8a8

NO_R4 = ["rotate", "calibrate", "smooth", "gptq", "round"]


def _same_logits(a, b, batches) -> bool:
    """The two checkpoints' fp32 logits, batch by batch, exactly equal."""
    left, right = (batch_logits(load_w8a8(p, "cpu", dtype=torch.float32)[0], batches) for p in (a, b))
    return all(torch.equal(x, y) for x, y in zip(left, right, strict=True))


def test_layout_is_the_state_bit_for_bit(calibrated):  # noqa: F811
    work, processor, batches, snapshot = calibrated
    _, lmq = _quantize(snapshot, batches, "dynamic", QuantConfig(alpha=0.5, steps=SMOOTHQUANT))
    state, out = lmq.state, work / "mo_state"
    write_modelopt_hf(state, processor, out)
    got = load_file(out / "model.safetensors")
    for name, lin in state.linears.items():
        key = FAMILY.checkpoint_name(name)
        assert torch.equal(got[f"{key}.weight"], lin.weight.cpu()) and got[f"{key}.weight"].dtype == torch.int8
        assert torch.equal(got[f"{key}.weight_scale"], lin.weight_scale.float().cpu())
        assert got[f"{key}.input_scale"].shape == () and got[f"{key}.input_scale"].dtype == torch.float32
        assert float(got[f"{key}.input_scale"]) == float(torch.tensor(lin.input_amax / QMAX, dtype=torch.float32))
        assert torch.equal(got[f"{key}.pre_quant_scale"], torch.ones(lin.weight.shape[1], dtype=torch.bfloat16))
    # every other tensor is the state's (norm gains with the folded factors, the vision tower, embeddings)
    for module, tensors in state.tensors():
        if module in state.linears:
            continue
        prefix = FAMILY.checkpoint_name(module)
        for leaf, tensor in tensors.items():
            assert torch.equal(got[f"{prefix}.{leaf}" if prefix else leaf], tensor.cpu()), (module, leaf)
    quant = json.loads((out / "hf_quant_config.json").read_text())
    assert quant["quantization"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL" and quant["producer"]["name"] == "vlmq"
    assert "lm_head" in quant["quantization"]["exclude_modules"]
    assert not any(FAMILY.checkpoint_name(n) in quant["quantization"]["exclude_modules"] for n in state.linears)
    info = inspect_checkpoint(out)
    assert info.format == "modelopt_hf" and info.activations == "static" and len(info.quantized) == len(state.linears)


def test_layout_computes_the_static_compressed_tensors_export_and_close_to_modelopts_own(calibrated):  # noqa: F811
    """The same state as compressed-tensors with static activations: identical logits (x * 1 is exact). ModelOpt's
    own exporter of the same calibration (the live fake-quant model) re-smooths q/k/v and gate/up to one shared
    factor and requantizes: close, not equal."""
    work, processor, batches, snapshot = calibrated
    model, lmq = _quantize(snapshot, batches, "static", QuantConfig(alpha=0.5, steps=SMOOTHQUANT))
    ours, ct, theirs = work / "mo_static", work / "ct_static", work / "mo_modelopt"
    write_modelopt_hf(lmq.state, processor, ours)
    write_compressed_tensors(lmq.state, processor, ct)
    modelopt_reference_export(model, processor, theirs)
    assert _same_logits(ours, ct, batches)
    ref = load_w8a8(ct, "cpu", dtype=torch.float32)[0]
    tests = {"ours": load_w8a8(ours, "cpu", dtype=torch.float32)[0],
             "modelopt": load_w8a8(theirs, "cpu", dtype=torch.float32)[0]}
    scores = {k: v.to_dict() for k, v in score_models(ref, tests, batches).items()}
    print(scores)
    assert scores["ours"]["kl_mean"] < 1e-9, scores
    assert scores["modelopt"]["kl_mean"] < 5e-3 and scores["modelopt"]["top1"] > 0.8, scores  # measured 2.5e-4, 0.87


def test_layout_carries_rotations_and_gptq_without_r4(calibrated):  # noqa: F811
    """The default recipe with R4 off: folded rotations (untied, rotated lm_head) and GPTQ's int8 weights reach
    ModelOpt's layout, which computes the same as the static compressed-tensors export of that state."""
    work, processor, batches, snapshot = calibrated
    quant = QuantConfig(alpha=0.5, steps=NO_R4, rotate=RotateConfig(mlp_input_block=0))
    model, lmq = _quantize(snapshot, batches, "static", quant)
    state = lmq.state
    assert state.rounding == "gptq" and state.rotations.get("residual") and not state.input_hadamards()
    ours, ct = work / "mo_rotated", work / "ct_rotated"
    write_modelopt_hf(state, processor, ours)
    write_compressed_tensors(state, processor, ct)
    got = load_file(ours / "model.safetensors")
    assert torch.equal(got["lm_head.weight"], model.lm_head.weight.detach().cpu())
    assert json.loads((ours / "config.json").read_text())["tie_word_embeddings"] is False
    assert _same_logits(ours, ct, batches)


def test_online_hadamard_is_refused(calibrated, tmp_path):  # noqa: F811
    work, processor, batches, snapshot = calibrated
    _, lmq = _quantize(snapshot, batches, "dynamic", QuantConfig(alpha=0.5, steps=["rotate", "calibrate", "round"]))
    assert lmq.state.input_hadamards()
    with pytest.raises(ModelOptLayoutError, match="mlp_input_block=0"):
        write_modelopt_hf(lmq.state, processor, tmp_path / "mo")
    # and before any work, at the command line: one line, non-zero exit
    result = run_cli(["quantize", "export.formats=[modelopt_hf]", f"export.dir={tmp_path / 'x'}",
                      f"log_root={tmp_path / 'logs'}", "run_name=x"], cwd=tmp_path)
    assert result.rc == 2 and "mlp_input_block=0" in result.stderr and "Traceback" not in result.stderr, \
        describe(result)
    assert not (tmp_path / "x").exists()


def test_fp8_kv_cache_scales_are_modelopts_own(calibrated):  # noqa: F811
    """quant.kv_cache=fp8: each attention's k/v scales under ModelOpt's names, equal to what ModelOpt's own
    exporter writes for the same calibration (amax / 448), and the config says FP8."""
    work, processor, batches, snapshot = calibrated
    model, lmq = _quantize(snapshot, batches, "static", QuantConfig(alpha=0.5, steps=SMOOTHQUANT, kv_cache="fp8"))
    ours, theirs = work / "mo_kv", work / "mo_kv_modelopt"
    write_modelopt_hf(lmq.state, processor, ours)
    modelopt_reference_export(model, processor, theirs)
    got, want = load_file(ours / "model.safetensors"), load_file(theirs / "model.safetensors")
    scales = sorted(k for k in got if k.endswith(("k_scale", "v_scale")))
    assert scales == sorted(k for k in want if k.endswith(("k_scale", "v_scale"))) and len(scales) == 4
    assert all(float(got[k]) == float(want[k]) and got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
               for k in scales), [(k, got[k], want[k]) for k in scales]
    assert json.loads((ours / "hf_quant_config.json").read_text())["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert inspect_checkpoint(ours).kv_cache == "fp8"
