"""`atomic_directory`: the final path holds the complete old export or the complete new one, never a mix."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmq.export.atomic import ExportError, atomic_directory, clean_stale_staging


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(target: Path) -> list[str]:
    """Staging / swap-out dirs beside target (`.<name>.tmp-*`, `.<name>.old-*`)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def write_export(root: Path, tag: str) -> Path:
    (root / "modelopt_hf").mkdir(parents=True, exist_ok=True)
    (root / "modelopt_hf" / "model.safetensors").write_bytes(tag.encode() * 1000)
    (root / "manifest.json").write_text(f'{{"tag": "{tag}"}}\n')
    return root


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_new_target_is_created(tmp_path):
    target = tmp_path / "a" / "b" / "export"  # parents are created
    with atomic_directory(target) as staging:
        assert staging.parent == target.parent and staging != target
        assert not target.exists()  # nothing at the final path until the block succeeds
        write_export(staging, "new")
    assert tree(target) == tree(write_export(tmp_path / "expected", "new"))
    assert leftovers(target) == []


def test_exception_leaves_previous_export_intact(tmp_path):
    target = write_export(tmp_path / "export", "old")
    before = tree(target)
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(target, force=True) as staging:
        write_export(staging, "new")
        (staging / "modelopt_hf" / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")
    assert tree(target) == before
    assert leftovers(target) == []


def test_interrupt_leaves_previous_export_intact(tmp_path):
    target = write_export(tmp_path / "export", "old")
    before = tree(target)
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, force=True) as staging:
        write_export(staging, "new")
        raise KeyboardInterrupt
    assert tree(target) == before
    assert leftovers(target) == []


def test_exception_on_fresh_target_leaves_nothing(tmp_path):
    target = tmp_path / "export"
    with pytest.raises(ValueError), atomic_directory(target) as staging:
        write_export(staging, "new")
        raise ValueError
    assert not target.exists()
    assert leftovers(target) == []


def test_existing_target_refused_without_force(tmp_path):
    target = write_export(tmp_path / "export", "old")
    before = tree(target)
    entered = False
    with pytest.raises(ExportError, match="already exists.*--force"), atomic_directory(target, force=False):
        entered = True
    assert not entered
    assert tree(target) == before
    assert leftovers(target) == []


def test_existing_file_at_target_refused_even_with_force(tmp_path):
    target = tmp_path / "export"
    target.write_text("not a directory")
    with pytest.raises(ExportError, match="not a directory"), atomic_directory(target, force=True):
        pass
    assert target.read_text() == "not a directory"


def test_success_replaces_by_rename(tmp_path):
    target = write_export(tmp_path / "export", "old")
    old_inode = target.stat().st_ino
    with atomic_directory(target, force=True) as staging:
        write_export(staging, "new")
        (staging / "only-in-new").write_text("x")
        staging_inode = staging.stat().st_ino
    # The staged directory itself became the target (a rename, not a copy); the old one is gone.
    assert target.stat().st_ino == staging_inode != old_inode
    expected = tree(write_export(tmp_path / "expected", "new"))
    assert tree(target) == {**expected, "only-in-new": hashlib.sha256(b"x").hexdigest()}
    assert leftovers(target) == []


def test_stale_staging_from_dead_pid_is_cleaned(tmp_path):
    target = write_export(tmp_path / "export", "old")
    stale = tmp_path / f".export.tmp-{dead_pid()}-deadbeef"
    write_export(stale, "half")
    live = tmp_path / f".export.tmp-{os.getpid()}-cafebabe"  # a writer that is still running
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid()}-deadbeef"  # another target's staging: not ours
    other.mkdir()
    with atomic_directory(target, force=True) as staging:
        assert not stale.exists()
        assert live.is_dir() and other.is_dir()
        write_export(staging, "new")
    assert leftovers(target) == [live.name]
    assert tree(target) == tree(write_export(tmp_path / "expected", "new"))


def test_clean_stale_staging_ignores_unparseable_names(tmp_path):
    target = tmp_path / "export"
    odd = tmp_path / ".export.tmp-notapid"
    odd.mkdir()
    stale = tmp_path / f".export.tmp-{dead_pid()}-0123abcd"
    stale.mkdir()
    assert clean_stale_staging(target) == [stale]
    assert odd.is_dir() and not stale.exists()


def test_free_space_check(tmp_path):
    target = write_export(tmp_path / "export", "old")
    before = tree(target)
    entered = False
    with pytest.raises(ExportError, match="not enough disk space"), \
            atomic_directory(target, force=True, needed_bytes=10**18):
        entered = True
    assert not entered
    assert tree(target) == before
    assert leftovers(target) == []
    # A need that fits goes through.
    with atomic_directory(target, force=True, needed_bytes=1) as staging:
        write_export(staging, "new")
    assert tree(target) != before


def test_force_never_replaces_a_non_export(tmp_path):
    precious = tmp_path / "snapshot"
    precious.mkdir()
    (precious / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ExportError, match="not empty and holds no vlmq manifest.json"), \
            atomic_directory(precious, force=True) as staging:
        (staging / "x").write_text("new")
    assert (precious / "model.safetensors").read_bytes() == b"weights" and leftovers(precious) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, force=True) as staging:   # an empty directory may be replaced
        (staging / "manifest.json").write_text("{}")
    assert (empty / "manifest.json").is_file()
