"""Faults around a finished checkpoint: killed, interrupted and disk-full exports, `vlmq verify`,
and the runtime loader's manifest check. Real subprocesses, real signals, real files in tmp dirs.

The kill tests freeze the writer with SIGSTOP the moment its staging dir holds a file, check that
the export is really mid-write (staging present, final path still the old export), then deliver
the fatal signal: the fault lands mid-write every time, not by luck of timing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SMOOTHQUANT_RECIPE, CliResult, cli_command, cli_env, describe, run_cli
from vlmq.cli import main as vlmq_main
from vlmq.export.manifest import MANIFEST_NAME, file_hashes
from vlmq.runtime.loader import CheckpointError, load_w8a8
from vlmq.verify import verify_export

MID_EXPORT_TIMEOUT_S = 240
FAST = ("calib.num_samples=4", "calib.min_samples=1")  # one calibration batch: these runs are killed anyway


def tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def staging_dirs(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.tmp-*"))


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def copy_export(demo_run, dst: Path) -> Path:
    shutil.copytree(demo_run.export_dir, dst)
    return dst


def rehash(root: Path) -> None:
    """Rewrite the manifest's file list as if the export had been written this way (so `verify`
    must find the structural fault itself, not just a sha256 difference)."""
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest["files"] = file_hashes(root)
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def quantize_cmd(workdir: Path, export_dir: Path, run_name: str, *extra: str) -> list[str]:
    return cli_command() + ["quantize", f"log_root={workdir / 'logs'}", f"export.dir={export_dir}",
                            f"run_name={run_name}", "export.formats=[compressed_tensors,modelopt_hf]",
                            SMOOTHQUANT_RECIPE, *extra]


def _foreground_signals() -> None:
    # As in a terminal's foreground job: a harness started in the background (`cmd &` in a script)
    # ignores SIGINT, which every child would inherit, and Python then never raises KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def popen(cmd: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_foreground_signals)


class MissedExport(Exception):
    """The export completed before it could be frozen (a scheduling race, not a vlmq fault)."""


def _holds_a_file(staging: Path) -> bool:
    try:
        return any(p.is_file() for p in staging.rglob("*"))
    except OSError:  # renamed away while we looked
        return False


def freeze_mid_export(proc: subprocess.Popen, target: Path, timeout: float = MID_EXPORT_TIMEOUT_S) -> Path:
    """SIGSTOP `proc` once its staging dir beside `target` holds a file; return that dir.

    Raises MissedExport if the run finished first, and fails if it died any other way: a kill
    that did not land mid-write never passes as one that did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            if proc.returncode == 0:
                raise MissedExport
            pytest.fail(f"process failed (rc {proc.returncode}) before its export began\n{err[-3000:]}")
        for staging in staging_dirs(target):
            if _holds_a_file(staging):
                os.kill(proc.pid, signal.SIGSTOP)
                # Frozen now: the staging dir must still be there, i.e. the swap has not happened.
                if staging.is_dir():
                    return staging
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.002)
    proc.kill()
    pytest.fail("no staging dir with a file appeared")


def start_frozen_mid_export(cmd: list[str], cwd: Path, target: Path, restore: Path,
                            attempts: int = 3) -> tuple[subprocess.Popen, Path]:
    """Start `cmd` and freeze it mid-export; if a run slips through, put `restore` back and retry."""
    for _ in range(attempts):
        proc = popen(cmd, cwd)
        try:
            return proc, freeze_mid_export(proc, target)
        except MissedExport:
            shutil.rmtree(target)
            shutil.copytree(restore, target)
    pytest.fail(f"the export finished before it could be frozen, {attempts} times")


