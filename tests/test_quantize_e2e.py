"""`vlmq quantize` end to end on the demo model, and export == ModelOpt fake-quant within rounding.

Everything here runs the real transformers model classes and the real ModelOpt (CPU); nothing is mocked.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import SMOOTHQUANT_RECIPE, describe, run_cli
from vlmq.export.manifest import MANIFEST_NAME, verify_hashes
from vlmq.models.families import QWEN_LINEARS, family_for

FAMILY = family_for("qwen2_5_vl")
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
GATE_UP = ("mlp.gate_proj", "mlp.up_proj")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            for key in fh.keys():
                out[key] = fh.get_tensor(key)
    return out


def ckpt_linear_prefixes(num_layers: int) -> list[str]:
    """LM linears in the checkpoint's key layout (`model.layers.{i}.<linear>`)."""
    return [f"{FAMILY.ckpt_language_model}.layers.{i}.{lin}" for i in range(num_layers) for lin in QWEN_LINEARS]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# 1. The CLI on the demo (one run per session, see conftest.demo_run)
# --------------------------------------------------------------------------------------------

def test_cli_exit_and_stdout_is_export_dir(demo_run):
    assert demo_run.result.rc == 0
    assert demo_run.result.stdout_lines[-1] == str(demo_run.export_dir)
    assert "Traceback" not in demo_run.result.stderr
    assert "DEMO" in demo_run.result.stderr  # the banner and the summary title say it is the demo model
    assert demo_run.manifest["demo"] is True


def test_every_lm_linear_is_int8_w8a8_with_smoothing(demo_run):
    config = json.loads((demo_run.modelopt_dir / "config.json").read_text())
    num_layers = config["text_config"]["num_hidden_layers"]
    tensors = read_tensors(demo_run.modelopt_dir)
    prefixes = ckpt_linear_prefixes(num_layers)
    assert len(prefixes) == 7 * num_layers >= 7
    for p in prefixes:
        w, ws, xs, pqs = (tensors.get(f"{p}.{n}") for n in ("weight", "weight_scale", "input_scale", "pre_quant_scale"))
        assert w is not None and ws is not None and xs is not None and pqs is not None, f"{p}: missing tensors"
        assert w.dtype == torch.int8 and w.dim() == 2, f"{p}.weight is {w.dtype}"
        assert ws.dtype == torch.float32 and ws.shape == (w.shape[0],), f"{p}.weight_scale {ws.dtype} {ws.shape}"
        assert xs.dtype == torch.float32 and xs.numel() == 1, f"{p}.input_scale {xs.dtype} {xs.shape}"
        assert pqs.is_floating_point() and pqs.shape == (w.shape[1],), f"{p}.pre_quant_scale {pqs.shape}"
        assert (ws > 0).all() and (xs > 0).all() and (pqs > 0).all() and torch.isfinite(pqs.float()).all()
        assert int(w.abs().max()) > 64, f"{p}: int8 weights do not use the range"  # amax/127 scaling
    # ModelOpt's export re-smooths layers that read the same input to one shared factor and scale.
    for i in range(num_layers):
        for group in (QKV, GATE_UP):
            keys = [f"{FAMILY.ckpt_language_model}.layers.{i}.{lin}" for lin in group]
            for name in ("pre_quant_scale", "input_scale"):
                first = tensors[f"{keys[0]}.{name}"]
                assert all(torch.equal(first, tensors[f"{k}.{name}"]) for k in keys[1:]), f"{keys} {name}"
    # Only those weights are int8, and nothing else carries quantization tensors.
    int8 = {k for k, t in tensors.items() if t.dtype == torch.int8}
    assert int8 == {f"{p}.weight" for p in prefixes}
    quant_suffixes = ("weight_scale", "input_scale", "pre_quant_scale")
    quant_keys = {k for k in tensors if k.rsplit(".", 1)[-1] in quant_suffixes}
    assert quant_keys == {f"{p}.{s}" for p in prefixes for s in quant_suffixes}


