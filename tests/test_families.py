"""Model families beyond Qwen2.5-VL: tiny model end to end, quantize -> export -> verify -> runtime."""

from __future__ import annotations

import pytest
import torch

from conftest import SMOOTHQUANT_RECIPE, describe, run_cli
from vlmq.calib import demo_coco_root, load_rgb
from vlmq.models.demo import write_demo_qwen2_vl_snapshot, write_demo_qwen3_vl_snapshot
from vlmq.models.families import FAMILIES, family_for
from vlmq.runtime.generate import chat_inputs, generate_text, load_any
from vlmq.runtime.linear import W8A8Linear
from vlmq.runtime.loader import load_w8a8

# Every position's logits of the W8A8 model against the bf16 snapshot's, on the same chat. On these tiny
# random models an intact export gives a cosine >= 0.999 (both formats, every family, text and image);
# zeroing one weight scale (layer 0's down_proj: 0.92-0.97, layer 1's o_proj: 0.4-0.7) or every scale
# (<= 0.3) falls well below. Their greedy tokens cannot tell: a random model repeats one token either way.
MIN_LOGIT_COSINE = 0.995


def assert_logits_close_to_bf16(model, reference, processor, prompt: str, image=None) -> None:
    inputs = chat_inputs(processor, prompt, image)
    with torch.no_grad():
        got = model(**inputs).logits[0].float()
        want = reference(**inputs).logits[0].float()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert got.shape == want.shape and cosine.min() >= MIN_LOGIT_COSINE, \
        f"{prompt!r}: logit cosine vs bf16 min {cosine.min():.4f}, mean {cosine.mean():.4f}"


def test_registry_is_keyed_by_model_type_and_refuses_unknown():
    vlm_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    assert [family_for(t).name for t in vlm_types] == list(vlm_types)
    with pytest.raises(ValueError, match="unsupported model_type 'llava'"):
        family_for("llava")
    vlms = [f for f in FAMILIES.values() if f.auto_class == "AutoModelForImageTextToText"]
    assert vlms and all(f.vision for f in vlms), "every VLM family names its vision tower (kept bf16)"
    assert family_for("llama").vision == () and family_for("qwen3").layers == "model.layers"


@pytest.mark.parametrize("family, writer", [("qwen2_vl", write_demo_qwen2_vl_snapshot),
                                             ("qwen3_vl", write_demo_qwen3_vl_snapshot)])
def test_vlm_family_end_to_end(tmp_path, family, writer):
    snapshot = writer(tmp_path / family)
    export = tmp_path / "export"
    wrong = run_cli(["quantize", f"arch.snapshot={snapshot}", f"calib.root={demo_coco_root()}",
                     f"export.dir={export}", f"log_root={tmp_path / 'logs'}"], cwd=tmp_path)
    assert wrong.rc == 2 and f"is a {family} model but arch.family is qwen2_5_vl" in wrong.stderr, describe(wrong)
    assert not export.exists()
    result = run_cli(["quantize", f"arch.snapshot={snapshot}", f"calib.root={demo_coco_root()}",
                      f"export.dir={export}", f"log_root={tmp_path / 'logs'}", f"arch.family={family}",
                      "export.formats=[compressed_tensors,modelopt_hf]", SMOOTHQUANT_RECIPE], cwd=tmp_path)
    assert result.rc == 0, describe(result)
    assert "DEMO" not in result.stderr
    verify = run_cli(["verify", str(export)], cwd=tmp_path)
    assert verify.rc == 0 and verify.stdout.startswith("OK"), describe(verify)

    image_path = sorted((demo_coco_root() / "val2017").glob("*.jpg"))[0]
    image = load_rgb(image_path, image_path.parent)
    reference, _, kind = load_any(snapshot, device="cpu")
    assert kind == "bf16"
    for fmt in ("modelopt_hf", "compressed_tensors"):
        model, processor, info = load_w8a8(export / fmt, device="cpu")
        assert info.family.name == family
        assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 14
        vision = [m for n, m in model.named_modules() if n.startswith("model.visual")]
        assert not any(isinstance(m, W8A8Linear) for m in vision)
        vision_linears = [m for m in vision if isinstance(m, torch.nn.Linear)]
        assert vision_linears and all(m.weight.dtype == torch.bfloat16 for m in vision_linears)
        assert_logits_close_to_bf16(model, reference, processor, "Write a haiku about the sea.")
        assert_logits_close_to_bf16(model, reference, processor, "Describe this image.", image)
        _, text_tokens = generate_text(model, processor, "Write a haiku about the sea.", max_new_tokens=4)
        _, image_tokens = generate_text(model, processor, "Describe this image.", image, max_new_tokens=4)
        assert text_tokens and image_tokens  # generate() runs on the W8A8 model, image prompts included


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_text_only_llm_end_to_end(tmp_path, family):
    import json

    from vlmq.models.demo import write_demo_text_snapshot

    snapshot = write_demo_text_snapshot(tmp_path / family, family)
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Tell me fact {i} about the sea.",
                                        "answer": f"The sea covers {i + 60} percent of something."}) + "\n"
                            for i in range(12)))
    export = tmp_path / "export"
    result = run_cli(["quantize", f"arch.snapshot={snapshot}", f"arch.family={family}", "calib.source=text_jsonl",
                      f"calib.root={data}", f"export.dir={export}", f"log_root={tmp_path / 'logs'}",
                      "export.formats=[compressed_tensors,modelopt_hf]", SMOOTHQUANT_RECIPE], cwd=tmp_path)
    assert result.rc == 0, describe(result)
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 12 and manifest["calibration"]["images"] == 0
    assert len(manifest["modules"]["quantized"]) == 14
    verify = run_cli(["verify", str(export)], cwd=tmp_path)
    assert verify.rc == 0, describe(verify)
    reference, _, kind = load_any(snapshot, device="cpu")
    assert kind == "bf16"
    for fmt in ("modelopt_hf", "compressed_tensors"):
        model, tokenizer, info = load_w8a8(export / fmt, device="cpu")
        assert info.family.name == family
        assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 14
        assert_logits_close_to_bf16(model, reference, tokenizer, "Write a haiku about the sea.")
        _, tokens = generate_text(model, tokenizer, "Write a haiku about the sea.", max_new_tokens=4)
        assert tokens  # generate() runs on the W8A8 model