def finish(proc: subprocess.Popen, args: list[str], start: float) -> CliResult:
    out, err = proc.communicate(timeout=MID_EXPORT_TIMEOUT_S)
    return CliResult(args, proc.returncode, out, err, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# 1. SIGKILL mid-export of a real `vlmq quantize --force` over a verified export; then the next run
# --------------------------------------------------------------------------------------------

@dataclass
class KilledThenRerun:
    export_dir: Path
    before: dict[str, str]
    staging: Path
    frozen_staging_files: list[str]
    killed_rc: int
    after_kill: dict[str, str]
    leftovers_after_kill: list[str]
    verify_after_kill: CliResult
    rerun: CliResult
    rerun_log: str
    leftovers_after_rerun: list[str]
    manifest: dict


def write_mix_sources(root: Path) -> tuple[Path, Path]:
    """A small COCO tree with hostile entries, and a text JSONL with a bad line and an image record."""
    from calib_fixtures import image_bytes, simple_entries, write_coco, write_image

    entries = simple_entries(6) + [("zero.jpg", ["empty file"]), ("trunc.jpg", ["cut short"]),
                                   ("../../etc/passwd", ["escape"]), ("cmyk.jpg", ["a cmyk picture"])]
    coco = write_coco(root / "coco", entries, with_images=False)
    for name, _ in simple_entries(6):
        write_image(coco / "val2017" / name, size=(56, 56))
    write_image(coco / "val2017" / "cmyk.jpg", mode="CMYK", size=(56, 56))
    (coco / "val2017" / "zero.jpg").write_bytes(b"")
    good = image_bytes("RGB", (64, 64))
    (coco / "val2017" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    write_image(root / "text" / "pic.jpg", size=(56, 56))
    lines = [json.dumps({"text": f"Plain text number {i} about the sea and small boats."}) for i in range(6)]
    lines += ["{broken json", json.dumps({"image": "pic.jpg", "answer": "A red square."})]
    text = root / "text" / "calib.jsonl"
    text.write_text("\n".join(lines) + "\n")
    return coco, text


@pytest.fixture(scope="module")
def killed_then_rerun(demo_run, tmp_path_factory) -> KilledThenRerun:
    work = tmp_path_factory.mktemp("sigkill")
    export_dir = copy_export(demo_run, work / "export")
    before = tree(export_dir)
    assert verify_export(export_dir)[0] == []

    proc, staging = start_frozen_mid_export(quantize_cmd(work, export_dir, "killed", *FAST, "--force"), work,
                                            export_dir, demo_run.export_dir)
    assert f".tmp-{proc.pid}-" in staging.name  # the staging dir of the process we froze
    frozen_files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
    assert tree(export_dir) == before  # frozen mid-write: the final path is still the old export
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)

    after_kill = tree(export_dir)
    leftovers_after_kill = leftovers(export_dir)
    verify_after_kill = run_cli(["verify", str(export_dir)], cwd=work)

    # The next run (a real, successful one, calibrating on a COCO + text JSONL mix) cleans up.
    coco, text = write_mix_sources(work / "data")
    args = ["quantize", f"log_root={work / 'logs'}", f"export.dir={export_dir}", "run_name=rerun",
            "export.formats=[compressed_tensors,modelopt_hf]", SMOOTHQUANT_RECIPE,
            f"calib.root={coco}", "calib.num_samples=8", "calib.min_samples=4",
            f"calib.mix=[{{source:text_jsonl,root:{text},ratio:0.25}}]", "--force"]
    rerun = run_cli(args, cwd=work)
    rerun_log = (work / "logs" / "rerun" / "quantize.log").read_text()
    manifest = json.loads((export_dir / MANIFEST_NAME).read_text()) if rerun.rc == 0 else {}
    return KilledThenRerun(export_dir, before, staging, frozen_files, proc.returncode, after_kill,
                           leftovers_after_kill, verify_after_kill, rerun, rerun_log, leftovers(export_dir),
                           manifest)


def test_sigkill_mid_export_keeps_previous_export(killed_then_rerun):
    k = killed_then_rerun
    assert k.killed_rc == -signal.SIGKILL
    assert k.frozen_staging_files, "the kill did not land mid-write"
    assert k.after_kill == k.before  # byte for byte the previous export
    assert k.verify_after_kill.rc == 0, describe(k.verify_after_kill)
    assert k.verify_after_kill.stdout_lines == [k.verify_after_kill.stdout_lines[0]]
    assert k.verify_after_kill.stdout_lines[0].startswith(f"OK {k.export_dir}")
    # No partial directory at (or instead of) the final path: only the dead writer's staging dir.
    assert k.leftovers_after_kill == [k.staging.name]


def test_next_run_cleans_stale_staging(killed_then_rerun):
    k = killed_then_rerun
    assert k.rerun.rc == 0, describe(k.rerun)
    assert not k.staging.exists() and k.leftovers_after_rerun == []
    assert f"removed {k.staging}, left by an interrupted export" in k.rerun_log
    assert tree(k.export_dir) != k.before  # replaced by the new export...
    assert verify_export(k.export_dir).problems == []  # ...which verifies


def test_calibration_mix_and_skips_are_counted_in_manifest(killed_then_rerun):
    cal = killed_then_rerun.manifest["calibration"]
    # COCO: zero-byte, truncated, path escape skipped; the CMYK image converted and usable.
    # text_jsonl: the broken line and the image record skipped.
    assert cal["skipped"] == {"zero_byte": 1, "corrupt": 1, "path_escape": 1, "malformed_line": 1,
                              "image_in_text_source": 1}
    assert cal["samples"] == 8 and cal["images"] == 6  # 6 COCO (ratio 0.75) + 2 text (ratio 0.25)
    assert [s.split(" (ratio")[1] for s in cal["sources"]] == [" 0.75, 6 samples)", " 0.25, 2 samples)"]
    assert cal["sources"][1].startswith("text_jsonl:")


def test_free_space_estimate_covers_the_export(killed_then_rerun):
    k = killed_then_rerun
    written = sum(p.stat().st_size for p in k.export_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    estimate = k.manifest["sizes"]["export_estimate_bytes"]
    assert written <= estimate <= 1.5 * written, (written, estimate)


# --------------------------------------------------------------------------------------------
# 2. SIGKILL in the middle of one file, deterministic (the writer blocks half-way)
# --------------------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from vlmq.export.atomic import atomic_directory

    target, mode = Path(sys.argv[1]), sys.argv[2]
    with atomic_directory(target, force=True) as staging:
        (staging / "modelopt_hf").mkdir()
        with open(staging / "modelopt_hf" / "model.safetensors", "wb") as fh:
            fh.write(b"\\0" * 2**20)
            fh.flush()
            os.fsync(fh.fileno())
            if mode == "block":
                print("HALF", staging, flush=True)
                sys.stdin.read()  # blocks until killed
            fh.write(b"\\1" * 2**20)
        (staging / "manifest.json").write_text('{"files": {}}')
    print("DONE", flush=True)
""")


def test_sigkill_mid_file_write_then_next_writer_cleans(demo_run, tmp_path):
    target = copy_export(demo_run, tmp_path / "export")
    before = tree(target)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "block"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    tag, staging = proc.stdout.readline().split()
    staging = Path(staging)
    assert tag == "HALF" and (staging / "modelopt_hf" / "model.safetensors").stat().st_size == 2**20
    proc.kill()
    proc.wait(timeout=30)
    assert tree(target) == before
    assert verify_export(target)[0] == []
    assert leftovers(target) == [staging.name]  # a half-written staging dir, never the final path

    done = subprocess.run([sys.executable, "-c", WRITER, str(target), "finish"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "DONE", done.stderr
    assert not staging.exists() and leftovers(target) == []
    assert (target / "modelopt_hf" / "model.safetensors").stat().st_size == 2 * 2**20


# --------------------------------------------------------------------------------------------
# 3. Ctrl-C (SIGINT) and SIGTERM during calibration and during export
# --------------------------------------------------------------------------------------------

def wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout: float = MID_EXPORT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {text!r} was logged")
        if log.is_file() and text in log.read_text():
            return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{text!r} never appeared in {log}")


@pytest.mark.parametrize("when,sig,rc,word", [
    ("calibration", signal.SIGINT, 130, "interrupted"),
    ("export", signal.SIGINT, 130, "interrupted"),
    ("load", signal.SIGTERM, 143, "terminated"),
], ids=["ctrl-c-calibration", "ctrl-c-export", "sigterm-load"])
def test_signal_leaves_previous_export_and_says_where_logs_are(demo_run, tmp_path, when, sig, rc, word):
    export_dir = copy_export(demo_run, tmp_path / "export")
    before = tree(export_dir)
    args = quantize_cmd(tmp_path, export_dir, "r", *FAST, "--force")
    start = time.perf_counter()
    run_dir = tmp_path / "logs" / "r"
    if when == "export":
        proc, _ = start_frozen_mid_export(args, tmp_path, export_dir, demo_run.export_dir)
        assert tree(export_dir) == before
        os.kill(proc.pid, sig)
        os.kill(proc.pid, signal.SIGCONT)
    else:
        proc = popen(args, tmp_path)
    if when == "calibration":
        wait_for_log(proc, run_dir / "quantize.log", "stage calibrate_quantize: start")
        time.sleep(0.3)  # inside the forward loop
        os.kill(proc.pid, sig)
    elif when == "load":
        wait_for_log(proc, run_dir / "quantize.log", "stage load: start")
        os.kill(proc.pid, sig)
    result = finish(proc, args, start)
    assert result.rc == rc, describe(result)
    assert "Traceback" not in result.stderr + result.stdout, describe(result)
    vlmq_lines = [line for line in result.stderr_lines if line.startswith("vlmq:")]
    assert vlmq_lines == [f"vlmq: {word}; no partial export was left behind; logs in {run_dir}"], describe(result)
    assert result.stderr_lines[-1] == vlmq_lines[0]
    assert tree(export_dir) == before
    assert leftovers(export_dir) == []  # the staging dir was removed on the way out
    log = (run_dir / "quantize.log").read_text()
    assert f"{word} by signal" in log
    if when != "export":
        assert "stage export" not in log
    else:
        assert "stage export: start" in log


# --------------------------------------------------------------------------------------------
# 4. Disk full while writing the export
# --------------------------------------------------------------------------------------------

FULL_WRITER = textwrap.dedent("""
    import resource, signal, sys
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    from vlmq.export.atomic import ExportError, atomic_directory

    target, limit = Path(sys.argv[1]), int(sys.argv[2])
    if limit:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        with atomic_directory(target, force=True) as staging:
            (staging / "modelopt_hf").mkdir()
            save_file({"w": torch.zeros(1024, 1024)}, str(staging / "modelopt_hf" / "model.safetensors"))
    except ExportError as err:
        print("ExportError:", err)
        sys.exit(2)
    print("written")
""")


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB filesystem (needs mount rights; skipped without them)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the RLIMIT_FSIZE case covers the logic")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _write_small_export(target: Path) -> dict[str, str]:
    (target / "modelopt_hf").mkdir(parents=True)
    save_file({"w": torch.ones(4, 4)}, str(target / "modelopt_hf" / "model.safetensors"))
    (target / "manifest.json").write_text("{}")
    return tree(target)


@pytest.mark.parametrize("fault", ["file_size_limit", "filesystem_full"])
def test_disk_full_during_export_is_one_line_and_keeps_previous(tmp_path, request, fault):
    if fault == "filesystem_full":
        root, limit = request.getfixturevalue("small_tmpfs"), 0
        reason = os.strerror(errno.ENOSPC)
    else:
        root, limit = tmp_path, 1 << 19  # 512 KiB, the tensor is 4 MiB
        reason = os.strerror(errno.EFBIG)
    target = root / "export"
    before = _write_small_export(target)
    proc = subprocess.run([sys.executable, "-c", FULL_WRITER, str(target), str(limit)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout.strip() == (f"ExportError: could not write the export beside {target}: {reason}; "
                                   "the previous export is untouched")
    assert tree(target) == before
    assert leftovers(target) == []
    # Negative control: without the fault the same writer succeeds.
    if fault == "file_size_limit":
        ok = subprocess.run([sys.executable, "-c", FULL_WRITER, str(target), "0"], capture_output=True, text=True,
                            timeout=120)
        assert ok.stdout.strip() == "written", ok.stderr


# --------------------------------------------------------------------------------------------
# 5. `vlmq verify`: one line, exit 0 / 1
# --------------------------------------------------------------------------------------------

def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _tamper(root: Path) -> None:
    _flip_last_byte(root / "modelopt_hf" / "model.safetensors")


def _missing(root: Path) -> None:
    (root / "compressed_tensors" / "tokenizer.json").unlink()


def _config_tensor_mismatch(root: Path) -> None:
    # The config says static activations (input_scale per linear) but the tensors are dynamic.
    cfg_path = root / "compressed_tensors" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    acts = cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]
    acts.update(dynamic=False, strategy="tensor")
    cfg_path.write_text(json.dumps(cfg))
    rehash(root)


def _lm_linear_bf16(root: Path) -> None:
    path = root / "modelopt_hf" / "model.safetensors"
    sd = load_file(path)
    name = "model.layers.0.self_attn.q_proj"
    weight = sd[f"{name}.weight"].float() * sd[f"{name}.weight_scale"].float().view(-1, 1)
    sd[f"{name}.weight"] = weight.to(torch.bfloat16)
    for suffix in ("weight_scale", "input_scale", "pre_quant_scale"):
        sd.pop(f"{name}.{suffix}", None)
    save_file(sd, str(path), metadata={"format": "pt"})
    rehash(root)


def _vision_int8(root: Path) -> None:
    path = root / "compressed_tensors" / "model.safetensors"
    sd = load_file(path)
    sd["visual.blocks.0.attn.qkv.weight"] = sd["visual.blocks.0.attn.qkv.weight"].to(torch.int8)
    save_file(sd, str(path), metadata={"format": "pt"})
    rehash(root)


def _unlisted_weights(root: Path) -> None:
    save_file({"x": torch.zeros(2)}, str(root / "modelopt_hf" / "model-extra.safetensors"))


@pytest.mark.parametrize("damage,reason", [
    (_tamper, "sha256 mismatch modelopt_hf/model.safetensors"),
    (_missing, "missing file compressed_tensors/tokenizer.json"),
    (_unlisted_weights, "unlisted file modelopt_hf/model-extra.safetensors"),
    (_config_tensor_mismatch, "model.layers.0.mlp.down_proj.input_scale missing for int8 weight"),
    (_lm_linear_bf16, "modelopt_hf: language-model linear model.language_model.layers.0.self_attn.q_proj is not int8"),
    (_vision_int8, "vision tensor visual.blocks.0.attn.qkv.weight is int8; the vision tower must stay bf16"),
], ids=["tampered", "missing-file", "unlisted-file", "config-tensor-mismatch", "lm-linear-bf16", "vision-int8"])
def test_verify_fails_one_line(demo_run, tmp_path, capsys, damage, reason):
    root = copy_export(demo_run, tmp_path / "export")
    damage(root)
    rc = vlmq_main(["verify", str(root)])
    out, err = capsys.readouterr()
    assert rc == 1 and err == ""
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"FAIL {root}: "), out
    assert reason in lines[0], (reason, lines[0])


def test_verify_passes_good_export(demo_run, tmp_path, capsys):
    root = copy_export(demo_run, tmp_path / "export")
    for target in (root, root / "modelopt_hf", root / "compressed_tensors"):
        assert vlmq_main(["verify", str(target)]) == 0
        out, err = capsys.readouterr()
        assert out.startswith(f"OK {target}: ") and out.count("\n") == 1 and err == ""
        assert "sha256 ok" in out


def test_sibling_damage_is_a_warning_for_the_format_that_is_used(demo_run, tmp_path, capsys):
    """One rule in verify, check, generate and the loader: what is loaded (the format directory given) must match
    the manifest; damage to the export's other format is one warning line; the export root checks everything."""
    root = copy_export(demo_run, tmp_path / "export")
    ct = root / "compressed_tensors"
    _flip_last_byte(root / "modelopt_hf" / "model.safetensors")
    warning = (f"vlmq: warning: {root}: another format of this export does not match manifest.json: "
               "sha256 mismatch modelopt_hf/model.safetensors; compressed_tensors/ itself matches and is the one used")

    assert vlmq_main(["verify", str(ct)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"OK {ct}: compressed_tensors (") and out.count("\n") == 1, out
    assert err.splitlines() == [warning]
    for target in (root, root / "modelopt_hf"):   # the root, or the damaged format itself: refused
        assert vlmq_main(["verify", str(target)]) == 1
        out, err = capsys.readouterr()
        assert out.startswith(f"FAIL {target}: sha256 mismatch modelopt_hf/model.safetensors"), out
        assert err == ""

    _, _, info = load_w8a8(ct, device="cpu")
    assert info.warnings == [warning.removeprefix("vlmq: warning: ")]

    generated = run_cli(["generate", "--model-dir", str(ct), "--device", "cpu", "--max-new-tokens", "2", "hi"],
                        cwd=tmp_path)
    assert generated.rc == 0 and generated.stderr_lines == [warning], describe(generated)
    checked = run_cli(["check", "--model-dir", str(ct), f"log_root={tmp_path / 'logs'}", "run_name=c",
                       "infer.max_new_tokens=2"], cwd=tmp_path)
    assert checked.rc == 0, describe(checked)
    assert checked.stderr_lines.count(warning) == 1, describe(checked)
    assert "REJECTED" not in checked.stderr


def test_verify_without_manifest_fails(demo_run, tmp_path, capsys):
    root = copy_export(demo_run, tmp_path / "export")
    (root / MANIFEST_NAME).unlink()
    assert vlmq_main(["verify", str(root / "modelopt_hf")]) == 1
    assert "no manifest.json beside or above" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# 6. The runtime loader checks the manifest before trusting the tensors
# --------------------------------------------------------------------------------------------

def test_loader_refuses_checkpoint_that_differs_from_manifest(demo_run, tmp_path):
    root = copy_export(demo_run, tmp_path / "export")
    ckpt = root / "modelopt_hf"
    model, _, info = load_w8a8(ckpt, device="cpu")  # intact: loads
    assert info.format == "modelopt_hf"
    del model

    _flip_last_byte(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_w8a8(ckpt, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"{ckpt}: does not match its manifest.json: sha256 mismatch modelopt_hf/model.safetensors "
                       "(re-export it, or load with verify=False)")
    load_w8a8(ckpt, device="cpu", verify=False)  # the check, not the tensors, refused it

    # The other format's damage does not block this checkpoint: it is a warning.
    _flip_last_byte(ckpt / "model.safetensors")
    _flip_last_byte(root / "compressed_tensors" / "model.safetensors")
    _, _, info = load_w8a8(ckpt, device="cpu")
    assert info.warnings and "sha256 mismatch compressed_tensors/model.safetensors" in info.warnings[0]

    # An extra weight file would be read by the loader: refused as unlisted.
    save_file({"x": torch.zeros(2)}, str(ckpt / "zz-extra.safetensors"))
    with pytest.raises(CheckpointError, match="unlisted file modelopt_hf/zz-extra.safetensors"):
        load_w8a8(ckpt, device="cpu")


def test_generate_refuses_tampered_checkpoint_one_line(demo_run, tmp_path, capsys):
    root = copy_export(demo_run, tmp_path / "export")
    _flip_last_byte(root / "compressed_tensors" / "model.safetensors")
    rc = vlmq_main(["generate", "--model-dir", str(root / "compressed_tensors"), "--device", "cpu", "hello"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("vlmq: error: ")
    assert "sha256 mismatch compressed_tensors/model.safetensors" in err


def test_an_interrupt_wrapped_by_a_library_is_still_an_interrupt():
    """Ctrl-C inside a library import can surface as RuntimeError('Error calling __set_name__ ...') with the
    KeyboardInterrupt as its cause (pydantic building ModelOpt's configs): the CLI must still say 'interrupted'."""
    from vlmq.cli import _wrapped_interrupt

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as interrupt:
            raise RuntimeError("Error calling __set_name__ on 'PydanticDescriptorProxy'") from interrupt
    except RuntimeError as err:
        assert isinstance(_wrapped_interrupt(err), KeyboardInterrupt)
    assert _wrapped_interrupt(ValueError("a real bug")) is None
