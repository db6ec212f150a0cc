"""Bad input through the real CLI: a non-zero exit and one line on stderr, never a traceback.

Every run happens in a tmp working directory with explicit log/export paths, so the repository's
models/ and tmp/ trees are never touched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO_ROOT, CliResult, cli_env, describe, run_cli
from vlmq.calib import demo_coco_root

EXIT_USER_ERROR = 2


def assert_one_line_error(result: CliResult, *mentions: str) -> str:
    assert result.rc != 0, describe(result)
    assert result.rc == EXIT_USER_ERROR, describe(result)  # a user error, not an internal one (rc 1)
    assert "Traceback" not in result.stderr + result.stdout, describe(result)
    assert len(result.stderr_lines) == 1, describe(result)
    line = result.stderr_lines[0]
    assert line.startswith("vlmq: error: "), describe(result)
    for text in mentions:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def assert_stopped_before_load(log_root: Path, run_name: str, export_dir: Path) -> None:
    """The run failed during cheap checks: no model stage ran, no demo snapshot, no export."""
    run_dir = log_root / run_name
    log = (run_dir / "quantize.log").read_text()
    assert "stage prepare: start" in log
    assert "stage load" not in log, log
    assert "ERROR" in log  # the reason is in the log file too
    assert not (run_dir / "demo_snapshot").exists()
    assert not export_dir.exists()
    assert not [p for p in export_dir.parent.iterdir() if p.name.startswith(f".{export_dir.name}.")]


def quantize_args(tmp_path: Path, *overrides: str, run_name: str = "r") -> list[str]:
    return ["quantize", f"log_root={tmp_path / 'logs'}", f"export.dir={tmp_path / 'export'}",
            f"run_name={run_name}", *overrides]


def write_snapshot(root: Path, config: dict, weights: str = "safetensors") -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    if weights == "safetensors":
        save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, str(root / "model.safetensors"))
    elif weights == "pickle":
        torch.save({"w": torch.zeros(1)}, root / "pytorch_model.bin")
    return root


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_missing_explicit_snapshot(tmp_path):
    missing = tmp_path / "no" / "such" / "snapshot"
    result = run_cli(quantize_args(tmp_path, f"arch.snapshot={missing}", f"calib.root={demo_coco_root()}"),
                     cwd=tmp_path)
    assert_one_line_error(result, str(missing), "vlmq fetch-model")
    assert "DEMO" not in result.stderr  # a snapshot named explicitly never falls back to the demo
    assert_stopped_before_load(tmp_path / "logs", "r", tmp_path / "export")


def test_missing_snapshot_is_said_before_the_calibration_data(tmp_path):
    """Neither the named snapshot nor the default COCO root (data/coco2017) exists: the snapshot, with its
    `vlmq fetch-model` hint, is what the user hears first."""
    missing = tmp_path / "missing"
    result = run_cli(quantize_args(tmp_path, f"arch.snapshot={missing}"), cwd=tmp_path)
    line = assert_one_line_error(result, f"snapshot not found: {missing}", "vlmq fetch-model")
    assert "COCO" not in line and "coco2017" not in line, line
    assert_stopped_before_load(tmp_path / "logs", "r", tmp_path / "export")


@pytest.mark.parametrize("config,weights,mentions", [
    # llama is a supported family now, but not the one the selected arch names
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2}, "safetensors",
     ("is a llama model but arch.family is qwen2_5_vl",)),
    ({"model_type": "mllama", "architectures": ["MllamaForConditionalGeneration"]}, "safetensors",
     ("unsupported model_type 'mllama'", "qwen2_5_vl")),
    ({"model_type": "bert", "architectures": ["BertModel"]}, "safetensors",
     ("unsupported model_type 'bert'", "qwen2_5_vl")),
    ({"model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"]}, "pickle",
     ("no *.safetensors", "pytorch_model.bin")),
], ids=["llama-wrong-family", "mllama", "bert", "pickle-only"])
def test_unusable_snapshot(tmp_path, config, weights, mentions):
    snapshot = write_snapshot(tmp_path / "snap", config, weights)
    result = run_cli(quantize_args(tmp_path, f"arch.snapshot={snapshot}", f"calib.root={demo_coco_root()}"),
                     cwd=tmp_path)
    assert_one_line_error(result, str(snapshot), *mentions)
    assert_stopped_before_load(tmp_path / "logs", "r", tmp_path / "export")


def test_empty_calibration_set(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2017").mkdir()
    shutil.copy(next((demo_coco_root() / "val2017").glob("*.jpg")), root / "val2017" / "000000000001.jpg")
    images = [{"id": 1, "file_name": "000000000001.jpg", "height": 112, "width": 112}]
    (root / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": []}))
    result = run_cli(quantize_args(tmp_path, f"calib.root={root}"), cwd=tmp_path)
    assert_one_line_error(result, str(root))
    assert "DEMO" not in result.stderr  # failed before the demo model was even written
    assert_stopped_before_load(tmp_path / "logs", "r", tmp_path / "export")


def test_missing_calibration_root(tmp_path):
    root = tmp_path / "no_coco_here"
    result = run_cli(quantize_args(tmp_path, f"calib.root={root}"), cwd=tmp_path)
    assert_one_line_error(result, str(root))
    assert_stopped_before_load(tmp_path / "logs", "r", tmp_path / "export")


@pytest.mark.parametrize("override,mentions", [
    ("quant.alpha=2", ("quant.alpha",)),
    ("calib.nosuch=1", ("unknown config key 'calib.nosuch'", "calib.num_samples")),
    ("quant.aplha=0.8", ("unknown config key 'quant.aplha'; did you mean quant.alpha?",)),
    ("+quant.aplha=0.8", ("unknown config key 'quant.aplha'; did you mean quant.alpha?",)),
    ("export.formats=compressed_tensors", ("export.formats takes a list: export.formats=[compressed_tensors]",)),
    ("calib.splits=val2017", ("calib.splits takes a list: calib.splits=[val2017]",)),
], ids=["out-of-range", "unknown-key", "misspelt-key", "misspelt-key-appended", "list-without-brackets",
        "splits-without-brackets"])
def test_bad_override(tmp_path, override, mentions):
    result = run_cli(quantize_args(tmp_path, override), cwd=tmp_path)
    assert_one_line_error(result, *mentions)
    assert not (tmp_path / "export").exists() and not (tmp_path / "logs").exists()  # nothing was started


def test_existing_export_refused_without_force(demo_run, tmp_path):
    export_dir = tmp_path / "export"
    shutil.copytree(demo_run.export_dir, export_dir)
    before = tree_hashes(export_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in export_dir.rglob("*")}
    result = run_cli(quantize_args(tmp_path), cwd=tmp_path)
    assert_one_line_error(result, str(export_dir), "--force")
    assert tree_hashes(export_dir) == before
    assert {p: p.stat().st_mtime_ns for p in export_dir.rglob("*")} == mtimes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "logs"]  # no staging dirs


def test_fetch_model_offline(tmp_path):
    target = tmp_path / "x"
    env = cli_env(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    result = run_cli(["fetch-model", "arch.hub_id=nonexistent-org/nonexistent-model", f"arch.snapshot={target}"],
                     cwd=tmp_path, env=env)
    assert result.rc == EXIT_USER_ERROR, describe(result)
    assert "Traceback" not in result.stderr + result.stdout, describe(result)
    errors = [line for line in result.stderr_lines if line.startswith("vlmq: error:")]
    assert len(errors) == 1 and result.stderr_lines[-1] == errors[0], describe(result)
    assert "nonexistent-org/nonexistent-model" in errors[0] and "offline" in errors[0]
    # Besides the error, only the announcement of what was being downloaded.
    others = [line for line in result.stderr_lines if line != errors[0]]
    assert all(line.startswith("downloading nonexistent-org/nonexistent-model") for line in others), describe(result)
    assert result.stdout.strip() == ""
    assert not target.exists() or not any(target.rglob("*")), "a failed download left files behind"


def test_wrapper_script_forwards_arguments_and_exit_code(tmp_path):
    script = REPO_ROOT / "scripts" / "qwen" / "quantize_qwen2_5_vl_3b_w8a8.sh"
    proc = subprocess.run(["bash", str(script), "quant.alpha=3", f"log_root={tmp_path / 'logs'}",
                           f"export.dir={tmp_path / 'export'}"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=300)
    result = CliResult(["<script>"], proc.returncode, proc.stdout, proc.stderr, 0.0)
    assert_one_line_error(result, "quant.alpha must be in [0, 1], got 3.0")


# --------------------------------------------------------------------------------------------
# --model-dir given the export root; `vlmq check` with nothing exported
# --------------------------------------------------------------------------------------------

def test_export_root_as_model_dir_loads_its_first_format(demo_run, tmp_path):
    root = demo_run.export_dir   # export.formats=[compressed_tensors,modelopt_hf]
    result = run_cli(["generate", "--model-dir", str(root), "--device", "cpu", "--max-new-tokens", "2", "hi"],
                     cwd=tmp_path)
    assert result.rc == 0, describe(result)
    assert result.stderr_lines == [f"vlmq: info: {root} is an export root: using compressed_tensors/ "
                                   "(export.formats[0] in its manifest.json)"], describe(result)
    assert result.stdout.startswith("[W8A8 (compressed_tensors, dynamic activations)]"), describe(result)

    result = run_cli(["check", "--model-dir", str(root), f"log_root={tmp_path / 'logs'}", "run_name=c",
                      "infer.max_new_tokens=2"], cwd=tmp_path)
    assert result.rc == 0, describe(result)
    assert f"vlmq: info: {root} is an export root: using compressed_tensors/" in result.stderr, describe(result)
    results = json.loads((tmp_path / "logs" / "c" / "results.json").read_text())
    assert results["model"]["path"] == str(root / "compressed_tensors")


def test_folder_of_checkpoints_without_manifest_names_them(demo_run, tmp_path):
    folder = tmp_path / "exports"
    shutil.copytree(demo_run.export_dir, folder)
    (folder / "manifest.json").unlink()
    result = run_cli(["generate", "--model-dir", str(folder), "--device", "cpu", "hi"], cwd=tmp_path)
    assert_one_line_error(result, f"{folder} holds no config.json; pick one of its checkpoints: "
                                  f"{folder / 'compressed_tensors'}, {folder / 'modelopt_hf'}")


def test_check_quantized_arch_with_nothing_exported(tmp_path):
    result = run_cli(["check", "arch=qwen2_5_vl_3b_instruct.w8a8_int8_sq", f"log_root={tmp_path / 'logs'}"],
                     cwd=tmp_path)
    expected = tmp_path / "models/qwen2_5_vl_3b_instruct/quantized/w8a8_int8_sq/compressed_tensors"
    assert_one_line_error(result, f"no W8A8 checkpoint at {expected}", "run `vlmq quantize` first")
