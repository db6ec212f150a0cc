"""Bad inputs before any weight is trusted: snapshots (partial, foreign, custom code, pickles),
calibration sources wired through the config, and CUDA out-of-memory back-off (logic, on CPU)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from calib_fixtures import simple_entries, write_coco, write_image
from conftest import cli_env, describe, run_cli
from vlmq.calib import CalibDataError, demo_coco_root
from vlmq.calib.sources import load_calibration_samples
from vlmq.config import ConfigError, load_config
from vlmq.models.load import SnapshotError, inspect_snapshot
from vlmq.quantize.calibrate import CalibrationOOMError, forward_all

# --------------------------------------------------------------------------------------------
# 1. CUDA out of memory during calibration: halve and retry down to 1, then one clear error
# --------------------------------------------------------------------------------------------


class OOMAbove(nn.Module):
    """A real module that runs out of "memory" when a batch holds more than `limit` samples."""

    def __init__(self, limit: int, message: str = "CUDA out of memory. Tried to allocate 20.00 GiB",
                 error: type[Exception] = torch.OutOfMemoryError) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.limit, self.message, self.error = limit, message, error
        self.calls: list[int] = []  # batch sizes tried
        self.seen: list[int] = []  # sample ids of successful forwards

    def forward(self, x: torch.Tensor, ids: torch.Tensor, use_cache: bool = True, logits_to_keep: int = 0):
        self.calls.append(len(ids))
        if len(ids) > self.limit:
            raise self.error(self.message)
        self.seen.extend(ids.tolist())
        return self.lin(x)


def one_batch(chunk: list[int]) -> list[dict]:
    return [{"x": torch.randn(len(chunk), 4), "ids": torch.tensor(chunk)}]


@pytest.mark.parametrize("error,message", [
    (torch.OutOfMemoryError, "CUDA out of memory. Tried to allocate 20.00 GiB"),
    (RuntimeError, "CUDA error: out of memory"),  # how some kernels report it
], ids=["OutOfMemoryError", "RuntimeError"])
def test_oom_halves_batch_and_covers_every_sample_once(error, message):
    model = OOMAbove(limit=20, message=message, error=error)
    progress: list[int] = []
    record = forward_all(model, list(range(100)), one_batch, 64, progress.append)
    assert record.oom_backoffs == [32, 16] and record.batch_size_start == 64 and record.batch_size_final == 16
    assert model.calls[:3] == [64, 32, 16]
    assert model.seen == list(range(100))  # every sample exactly once, in order, after the back-off
    assert progress == [16] * 6 + [4] and record.samples == 100 and record.batches == 7


def test_oom_at_batch_one_fails_clearly():
    model = OOMAbove(limit=0)
    progress: list[int] = []
    with pytest.raises(CalibrationOOMError) as err:
        forward_all(model, list(range(10)), one_batch, 8, progress.append)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("out of GPU memory even at calib.batch_size=1 (tried 8->4->2->1)")
    assert "calib.max_length" in message
    assert model.calls == [8, 4, 2, 1] and progress == [] and model.seen == []
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained traceback


def test_non_oom_errors_are_not_swallowed():
    model = OOMAbove(limit=0, message="shape mismatch in matmul", error=RuntimeError)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        forward_all(model, list(range(10)), one_batch, 8)
    assert model.calls == [8]  # no retry on a bug


# --------------------------------------------------------------------------------------------
# 2. Calibration sources from the config: jsonl, text_jsonl, and a mix by ratio
# --------------------------------------------------------------------------------------------

def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def calib_cfg(*overrides: str):
    return load_config([f"log_root={os.devnull}", *overrides])


def test_jsonl_source_from_config(tmp_path):
    write_image(tmp_path / "imgs" / "a.jpg")
    (tmp_path / "imgs" / "zero.jpg").write_bytes(b"")
    path = write_jsonl(tmp_path / "calib.jsonl", [
        {"text": "Plain text."}, {"prompt": "2+2?", "answer": "Four."},
        {"image": "imgs/a.jpg", "answer": "A red square."}, {"image": "imgs/zero.jpg", "answer": "x"},
        {"image": "../../etc/passwd", "answer": "x"}, "[1, 2", {"answer": 3},
    ])
    cfg = calib_cfg("calib.source=jsonl", f"calib.root={path}", "calib.min_samples=3")
    samples, stats = load_calibration_samples(cfg, cfg.resolve_path(cfg.calib.root))
    assert len(samples) == 3 and stats.images == 1
    assert stats.skipped == {"zero_byte": 1, "path_escape": 1, "malformed_line": 2}
    cfg = calib_cfg("calib.source=jsonl", f"calib.root={path}", "calib.min_samples=4")
    with pytest.raises(CalibDataError, match=r"only 3 usable .*calib.jsonl \(need at least 4\)"):
        load_calibration_samples(cfg, path)


def test_text_jsonl_source_skips_image_records(tmp_path):
    write_image(tmp_path / "a.jpg")
    records = [{"text": f"Sentence number {i}."} for i in range(5)] + [{"image": "a.jpg", "answer": "Red."}]
    path = write_jsonl(tmp_path / "text.jsonl", records)
    cfg = calib_cfg("calib.source=text_jsonl", f"calib.root={path}", "calib.num_samples=3", "calib.min_samples=1")
    samples, stats = load_calibration_samples(cfg, path)
    assert len(samples) == 3 and all(s.image is None for s in samples)
    assert stats.skipped == {"image_in_text_source": 1} and stats.requested == 3
    # Same seeded order as the `jsonl` source, minus the image record.
    cfg_all = calib_cfg("calib.source=text_jsonl", f"calib.root={path}", "calib.num_samples=10", "calib.min_samples=1")
    everything, _ = load_calibration_samples(cfg_all, path)
    assert samples == everything[:3] and len(everything) == 5
    cfg = calib_cfg("calib.source=text_jsonl", f"calib.root={path}", "calib.min_samples=6")
    with pytest.raises(CalibDataError, match="only 5 usable"):
        load_calibration_samples(cfg, path)


def test_mix_by_ratio_and_its_errors(tmp_path):
    coco = write_coco(tmp_path / "coco", simple_entries(10))
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Line {i}."} for i in range(3)] + ["oops"])
    mix = f"calib.mix=[{{source:text_jsonl,root:{text},ratio:0.3}}]"
    cfg = calib_cfg(f"calib.root={coco}", "calib.num_samples=10", mix)
    samples, stats = load_calibration_samples(cfg, coco)
    assert len(samples) == 10 and stats.images == 7 and stats.samples == 10
    assert stats.skipped == {"malformed_line": 1}
    assert [s.rsplit("(", 1)[1] for s in stats.sources] == ["ratio 0.70, 7 samples)", "ratio 0.30, 3 samples)"]
    # A short source is topped up from the other: 40% text asks for 4, only 3 exist.
    cfg = calib_cfg(f"calib.root={coco}", "calib.num_samples=10", mix.replace("0.3", "0.4"))
    samples, _ = load_calibration_samples(cfg, coco)
    assert len(samples) == 10 and sum(s.image is None for s in samples) == 3
    # Too few in the whole mix: one clear error naming the sources.
    cfg = calib_cfg(f"calib.root={coco}", "calib.num_samples=100", "calib.min_samples=20", mix)
    with pytest.raises(CalibDataError, match=r"only 13 usable calibration samples in the calibration mix"):
        load_calibration_samples(cfg, coco)
    # A missing mix file is the same error as a missing main source.
    missing = tmp_path / "nope.jsonl"
    cfg = calib_cfg(f"calib.root={coco}", f"calib.mix=[{{source:jsonl,root:{missing},ratio:0.3}}]")
    with pytest.raises(CalibDataError, match=f"JSONL calibration file not found: {missing}"):
        load_calibration_samples(cfg, coco)


@pytest.mark.parametrize("mix,message", [
    ("[{source:text_jsonl,root:/x.jsonl,ratio:1.0}]", "calib.mix ratio must be in (0, 1), got 1.0"),
    ("[{source:jsonl,root:/a,ratio:0.6},{source:jsonl,root:/b,ratio:0.5}]", "ratios must sum below 1"),
    ("[{source:parquet,root:/a,ratio:0.2}]", "calib.mix source must be coco2017, jsonl or text_jsonl"),
    ("[{source:jsonl,ratio:0.2}]", "calib.mix entry for jsonl needs a root"),
    ("[{source:jsonl,root:/a,share:0.2}]", "Key 'share' not in 'CalibMixPart'"),
], ids=["ratio-1", "ratios-sum-over-1", "unknown-source", "no-root", "unknown-key"])
def test_bad_mix_config_is_one_line(mix, message):
    with pytest.raises(ConfigError) as err:
        load_config([f"calib.mix={mix}"])
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------
# 3. Snapshots: partial, foreign, custom code, pickles
# --------------------------------------------------------------------------------------------

@pytest.fixture
def snapshot(demo_run, tmp_path) -> Path:
    """A copy of the demo run's real bf16 snapshot (config, safetensors, processor files)."""
    return Path(shutil.copytree(demo_run.run_dir / "demo_snapshot", tmp_path / "snap"))


