"""The Python API (vlmq.api): arguments are config, exports are the CLI's, bad input is a one-line error.

Real parts throughout: Hydra composes the config, ModelOpt calibrates the demo model, the export is read back by
safetensors and loaded by vlmq's runtime; the CLI export it is compared with is conftest's `demo_run`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import vlmq
from vlmq.api import as_overrides, config_for
from vlmq.calib import CalibDataError, demo_coco_root
from vlmq.config import CalibConfig, CalibMixPart, ConfigError, QuantConfig, load_config
from vlmq.export.atomic import ExportError
from vlmq.models.load import SnapshotError
from vlmq.runtime.loader import CheckpointError

SMOOTHQUANT_STEPS = ["calibrate", "smooth", "round"]   # conftest.SMOOTHQUANT_RECIPE, as a list


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fh:
            out.update({key: fh.get_tensor(key) for key in fh.keys()})
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} of {len(ta)} tensors differ, e.g. {different[:3]}"


def quantization_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())["quantization_config"]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text.strip() and "\n" not in text, repr(text)
    return text


def same_config(api_cfg, cli_overrides: list[str]) -> None:
    expected = load_config(cli_overrides).to_dict()
    got = api_cfg.to_dict()
    expected.pop("overrides"), got.pop("overrides")
    assert got == expected


# --------------------------------------------------------------------------------------------
# Every argument is config
# --------------------------------------------------------------------------------------------

def test_model_recipe_calib_and_overrides_are_the_cli_overrides(tmp_path):
    calib_file = tmp_path / "calib.jsonl"
    calib_file.write_text('{"text": "hello"}\n')
    same_config(config_for("demo"), ["demo=on"])
    same_config(config_for("demo", recipe={"alpha": 0.8, "steps": ["calibrate", "round"]}),
                ["demo=on", "quant.alpha=0.8", "quant.steps=[calibrate,round]"])
    same_config(config_for("demo", recipe="w8a8_int8_sq"), ["demo=on", "quant=w8a8_int8_sq"])
    same_config(config_for("demo", recipe=["calibrate", "round"]), ["demo=on", "quant.steps=[calibrate,round]"])
    same_config(config_for("demo", calib=calib_file), ["demo=on", f"calib.root={calib_file}", "calib.source=jsonl"])
    same_config(config_for("demo", calib=tmp_path, overrides={"calib.num_samples": 64, "quant.max_kl": None}),
                ["demo=on", f"calib.root={tmp_path}", "calib.num_samples=64", "quant.max_kl=null"])
    same_config(config_for("demo", overrides=["calib.num_samples=64", "export.formats=[modelopt_hf]",
                                               "quant.steps=[calibrate,smooth,round]"]),
                ["demo=on", "calib.num_samples=64", "export.formats=[modelopt_hf]",
                 "quant.steps=[calibrate,smooth,round]"])


def test_a_snapshot_folder_is_arch_snapshot_and_its_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert as_overrides(tmp_path) == [f"arch.snapshot='{tmp_path}'", "demo=off", "arch.family=llama"]
    same_config(config_for(tmp_path), [f"arch.snapshot={tmp_path}", "demo=off", "arch.family=llama"])
    # What is read from the inputs yields to what the caller says.
    assert config_for(tmp_path, overrides={"arch.family": "qwen2"}).arch.family == "qwen2"


def test_config_objects_come_back_unchanged():
    quant = QuantConfig(alpha=0.7, max_kl=1e-3, alpha_grid=[0.25, 0.75], steps=["calibrate", "smooth", "round"])
    calib = CalibConfig(root="/data/it's ${here}\\", num_samples=64, batch_size="4",
                        instruction='Say "what" it is: a, b [c] {d}\\\'',
                        mix=[CalibMixPart(source="text_jsonl", root="/data/a b.jsonl", ratio=0.25)])
    cfg = config_for("demo", recipe=quant, calib=calib)
    assert cfg.quant == quant
    assert cfg.calib == calib


def test_a_list_of_texts_is_a_jsonl_source(tmp_path):
    from vlmq.api import write_records
    from vlmq.calib.sources import load_calibration_samples

    path = write_records(["A cat on a mat.", {"prompt": "Name a colour.", "answer": "Blue."}], tmp_path / "c.jsonl")
    cfg = config_for("demo", calib=path, overrides={"calib.min_samples": 1})
    assert (cfg.calib.source, cfg.calib.root) == ("jsonl", str(path))
    samples, _ = load_calibration_samples(cfg, path)
    assert sorted((s.prompt, s.answer) for s in samples) == [("A cat on a mat.", ""), ("Name a colour.", "Blue.")]


@pytest.mark.parametrize("call, error, mentions", [
    (lambda: config_for(42), TypeError, "model_or_path"),
    (lambda: config_for("demo", recipe="nope"), ConfigError, "unknown recipe 'nope' (known: w8a8_int8_sq"),
    (lambda: config_for("demo", recipe={"alhpa": 0.5}), ConfigError, "did you mean quant.alpha"),
    (lambda: config_for("demo", recipe={"alpha": 2}), ConfigError, "quant.alpha must be in [0, 1]"),
    (lambda: config_for("demo", recipe=3.0), TypeError, "recipe must be"),
    (lambda: config_for("demo", calib=3), TypeError, "calib must be"),
    (lambda: config_for("demo", recipe={"alpha": 0.8}, overrides={"quant.alpha": 0.7}), ConfigError,
     "quant.alpha is given twice"),
    (lambda: config_for("demo", overrides=["calib.num_samples"]), ConfigError, "not of the form key=value"),
    (lambda: config_for("demo", overrides="calib.num_samples=8"), TypeError, "overrides must be"),
])
def test_bad_arguments_are_one_line_errors(call, error, mentions):
    with pytest.raises(error) as err:
        call()
    assert mentions in one_line(err)


def test_bad_inputs_fail_before_weights_are_read(tmp_path):
    with pytest.raises(SnapshotError) as err:
        vlmq.quantize(tmp_path / "missing")
    assert "snapshot not found" in one_line(err)
    with pytest.raises(CalibDataError) as err:
        vlmq.quantize("demo", calib=tmp_path / "no_coco")
    assert str(tmp_path / "no_coco") in one_line(err)
    with pytest.raises(ConfigError) as err:
        vlmq.quantize("demo", calib=[{"image": "cat.jpg", "prompt": "What is this?"}])
    assert "a .jsonl file beside the images" in one_line(err)
    with pytest.raises(CheckpointError) as err:
        vlmq.load(tmp_path / "missing")
    assert "not a checkpoint directory" in one_line(err)


def test_a_loaded_model_without_a_processor_is_refused():
    from vlmq.models.demo import build_demo_model

    with pytest.raises(TypeError) as err:
        vlmq.quantize(build_demo_model())
    assert "processor=" in one_line(err)


def test_import_vlmq_is_cheap_and_quantize_stays_callable():
    code = ("import sys, vlmq; assert 'torch' not in sys.modules, 'torch'; "
            "import vlmq.quantize.steps; assert callable(vlmq.quantize); "
            "from vlmq import quantize; assert quantize is sys.modules['vlmq.quantize']")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------------------------
# quantize -> export -> load on the demo model
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    configured = tmp_path_factory.mktemp("api") / "configured"
    # demo_run's recipe (it writes modelopt_hf, which takes the SmoothQuant-only recipe), to compare with it
    return vlmq.quantize("demo", overrides={"export.dir": str(configured), "quant.steps": SMOOTHQUANT_STEPS})


def test_export_equals_the_cli_export(quantized, demo_run):
    manifest = quantized.export()   # export.dir from the config
    out = Path(manifest["export_dir"])
    assert out == Path(quantized.cfg.export.dir)
    assert_same_tensors(out / "compressed_tensors", demo_run.export_dir / "compressed_tensors")
    assert quantization_config(out / "compressed_tensors") == quantization_config(
        demo_run.export_dir / "compressed_tensors")
    assert manifest["tool"] == "vlmq.quantize" and manifest["command_line"].startswith("vlmq quantize demo=on")
    assert manifest["modules"] == demo_run.manifest["modules"]
    assert manifest["calibration"]["samples"] == demo_run.manifest["calibration"]["samples"]


def test_export_refuses_to_overwrite(quantized, tmp_path):
    out = tmp_path / "w8a8"
    quantized.export(out)
    before = tree_hashes(out)
    with pytest.raises(ExportError) as err:
        quantized.export(out)
    assert str(out) in one_line(err) and "force=True" in str(err.value)
    assert tree_hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w8a8"]   # no staging dir left
    manifest = quantized.export(out, formats="compressed_tensors", force=True)
    assert manifest["config"]["force"] is True and manifest["config"]["export"]["dir"] == str(out)


def test_bad_export_format_writes_nothing(quantized, tmp_path):
    with pytest.raises(ConfigError) as err:
        quantized.export(tmp_path / "x", formats=["onnx"])
    assert "export.formats" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_load_runs_the_export(quantized, tmp_path):
    from vlmq.runtime.generate import generate_text
    from vlmq.runtime.linear import W8A8Linear

    manifest = quantized.export(tmp_path / "w8a8")
    model, processor = vlmq.load(tmp_path / "w8a8")   # the export root: its first format
    assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == len(manifest["modules"]["quantized"])
    _, tokens = generate_text(model, processor, "Describe a cat.", max_new_tokens=4)
    assert len(tokens) == 4


def test_a_loaded_model_quantizes_like_its_snapshot(tmp_path):
    """The demo snapshot loaded by the caller (transformers; the processor read from its folder), with the demo
    calibration set, exports the same tensors as `vlmq.quantize("demo")`, both by the default recipe (its
    rotate step unties and rotates the caller's model in place)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vlmq.models.demo import write_demo_snapshot

    snapshot = write_demo_snapshot(tmp_path / "snapshot")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(snapshot, dtype=torch.bfloat16)
    q = vlmq.quantize(model, calib=demo_coco_root(), overrides={"calib.num_samples": 12, "export.score": False})
    assert q.model is model   # quantized in place
    q.export(tmp_path / "loaded")
    vlmq.quantize("demo", overrides={"export.score": False}).export(tmp_path / "demo", formats=["compressed_tensors"])
    assert_same_tensors(tmp_path / "loaded" / "compressed_tensors", tmp_path / "demo" / "compressed_tensors")