def test_vision_embeddings_and_lm_head_stay_floating_point(demo_run):
    tensors = read_tensors(demo_run.modelopt_dir)
    vision = [k for k in tensors if k.startswith(f"{FAMILY.ckpt_vision}.")]
    assert vision, "no vision tensors in the checkpoint"
    kept = vision + [k for k in tensors if "embed_tokens" in k or k.startswith("lm_head")]
    assert any("embed_tokens" in k for k in kept)
    for k in kept:
        assert tensors[k].dtype in (torch.bfloat16, torch.float16, torch.float32), f"{k} is {tensors[k].dtype}"
    # Same set of vision weights as the bf16 snapshot, same values.
    snapshot = read_tensors(demo_run.run_dir / "demo_snapshot")
    snap_vision = {k for k in snapshot if k.startswith(f"{FAMILY.ckpt_vision}.")}
    assert snap_vision == set(vision)
    for k in vision:
        assert torch.equal(snapshot[k], tensors[k]), f"{k} changed"


def test_quant_config_files(demo_run):
    hf_quant = json.loads((demo_run.modelopt_dir / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    excluded = " ".join(hf_quant["exclude_modules"])
    assert "lm_head" in excluded and "visual" in excluded
    qc = json.loads((demo_run.modelopt_dir / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt"
    assert qc["quant_algo"] == "W8A8_SQ_PER_CHANNEL"


def test_export_is_self_contained_processor(demo_run):
    from PIL import Image
    from transformers import AutoProcessor, GenerationConfig

    from vlmq.calib import demo_coco_root

    for name in ("chat_template.jinja", "generation_config.json", "tokenizer_config.json"):
        assert (demo_run.modelopt_dir / name).is_file(), name
    processor = AutoProcessor.from_pretrained(demo_run.modelopt_dir)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?" in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    image = Image.open(next((demo_coco_root() / "val2017").glob("*.jpg"))).convert("RGB")
    batch = processor(text=[text], images=[image], return_tensors="pt")
    assert (batch["input_ids"] == processor.image_token_id).sum() > 1 and "pixel_values" in batch
    gen = GenerationConfig.from_pretrained(demo_run.modelopt_dir)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in eos


def test_manifest_hashes(demo_run):
    root = demo_run.export_dir
    assert verify_hashes(root) == []
    recorded = demo_run.manifest["files"]
    on_disk = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}
    assert set(recorded) == set(on_disk)
    assert "modelopt_hf/model.safetensors" in recorded or any(k.endswith(".safetensors") for k in recorded)
    for rel, path in on_disk.items():
        assert recorded[rel]["sha256"] == sha256(path), rel
        assert recorded[rel]["bytes"] == path.stat().st_size, rel
    assert not [p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.")], "staging dirs left"


def test_manifest_hashes_detect_tampering(demo_run, tmp_path):
    import shutil

    copy_dir = tmp_path / "export"
    shutil.copytree(demo_run.export_dir, copy_dir)
    cfg = copy_dir / "modelopt_hf" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    assert verify_hashes(copy_dir) == ["sha256 mismatch modelopt_hf/config.json"]


def test_manifest_contents(demo_run):
    m = demo_run.manifest
    assert "quantize" in m["command_line"] and "run_name=x" in m["command_line"]
    assert m["config"]["run_name"] == "x" and m["config"]["quant"]["alpha"] == pytest.approx(0.5)
    assert m["config"]["export"]["dir"] == str(demo_run.export_dir)
    for pkg in ("torch", "transformers", "nvidia-modelopt", "python"):
        assert m["versions"][pkg] not in ("", "not installed"), pkg
    cal = m["calibration"]
    assert cal["samples"] > 0 and cal["images"] > 0 and cal["tokens"] > cal["samples"]
    assert isinstance(cal["skipped"], dict) and sum(cal["skipped"].values()) == 0  # the demo set is clean
    for stage in ("prepare", "load", "calibrate_quantize"):
        assert m["timings_s"][stage] >= 0, stage
    assert m["peak_memory"]["cpu_max_rss_gib"] > 0
    num_layers = json.loads((demo_run.modelopt_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]
    assert len(m["modules"]["quantized"]) == 7 * num_layers
    assert not any("visual" in n or "lm_head" in n or "embed" in n for n in m["modules"]["quantized"])
    assert m["exports"]["modelopt_hf"]["quant_algo"] == "W8A8_SQ_PER_CHANNEL"
    # export.dtype=auto on a VLM: the vision tower keeps the snapshot's bf16, whatever the peaks allow
    chosen = m["checkpoint_dtype"]
    assert chosen["dtype"] == "bfloat16" and "vision tower" in chosen["reason"], chosen
    assert chosen["peak"] > 0 and chosen["where"], chosen


def test_manifest_calibration_counts_every_sample(demo_run):
    """Stats cover every chunk the forward loop ran, not just the last one (regression)."""
    cal = demo_run.manifest["calibration"]
    forwarded = cal["batch_size"]["samples"]  # samples the forward loop ran through the model
    assert forwarded > cal["batch_size"]["batch_size_start"]  # more than one chunk, or the check is moot
    assert cal["samples"] == forwarded
    assert cal["images"] == forwarded  # the demo set is image+caption only


def test_run_dir_has_log_and_manifest(demo_run):
    assert demo_run.run_dir == demo_run.log_root / "x"
    log = (demo_run.run_dir / "quantize.log").read_text()
    for stage in ("prepare", "load", "calibrate_quantize", "export"):
        assert f"stage {stage}: start" in log, stage
    assert "ERROR" not in log
    run_manifest = json.loads((demo_run.run_dir / "manifest.json").read_text())
    assert run_manifest["files"] == demo_run.manifest["files"]
    # Nothing was written into the working directory's default models/ or tmp/ trees.
    assert not (demo_run.workdir / "models").exists() and not (demo_run.workdir / "tmp").exists()


# --------------------------------------------------------------------------------------------
# 2. Rebuilding each quantized linear from the exported tensors == ModelOpt's fake quant
# --------------------------------------------------------------------------------------------

# ModelOpt's fake quant rounds W * (127/amax) while its export rounds W / (amax/127); the two differ
# by one int8 step on a few elements in 10^4 (ties after bf16 -> fp32). Such one-step flips are
# "rounding" too: they are counted, bounded (< MAX_FLIP_FRACTION) and given an allowance of one step.
MAX_FLIP_FRACTION = 2e-3

# bf16 keeps 8 significant bits: round-to-nearest is off by at most u = 2^-8 of the value.
BF16_U = 2.0**-8

# Output tolerance, relative to sum_k |x̂_k| |Ŵ_jk| (+|b_j|) per output element: ModelOpt's fake quant
# runs in bf16 -- x̂ = q_x*s_x and Ŵ = q_w*s_w are each rounded to bf16 (u each) and the bf16 GEMM
# output is rounded again (u of |y| <= u of that sum) -- while the rebuild is fp32 throughout, so the
# worst case is 3u ≈ 0.012 of that sum (typical here: ~0.002). A wrong scale convention or a missing
# pre_quant_scale is off by O(1) of the same sum, >= 30x this tolerance (negative controls below).
REL_TOL = 3 * BF16_U


def rebuild_linear(x: torch.Tensor, t: dict[str, torch.Tensor], use_pre_quant_scale: bool = True):
    """y = dequant(quant(x * pre_quant_scale)) @ dequant(W_int8).T + b, from exported tensors only."""
    xs = x * t["pre_quant_scale"] if use_pre_quant_scale else x  # bf16 product, as ModelOpt applies it
    xq = torch.clamp(torch.round(xs.float() / t["input_scale"]), -128, 127)  # input_scale = amax / 127
    x_hat = xq * t["input_scale"]
    w_hat = t["weight"].float() * t["weight_scale"][:, None]
    y = x_hat @ w_hat.T
    if "bias" in t:
        y = y + t["bias"].float()
    return y, x_hat, w_hat


def int8_steps(exact: torch.Tensor, fake: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|exact - fake| in units of the quantization step (scale broadcasts over exact)."""
    return (exact - fake.float()).abs() / scale


@pytest.fixture(scope="module")
def quantized_and_exported(tmp_path_factory):
    """Demo model -> ModelOpt SmoothQuant over demo COCO batches -> export; plus references.

    ModelOpt's export re-smooths q/k/v and gate/up to shared pre_quant_scales (and re-derives those
    weights' scales) on the live model, then replaces its weights by int8. The fake-quant reference is
    therefore a deep copy re-smoothed by ModelOpt's own `requantize_resmooth_fused_llm_layers`, the
    step the export runs first; the tests check that its factors equal the exported ones bit for bit.
    """
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    from vlmq.calib import demo_coco_root, load_coco_captions
    from vlmq.calib.batches import make_batches
    from vlmq.config import load_config
    from vlmq.export.modelopt_hf import modelopt_reference_export
    from vlmq.models.demo import build_demo_model, build_demo_processor
    from vlmq.models.families import quantized_linear_names
    from vlmq.quantize.steps import quantize_lm

    cfg = load_config([SMOOTHQUANT_RECIPE])   # ModelOpt's export carries neither rotations nor GPTQ
    model, processor = build_demo_model(), build_demo_processor()
    samples, stats = load_coco_captions(demo_coco_root(), ["val2017"], 16, 0, cfg.calib.instruction, 1)
    batches = make_batches(processor, samples, 4, 512, stats)
    assert len(batches) >= 2 and all("pixel_values" in b for b in batches)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                m(**batch, use_cache=False)

    model, _ = quantize_lm(model, FAMILY, cfg.quant, forward_loop)
    names = quantized_linear_names(FAMILY, len(model.get_submodule(FAMILY.layers)))

    # Real activations of every LM linear (image tokens included) from a calibration batch.
    inputs: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(_module, args, _output) -> None:  # returns None: the output is left alone
            inputs.setdefault(name, args[0].detach().clone())
        return hook

    handles = [model.get_submodule(n).register_forward_hook(capture(n)) for n in names]
    with torch.no_grad():
        model(**batches[-1], use_cache=False)
    for h in handles:
        h.remove()

    reference = copy.deepcopy(model)
    requantize_resmooth_fused_llm_layers(reference)
    out_dir = tmp_path_factory.mktemp("inproc_export") / "modelopt_hf"
    modelopt_reference_export(model, processor, out_dir)
    return {"names": names, "inputs": inputs, "reference": reference, "tensors": read_tensors(out_dir)}


def _layer_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    key = name.replace(f"{FAMILY.language_model}.", f"{FAMILY.ckpt_language_model}.", 1)
    return {s: tensors[f"{key}.{s}"] for s in ("weight", "weight_scale", "input_scale", "pre_quant_scale", "bias")
            if f"{key}.{s}" in tensors}


def test_exported_scales_and_weights_match_modelopt(quantized_and_exported):
    """Exported factors == the re-smoothed reference's; input_scale = amax/127; int8 W == fake-quant W."""
    ref, tensors = quantized_and_exported["reference"], quantized_and_exported["tensors"]
    for name in quantized_and_exported["names"]:
        module, t = ref.get_submodule(name), _layer_tensors(tensors, name)
        assert torch.equal(module.input_quantizer.pre_quant_scale, t["pre_quant_scale"]), name
        assert torch.equal(module.input_quantizer.amax.float().reshape(()) / 127.0, t["input_scale"].reshape(())), name
        assert torch.equal(module.weight_quantizer.amax.float().reshape(-1) / 127.0, t["weight_scale"]), name
        with torch.no_grad():
            w_fq = module.weight_quantizer(module.weight)
        w_hat = t["weight"].float() * t["weight_scale"][:, None]
        steps = int8_steps(w_hat, w_fq, t["weight_scale"][:, None])
        flips = steps > 0.5
        assert float(flips.float().mean()) < MAX_FLIP_FRACTION, f"{name}: {int(flips.sum())} weights off by a step"
        assert float(steps.max()) <= 1.5, f"{name}: an exported weight is {float(steps.max()):.2f} steps off"
        # Elsewhere the only difference is the bf16 rounding of the fake-quantized weight.
        rel = ((w_hat - w_fq.float()).abs() / w_hat.abs().clamp_min(1e-30))[~flips & (t["weight"] != 0)]
        assert float(rel.max()) <= BF16_U * (1 + 1e-3), f"{name}: {float(rel.max()):.3g}"


def test_rebuilt_linears_match_fake_quant(quantized_and_exported):
    ref, tensors, inputs = (quantized_and_exported[k] for k in ("reference", "tensors", "inputs"))
    for name in quantized_and_exported["names"]:
        module, t, x = ref.get_submodule(name), _layer_tensors(tensors, name), inputs[name]
        assert x.dtype == torch.bfloat16 and x.abs().max() > 0
        with torch.no_grad():
            y_fq = module(x).float()
            x_fq = module.input_quantizer(x)  # ModelOpt's own x̂ (pre_quant_scale applied inside)
            w_fq = module.weight_quantizer(module.weight)
        y, x_hat, w_hat = rebuild_linear(x, t)
        assert (x_hat / t["input_scale"]).abs().max() >= 16, f"{name}: activations barely use the int8 range"
        # One-step tie flips between ModelOpt's fake quant and the integer rebuild (see MAX_FLIP_FRACTION).
        x_flips = int8_steps(x_hat, x_fq, t["input_scale"]) > 0.5
        w_flips = int8_steps(w_hat, w_fq, t["weight_scale"][:, None]) > 0.5
        assert float(x_flips.float().mean()) < MAX_FLIP_FRACTION, f"{name}: {int(x_flips.sum())} activation flips"
        bound = x_hat.abs() @ w_hat.abs().T + (t["bias"].float().abs() if "bias" in t else 0)
        allowance = ((x_flips * t["input_scale"]) @ w_hat.abs().T
                     + x_hat.abs() @ (w_flips * t["weight_scale"][:, None]).T)
        err = (y_fq - y).abs()
        worst = float(((err - allowance).clamp_min(0) / bound.clamp_min(1e-12)).max())
        assert worst <= REL_TOL, f"{name}: max error {worst:.4g} of sum|x||w| > {REL_TOL}"
        # Negative controls: the same comparison rejects plausible misreadings of the export.
        for label, wrong in (
            ("without pre_quant_scale", rebuild_linear(x, t, use_pre_quant_scale=False)[0]),
            ("input_scale read as amax", rebuild_linear(x, {**t, "input_scale": t["input_scale"] * 127})[0]),
        ):
            wrong_err = float((((y_fq - wrong).abs() - allowance).clamp_min(0) / bound.clamp_min(1e-12)).max())
            assert wrong_err > 10 * REL_TOL, f"{name}: rebuild {label} is indistinguishable ({wrong_err:.3g})"


def test_fp32_quantization_writes_the_snapshots_bf16(tmp_path):
    """arch.dtype=float32 (rotation, calibration and rounding in fp32) with export.dtype=auto: the checkpoint's
    float tensors and config are the bf16 snapshot's dtype, the vision tower's bytes are the snapshot's, and
    vlmq's runtime loads it; export.dtype=float32 keeps fp32."""
    from vlmq.runtime.loader import load_w8a8

    dirs = {}
    for name, extra in (("auto", []), ("fp32", ["export.dtype=float32"])):
        dirs[name] = tmp_path / name
        result = run_cli(["quantize", f"log_root={tmp_path / 'logs'}", f"export.dir={dirs[name]}", f"run_name={name}",
                          "arch.dtype=float32", "export.score=false", *extra], cwd=tmp_path)
        assert result.rc == 0, describe(result)
    auto, fp32 = (read_tensors(dirs[n] / "compressed_tensors") for n in ("auto", "fp32"))
    snapshot = read_tensors(tmp_path / "logs" / "auto" / "demo_snapshot")
    floats = [k for k, t in auto.items() if t.is_floating_point() and not k.endswith(("_scale",))]
    assert floats and all(auto[k].dtype == torch.bfloat16 for k in floats)
    assert all(fp32[k].dtype == torch.float32 for k in floats)
    assert all(auto[k].dtype == torch.float32 for k in auto if k.endswith("weight_scale"))
    # the merger's last linear is rotated into the residual stream (R1); the rest of the tower is untouched
    vision = [k for k in snapshot if k.startswith(f"{FAMILY.ckpt_vision}.") and ".merger.mlp.2." not in k]
    changed = [k for k in vision if not torch.equal(snapshot[k], auto[k])]
    assert vision and not changed, changed[:5]
    config = json.loads((dirs["auto"] / "compressed_tensors" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["text_config"]["dtype"] == "bfloat16"
    _, _, loaded = load_w8a8(dirs["auto"] / "compressed_tensors", "cpu")
    assert len(loaded.quantized) == len(ckpt_linear_prefixes(2))
