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
    ("calib.nosuch=1", ("calib.nosuch",)),
])
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
