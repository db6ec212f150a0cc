"""The compressed-tensors export: format, schema, transformers loading, fidelity on an outlier model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from quant_fixtures import demo_quant
from vlmq.evaluate.fidelity import batch_logits, compare_logits
from vlmq.runtime.generate import generate_text
from vlmq.runtime.loader import load_w8a8


@pytest.fixture(scope="module")
def dq():
    return demo_quant()


def tensors(path):
    with safe_open(str(next(path.glob("*.safetensors"))), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_format_and_schema(dq, activations):
    from compressed_tensors.quantization import QuantizationConfig

    path = dq.exports[f"ct_{activations}"]
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qcfg)   # compressed-tensors' own schema
    assert parsed.quant_method == "compressed-tensors" and parsed.format == "int-quantized"
    (scheme,) = parsed.config_groups.values()
    assert scheme.weights.num_bits == 8 and scheme.weights.strategy == "channel" and scheme.weights.symmetric
    acts = scheme.input_activations
    assert acts.num_bits == 8 and acts.symmetric
    assert (acts.dynamic, acts.strategy) == ((True, "token") if activations == "dynamic" else (False, "tensor"))
    modules = dict(dq.model.named_modules())
    vision_linears = [n for n, m in modules.items() if n.startswith("model.visual") and isinstance(m, torch.nn.Linear)]
    assert vision_linears and all(n in parsed.ignore for n in vision_linears), "every vision/merger linear ignored"
    assert all(n.replace("model.visual", "visual", 1) in parsed.ignore for n in vision_linears)
    assert "lm_head" in parsed.ignore
    assert not any(".layers." in n for n in parsed.ignore), "no LM linear may be ignored"

    sd = tensors(path)
    assert not [k for k in sd if k.endswith("pre_quant_scale")]
    for name in dq.names:
        key = "model." + name[len("model.language_model."):]
        assert sd[f"{key}.weight"].dtype == torch.int8
        assert sd[f"{key}.weight_scale"].dtype == torch.float32
        assert (f"{key}.input_scale" in sd) == (activations == "static")
    vision = [k for k in sd if k.startswith("visual.")]
    assert vision and all(sd[k].is_floating_point() for k in vision)
    for f in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (path / f).is_file(), f"export must be self-contained: {f} missing"


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_transformers_loads_and_matches_vlmq_runtime(dq, activations):
    """Plain transformers + compressed-tensors on CPU loads the export and generates; its logits
    agree with vlmq's own integer runtime.

    Tolerance: compressed-tensors emulates int8 in bf16 (fake-quant values rounded to 8 mantissa
    bits, about the size of one int8 step), and such differences cascade through later activation
    quantizers. So the two implementations may differ by up to the quantization error itself,
    not more: measured KL(hf || runtime) 1.4e-5 (dynamic) / 6.8e-5 (static) against a
    quantization KL of 3.0e-5 / 1.0e-4 on this model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = dq.exports[f"ct_{activations}"]
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(path)
    text, tokens = generate_text(hf, processor, "Write a haiku about the sea.", max_new_tokens=6)
    assert len(tokens) > 0
    from vlmq.calib import demo_coco_root, load_rgb

    image_path = sorted((demo_coco_root() / "val2017").glob("*.jpg"))[0]
    image = load_rgb(image_path, image_path.parent)
    _, image_tokens = generate_text(hf, processor, "Describe this image.", image, max_new_tokens=6)
    assert len(image_tokens) > 0

    hf_logits = batch_logits(hf, dq.held_out)
    runtime, _, info = load_w8a8(path, device="cpu")
    assert info.activations == activations
    rt_logits = batch_logits(runtime, dq.held_out)
    quant_error = compare_logits(dq.ref_logits, hf_logits, dq.held_out)
    between = compare_logits(hf_logits, rt_logits, dq.held_out)
    assert between.kl_mean <= max(quant_error.kl_mean, 1e-5), (between, quant_error)
    assert between.top1 >= 0.9


def test_outlier_model_fidelity(dq):
    """Default export (dynamic activations) vs ModelOpt fake-quant and plain INT8, per-token KL vs bf16."""
    from transformers import AutoModelForImageTextToText

    ct = AutoModelForImageTextToText.from_pretrained(dq.exports["ct_dynamic"], dtype=torch.bfloat16).eval()
    ct_fid = compare_logits(dq.ref_logits, batch_logits(ct, dq.held_out), dq.held_out)
    fake_fid = compare_logits(dq.ref_logits, dq.fake_logits, dq.held_out)
    plain_fid = compare_logits(dq.ref_logits, dq.plain_logits, dq.held_out)
    assert ct_fid.kl_mean <= 1.1 * fake_fid.kl_mean, (ct_fid, fake_fid)
    assert plain_fid.kl_mean >= 3 * ct_fid.kl_mean, (plain_fid, ct_fid)
    assert plain_fid.kl_mean >= 3 * fake_fid.kl_mean, "the outliers must make smoothing matter"
