"""A family registered from outside vlmq, whose modules have other names than any built-in family
(tests/renamed_llama.py: blocks.N.attn.wq/wk/wv/wo, ffn.w1/w3/w2, attn_norm/ffn_norm, ln_f), quantized
by the default recipe (rotate, calibrate, smooth, gptq, round) with the alpha search, exported as
compressed-tensors and run on vlmq's runtime and lean decode loop. Everything that walks the layers reads
the registered Family: nothing spells Llama's names for it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vlmq
from renamed_llama import MODEL_TYPE, registered, write_snapshot
from vlmq.bench import quantize_language_model
from vlmq.models.families import FAMILIES, Family, FamilyError, SmoothGroup, quantized_linear_names, register
from vlmq.quantize.alpha_search import layer_groups
from vlmq.quantize.sensitivity import Sensitivity, choose_fallback, fused_siblings, rank_linears
from vlmq.runtime.decode import LeanDecodeError, LeanDecoder
from vlmq.runtime.generate import chat_inputs, generate_text
from vlmq.runtime.layout import layer_roles
from vlmq.runtime.linear import W8A8Linear

LINEARS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w1", "ffn.w3", "ffn.w2")
QKV, GATE_UP = ("attn.wq", "attn.wk", "attn.wv"), ("ffn.w1", "ffn.w3")
RENAMED = Family(
    name="renamed_llama", model_types=(MODEL_TYPE,), architectures=("RenamedLlamaForCausalLM",),
    language_model="model", layers="model.blocks", vision=(), keep_bf16=("model.embed_tokens", "lm_head"),
    linears=LINEARS,
    smooth_groups=(SmoothGroup("attn_norm", QKV, "norm"), SmoothGroup("ffn_norm", GATE_UP, "norm"),
                   SmoothGroup("ffn.w3", ("ffn.w2",), "linear_rows"), SmoothGroup("attn.wv", ("attn.wo",), "attn_v")),
    ckpt_language_model="model", ckpt_vision="", auto_class="AutoModelForCausalLM", embed="model.embed_tokens",
    final_norm="model.ln_f", lm_head="lm_head", residual_writers=("attn.wo", "ffn.w2"), fused=(QKV, GATE_UP),
    rotary_emb="model.rotary_emb",
)
LAYERS = 2
# W8A8 logits against the bf16 snapshot's on a chat, every position (as tests/test_families.py: an intact export
# of these tiny random models gives >= 0.999; a zeroed weight scale falls well below)
MIN_LOGIT_COSINE = 0.995
N_NEW = 6
PROMPT = "Write a haiku about the sea."


def records(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Tell me fact {i} about the {topic}.", "answer": f"The {topic} covers {i + 60} percent of it."}
            for i, topic in zip(range(n), ["sea", "sky", "forest", "desert"] * n, strict=False)]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    with registered():
        register(RENAMED)
        try:
            yield write_snapshot(tmp_path_factory.mktemp("renamed") / "snapshot", seed=0)
        finally:
            FAMILIES.pop(MODEL_TYPE, None)


@pytest.fixture(scope="module")
def quantized(snapshot):
    return vlmq.quantize(snapshot, recipe={"alpha_search": True}, calib=records(16),
                         overrides={"device": "cpu", "calib.num_samples": 10, "quant.kl_samples": 6})


@pytest.fixture(scope="module")
def export(quantized, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("renamed_export") / "w8a8"
    quantized.export(out, formats=["compressed_tensors"])
    return out


def names(*relative: str, layer: int) -> list[str]:
    return [f"{RENAMED.layers}.{layer}.{r}" for r in relative]


def test_the_structure_is_read_from_the_family():
    assert RENAMED.shared_inputs == (QKV, ("attn.wo",), GATE_UP, ("ffn.w2",))
    every = quantized_linear_names(RENAMED, LAYERS)
    assert layer_groups(RENAMED, LAYERS, every)[:4] == [names(*QKV, layer=0), names("attn.wo", layer=0),
                                                        names(*GATE_UP, layer=0), names("ffn.w2", layer=0)]
    assert fused_siblings("model.blocks.1.attn.wk", RENAMED) == names(*QKV, layer=1)
    assert fused_siblings("model.blocks.1.ffn.w3", RENAMED) == names(*GATE_UP, layer=1)
    assert fused_siblings("model.blocks.1.ffn.w2", RENAMED) == ["model.blocks.1.ffn.w2"]
    roles = layer_roles(RENAMED)
    assert (roles.ln1, roles.qkv, roles.o, roles.ln2, roles.gate_up, roles.down) == \
        ("attn_norm", QKV, "attn.wo", "ffn_norm", GATE_UP, "ffn.w2")


def test_a_family_that_names_no_linear_is_refused_and_not_registered():
    bad = dataclasses.replace(RENAMED, name="typo", model_types=("vlmq_typo",),
                              fused=(("attn.wq", "attn.wk", "attn.wx"),))
    with pytest.raises(FamilyError, match="family typo: fused names 'attn.wx', which is not one of its linears"):
        register(bad)
    # the residual writers' default is Llama's names: a family with others must map its own
    bad = dataclasses.replace(bad, fused=(), residual_writers=Family.residual_writers)
    with pytest.raises(FamilyError, match="residual_writers names 'self_attn.o_proj'"):
        register(bad)
    assert "vlmq_typo" not in FAMILIES


def test_the_lean_loop_refuses_a_family_without_the_structure_it_runs():
    with pytest.raises(LeanDecodeError, match="needs the q/k/v linears as one fused group ending in attn.wv"):
        layer_roles(dataclasses.replace(RENAMED, fused=()))
    with pytest.raises(LeanDecodeError, match="needs the v -> o and up -> down pairs"):
        layer_roles(dataclasses.replace(RENAMED, smooth_groups=RENAMED.smooth_groups[:2]))


def test_the_lean_loop_refuses_layers_with_weights_it_does_not_run(tmp_path):
    from transformers import AutoModelForCausalLM

    from vlmq.models.demo import write_demo_text_snapshot

    model = AutoModelForCausalLM.from_pretrained(write_demo_text_snapshot(tmp_path / "qwen3", "qwen3"))
    with pytest.raises(LeanDecodeError, match=r"model\.layers\.0\.self_attn\.q_norm has weights that the lean "
                                              "decode loop does not run"):
        LeanDecoder(model, 1, 64, graphs=False, fused_ops=False)


def test_default_recipe_quantizes_the_renamed_layers(quantized):
    assert list(quantized.cfg.quant.steps) == ["rotate", "calibrate", "smooth", "gptq", "round"]
    state = quantized.state
    assert state.rounding == "gptq" and state.rotations["residual"]
    assert sorted(state.rotations["input_hadamards"]) == names("ffn.w2", layer=0) + names("ffn.w2", layer=1)
    assert sorted(state.linears) == sorted(quantized_linear_names(RENAMED, LAYERS))
    assert quantized.audit.quantized == quantized_linear_names(RENAMED, LAYERS)
    # the alpha search scored the family's shared-input groups: q/k/v and w1/w3 each took one alpha
    groups = [g["members"] for g in quantized.lmq.search.groups]
    assert groups == [names(*group, layer=layer) for layer in range(LAYERS)
                      for group in (QKV, ("attn.wo",), GATE_UP, ("ffn.w2",))]
    for layer in range(LAYERS):
        for group in (QKV, GATE_UP):
            assert len({quantized.lmq.alphas[n] for n in names(*group, layer=layer)}) == 1
    # the R1 rotation folded the final norm's gain into an untied lm_head
    assert torch.equal(quantized.model.get_submodule(RENAMED.final_norm).weight,
                       torch.ones_like(quantized.model.get_submodule(RENAMED.final_norm).weight))


def test_fallback_keeps_a_fused_group_bf16_whole(quantized):
    model, probe = quantized.model, quantized.probe
    sens = rank_linears(model, quantized_linear_names(RENAMED, LAYERS), probe)
    first = "model.blocks.1.attn.wk"
    ranking = [(first, 0.0)] + [r for r in sens.ranking if r[0] != first]
    fallback = choose_fallback(model, Sensitivity(ranking, sens.floor, sens.full), probe, sens.full * (1 - 1e-6),
                               RENAMED)
    assert fallback.steps[1] == {"bf16": 3, "added": first, "kl": fallback.steps[1]["kl"]}
    assert fallback.exclude[:3] == names(*QKV, layer=1)
    for name in fallback.exclude:
        assert set(fused_siblings(name, RENAMED)) <= set(fallback.exclude)
    assert probe.kl(model) == pytest.approx(sens.full)   # the quantizers were turned back on


def test_max_kl_keeps_fused_groups_bf16_through_export_and_load(snapshot, quantized, tmp_path):
    """`quant.max_kl` below the quantized model's KL: the pipeline's fallback keeps linears bf16 in whole fused
    groups, re-quantizes the rest, and the export loads with exactly those linears as nn.Linear."""
    max_kl = 0.9 * quantized.probe.kl(quantized.model)
    q = vlmq.quantize(snapshot, recipe={"alpha_search": True, "max_kl": max_kl}, calib=records(16),
                      overrides={"device": "cpu", "calib.num_samples": 10, "quant.kl_samples": 6})
    exclude = q.fallback_report["fallback_bf16"]
    assert exclude and q.fallback_report["kl_final"] <= max_kl
    for name in exclude:
        assert set(fused_siblings(name, RENAMED)) <= set(exclude)
    q.export(tmp_path / "w8a8", formats=["compressed_tensors"])
    model, _ = vlmq.load(tmp_path / "w8a8" / "compressed_tensors", device="cpu")
    linears = quantized_linear_names(RENAMED, LAYERS)
    assert sorted(n for n in linears if type(model.get_submodule(n)) is torch.nn.Linear) == sorted(exclude)


def test_export_loads_and_runs_like_the_bf16_model(snapshot, export):
    from transformers import AutoModelForCausalLM

    checkpoint = export / "compressed_tensors"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE and config["tie_word_embeddings"] is False
    hadamard = config["quantization_config"]["transform_config"]["config_groups"]["R4"]["apply"][0]["targets"]
    assert hadamard == [r"re:.*\.blocks\.\d+\.ffn\.w2$"]
    with safe_open(str(next(checkpoint.glob("*.safetensors"))), "pt") as fh:
        int8 = sorted(k for k in fh.keys() if fh.get_slice(k).get_dtype() == "I8")
    assert int8 == sorted(f"{n}.weight" for n in quantized_linear_names(RENAMED, LAYERS))

    model, tokenizer = vlmq.load(checkpoint, device="cpu")
    w8a8 = sorted(n for n, m in model.named_modules() if isinstance(m, W8A8Linear))
    assert w8a8 == sorted(quantized_linear_names(RENAMED, LAYERS))
    downs = names("ffn.w2", layer=0) + names("ffn.w2", layer=1)
    assert [model.get_submodule(n).input_hadamard for n in downs] == [128, 128]
    reference = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.bfloat16).eval()
    inputs = chat_inputs(tokenizer, PROMPT)
    with torch.no_grad():
        got, want = model(**inputs).logits[0].float(), reference(**inputs).logits[0].float()
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cosine.min() >= MIN_LOGIT_COSINE, f"logit cosine vs bf16 min {cosine.min():.4f}"
    _, tokens = generate_text(model, tokenizer, PROMPT, max_new_tokens=4)
    assert len(tokens) == 4
    assert_lean_matches_generate(model, inputs, tol=2e-2)


def test_a_text_models_export_is_float16_where_its_peaks_allow(export):
    """export.dtype=auto on a bf16 text model whose calibrated activations are small: float16 checkpoint and
    config, the manifest says why, and vlmq's runtime runs it in float16 (as vLLM's dtype="auto" would)."""
    checkpoint = export / "compressed_tensors"
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["dtype"] == "float16", config.get("dtype")
    chosen = json.loads((export / "manifest.json").read_text())["checkpoint_dtype"]
    assert chosen["dtype"] == "float16" and chosen["reason"].startswith("float16: peak"), chosen
    assert 0 < chosen["peak"] * chosen["fp16_headroom"] <= 65504, chosen
    with safe_open(str(next(checkpoint.glob("*.safetensors"))), "pt") as fh:
        floats = {fh.get_slice(k).get_dtype() for k in fh.keys() if not k.endswith("_scale")} - {"I8"}
    assert floats == {"F16"}, floats
    model, _ = vlmq.load(checkpoint, device="cpu")
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float16}


def test_bench_quantizes_the_family_linears_and_the_lean_loop_runs_them(snapshot):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32).eval()
    assert quantize_language_model(model) == quantized_linear_names(RENAMED, LAYERS)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.ln_f).__name__ == "LlamaRMSNorm"
    tokenizer = vlmq.load(snapshot, device="cpu")[1]
    assert_lean_matches_generate(model, chat_inputs(tokenizer, PROMPT), tol=1e-4)


def assert_lean_matches_generate(model, inputs: dict, tol: float) -> None:
    """The lean loop's greedy tokens and logits equal transformers' generate on the same model."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=N_NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, eos_token_id=None)
    ref_tokens, ref_logits = out.sequences[0, inputs["input_ids"].shape[1]:], torch.stack(out.logits, 1)[0].float()
    dec = LeanDecoder(model, 1, 128, graphs=False, fused_ops=False)
    dec.prefill(**inputs)
    logits = [dec.logits[0].clone()]
    for _ in range(N_NEW - 1):
        dec.step()
        logits.append(dec.logits[0].clone())
    assert torch.equal(dec.tokens[0, :N_NEW], ref_tokens)
    rel = float((torch.stack(logits) - ref_logits).norm() / ref_logits.norm())
    assert rel < tol, f"lean loop logits vs generate: relative error {rel:.3g}"