def test_intact_snapshot_passes(snapshot):
    assert inspect_snapshot(snapshot).family.name == "qwen2_5_vl"


def _truncate(snap: Path) -> str:
    weights = snap / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return f"snapshot is incomplete: {weights} is truncated or corrupt"


def _garbage_header(snap: Path) -> str:
    (snap / "model.safetensors").write_bytes(b"\xff" * 64)
    return "is truncated or corrupt"


def _missing_shard(snap: Path) -> str:
    (snap / "model.safetensors").rename(snap / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return "lacks model-00002-of-00002.safetensors"


def _no_config(snap: Path) -> str:
    (snap / "config.json").unlink()
    return "config.json is missing"


def _wrong_architecture(snap: Path) -> str:
    cfg = json.loads((snap / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (snap / "config.json").write_text(json.dumps(cfg))
    return "architecture Qwen2ForCausalLM is not a qwen2_5_vl model"


@pytest.mark.parametrize("damage", [_truncate, _garbage_header, _missing_shard, _no_config, _wrong_architecture],
                         ids=["truncated-weights", "garbage-header", "missing-shard", "no-config", "wrong-arch"])
def test_partial_or_wrong_snapshot_refused_before_weights(snapshot, damage):
    expected = damage(snapshot)
    with pytest.raises(SnapshotError) as err:
        inspect_snapshot(snapshot)
    assert expected in str(err.value) and "\n" not in str(err.value)


MARKER_CODE = "import os\nopen(os.environ['VLMQ_TEST_MARKER'], 'w').write('custom code ran')\n\nclass EvilModel:\n" \
              "    pass\n"


def add_custom_code(snap: Path) -> None:
    cfg = json.loads((snap / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForImageTextToText": "modeling_evil.EvilModel"}
    (snap / "config.json").write_text(json.dumps(cfg))
    (snap / "modeling_evil.py").write_text(MARKER_CODE)


def test_custom_code_refused_without_flag_through_cli(snapshot, tmp_path):
    add_custom_code(snapshot)
    marker = tmp_path / "marker"
    env = cli_env(VLMQ_TEST_MARKER=str(marker), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = run_cli(["quantize", f"log_root={tmp_path / 'logs'}", f"export.dir={tmp_path / 'export'}",
                      "run_name=r", f"arch.snapshot={snapshot}", f"calib.root={demo_coco_root()}"],
                     cwd=tmp_path, env=env)
    assert result.rc == 2, describe(result)
    assert result.stderr_lines == [
        f"vlmq: error: {snapshot}: config.json asks to run the snapshot's own code "
        "(auto_map -> modeling_evil.EvilModel); vlmq runs it only with arch.trust_remote_code=true"
    ], describe(result)
    log = (tmp_path / "logs" / "r" / "quantize.log").read_text()
    assert "stage load" not in log  # refused before any weight was read
    assert not marker.exists() and not (tmp_path / "export").exists()


FLAG_SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from vlmq.models.load import SnapshotError, inspect_snapshot, load_model

    snap, marker = Path(sys.argv[1]), Path(os.environ["VLMQ_TEST_MARKER"])
    try:
        inspect_snapshot(snap)
    except SnapshotError:
        print("refused-by-default")
    snapshot = inspect_snapshot(snap, trust_remote_code=True)
    load_model(snapshot, device="cpu", trust_remote_code=False)  # built-in class: the code is not run
    print("marker-after-untrusted-load", marker.exists())
    try:
        load_model(snapshot, device="cpu", trust_remote_code=True)
    except Exception as err:
        print("trusted-load-error", type(err).__name__)
    print("marker-after-trusted-load", marker.exists())
""")


def test_trust_remote_code_only_with_the_flag(snapshot, tmp_path):
    assert load_config([]).arch.trust_remote_code is False  # the default
    assert load_config(["arch.trust_remote_code=true"]).arch.trust_remote_code is True
    add_custom_code(snapshot)
    marker = tmp_path / "marker"
    env = cli_env(VLMQ_TEST_MARKER=str(marker), HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", FLAG_SCRIPT, str(snapshot)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert lines[0] == "refused-by-default"
    assert lines[1] == "marker-after-untrusted-load False"
    assert lines[-1] == "marker-after-trusted-load True", proc.stdout  # the flag really reaches transformers
    assert marker.read_text() == "custom code ran"


class _Payload:
    """Unpickling this runs code: what a hostile pytorch_model.bin can do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pickle ran')",)


def test_pickle_weights_never_unpickled(snapshot, tmp_path):
    from vlmq.export.compressed_tensors import load_clean_copy
    from vlmq.models.load import load_model

    marker = tmp_path / "pickle-marker"
    (snapshot / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Payload(marker)}))
    model = load_model(inspect_snapshot(snapshot), device="cpu")  # the quantize path
    clean = load_clean_copy(snapshot)  # the compressed-tensors export's fresh copy
    assert not marker.exists()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in clean.parameters()) > 0
    # Negative control: the payload is live; loading the .bin would have run it.
    pickle.loads((snapshot / "pytorch_model.bin").read_bytes())
    assert marker.read_text() == "pickle ran"


def test_quantized_checkpoint_is_not_a_snapshot(tmp_path):
    import json as _json

    snapshot = tmp_path / "ckpt"
    snapshot.mkdir()
    (snapshot / "config.json").write_text(_json.dumps({
        "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "quantization_config": {"quant_method": "compressed-tensors"}}))
    (snapshot / "model.safetensors").write_bytes(b"")
    with pytest.raises(SnapshotError, match="is a quantized checkpoint \\(compressed-tensors\\)"):
        inspect_snapshot(snapshot)
