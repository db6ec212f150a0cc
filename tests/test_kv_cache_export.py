"""`quant.kv_cache=fp8` reaches the deployable export: compressed-tensors' `kv_cache_scheme` and a calibrated
per-layer `self_attn.k_scale` / `v_scale` (equal to ModelOpt's own exporter's: tests/test_modelopt_layout.py);
vlmq's runtime loads the checkpoint (and ignores the scales), and real vLLM (CPU build) runs an FP8 KV cache
with them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SMOOTHQUANT_RECIPE, describe, run_cli
from vlmq.cpu import cpu_flags
from vlmq.runtime.loader import CheckpointError, inspect_checkpoint, load_w8a8

KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("kv_fp8")
    export = work / "export"
    result = run_cli(["quantize", "quant.kv_cache=fp8", "export.formats=[compressed_tensors,modelopt_hf]",
                      SMOOTHQUANT_RECIPE, f"export.dir={export}", f"log_root={work / 'logs'}", "run_name=x"], cwd=work)
    assert result.rc == 0, describe(result)
    return export


def num_layers(ckpt: Path) -> int:
    config = json.loads((ckpt / "config.json").read_text())
    return int(config.get("text_config", config)["num_hidden_layers"])


def test_fp8_kv_cache_reaches_compressed_tensors(fp8_export: Path):
    ct, mo = fp8_export / "compressed_tensors", fp8_export / "modelopt_hf"
    qcfg = json.loads((ct / "config.json").read_text())["quantization_config"]
    scheme = qcfg.get("kv_cache_scheme")
    assert scheme is not None, qcfg
    assert {k: scheme.get(k) for k in KV_SCHEME} == KV_SCHEME
    tensors, reference = load_file(ct / "model.safetensors"), load_file(mo / "model.safetensors")
    layers = num_layers(ct)
    assert layers >= 2
    stored = sorted(k for k in tensors if k.endswith(("k_scale", "v_scale")))
    assert stored == sorted(f"model.layers.{i}.self_attn.{kv}_scale" for i in range(layers) for kv in "kv")
    for i in range(layers):
        for kv in "kv":
            scale = tensors[f"model.layers.{i}.self_attn.{kv}_scale"]
            assert scale.dtype == torch.float32 and scale.shape == (1,)
            assert float(scale) > 0
            # modelopt_hf (the same state in ModelOpt's layout): the same value under ModelOpt's name
            modelopt = reference[f"model.layers.{i}.self_attn.{kv}_proj.{kv}_scale"]
            assert float(scale) == float(modelopt), (i, kv, scale, modelopt)
    manifest = json.loads((fp8_export / "manifest.json").read_text())
    assert manifest["exports"]["compressed_tensors"]["kv_cache"] == "fp8"


def test_default_export_has_no_kv_cache_scheme(demo_run):
    ct = demo_run.export_dir / "compressed_tensors"
    assert json.loads((ct / "config.json").read_text())["quantization_config"].get("kv_cache_scheme") is None
    assert not [k for k in load_file(ct / "model.safetensors") if k.endswith(("k_scale", "v_scale"))]


def test_runtime_loads_fp8_kv_export_and_checks_its_scales(fp8_export: Path, tmp_path: Path):
    for fmt in ("compressed_tensors", "modelopt_hf"):
        model, _, info = load_w8a8(fp8_export / fmt, device="cpu")
        assert info.kv_cache == "fp8" and info.warnings == []
        ids = torch.tensor([[1, 2, 3, 4]])
        assert torch.isfinite(model(input_ids=ids).logits).all()
        del model
    assert run_cli(["verify", str(fp8_export)], cwd=tmp_path).rc == 0

    # Scales the config does not ask for, or a layer's scale missing: refused, one line.
    ckpt = tmp_path / "ct"
    shutil.copytree(fp8_export / "compressed_tensors", ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]["kv_cache_scheme"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="KV-cache scale model.layers.0.self_attn.k_scale present but config"):
        inspect_checkpoint(ckpt)
    shutil.copy(fp8_export / "compressed_tensors" / "config.json", ckpt / "config.json")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"3 k/v scales are stored for 2 decoder layers \(expected 4\)"):
        inspect_checkpoint(ckpt)


VLLM_KV_PROBE = '''
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from vllm import LLM, SamplingParams

def scales(model):
    return {n: [m._k_scale_float, m._v_scale_float] for n, m in model.named_modules() if hasattr(m, "_k_scale_float")}

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], max_model_len=512, limit_mm_per_prompt={"image": 1}, enforce_eager=True)
    text = llm.generate(["Describe a cat."], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].text
    report = {"cache_dtype": llm.llm_engine.vllm_config.cache_config.cache_dtype,
              "scales": llm.apply_model(scales)[0], "text": text}
    open(sys.argv[2], "w").write(json.dumps(report))
'''


@pytest.mark.slow
@pytest.mark.skipif(not cpu_flags() & {"avx512f", "amx_tile"},
                    reason="vLLM CPU runs an FP8 KV cache only on x86 with AVX-512 or AMX (it raises "
                           "NotImplementedError otherwise); this CPU has neither")
def test_vllm_runs_fp8_kv_cache_with_the_exported_scales(fp8_export: Path, vllm_python: Path, tmp_path: Path):
    ckpt = fp8_export / "compressed_tensors"
    script, out = tmp_path / "probe.py", tmp_path / "out.json"
    script.write_text(VLLM_KV_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    proc = subprocess.run([str(vllm_python), str(script), str(ckpt), str(out)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-6000:]
    report = json.loads(out.read_text())
    assert report["cache_dtype"].startswith("fp8"), report   # kv_cache_dtype=auto took the checkpoint's scheme
    tensors = load_file(ckpt / "model.safetensors")
    layers = num_layers(ckpt)
    expected = {f"language_model.model.layers.{i}.self_attn.attn":
                [float(tensors[f"model.layers.{i}.self_attn.{kv}_scale"]) for kv in "kv"] for i in range(layers)}
    assert report["scales"] == expected, report["scales"]   # fp32 values, loaded as they are
