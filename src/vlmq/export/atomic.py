"""Atomic directory writes: stage beside the target, fsync, then swap in one rename.

The final path holds either the complete previous export or the complete new one. On Linux the
swap of an existing export uses renameat2(RENAME_EXCHANGE), so there is no instant without one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

# Write failures that mean "the disk (or quota, or file-size limit) is full", not a bug.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ExportError(RuntimeError):
    """A user-facing export problem (one line)."""


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False where the platform cannot."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(target: Path) -> list[Path]:
    """Remove staging dirs left by killed runs (their writer's pid is gone)."""
    removed = []
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(path.name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an interrupted export (pid %d)", path, pid)
            removed.append(path)
    return removed


def check_target(target: Path, force: bool) -> None:
    if target.exists() and not force:
        raise ExportError(f"export already exists: {target} (pass --force, or force=True in Python, to replace it)")
    if target.exists() and not target.is_dir():
        raise ExportError(f"export path exists and is not a directory: {target}")
    # --force replaces a previous export, never an arbitrary directory (a snapshot, the repo, ...)
    if target.is_dir() and any(target.iterdir()) and not (target / "manifest.json").is_file():
        raise ExportError(f"refusing to replace {target}: it is not empty and holds no vlmq manifest.json")


def check_free_space(parent: Path, needed_bytes: int) -> None:
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise ExportError(f"cannot write exports under {probe}: permission denied")
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise ExportError(f"not enough disk space in {probe}: need ~{needed_bytes / 1e9:.2f} GB, "
                          f"have {free / 1e9:.2f} GB")


@contextmanager
def atomic_directory(target: Path, force: bool = False, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a staging dir; on normal exit it replaces `target` atomically, on error it vanishes."""
    target = Path(target).absolute()
    check_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(target)
    check_free_space(target.parent, needed_bytes)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        if target.exists():
            check_target(target, force)
            if not _exchange(staging, target):
                old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(target, old)
                os.rename(staging, target)
                staging = old
            shutil.rmtree(staging, ignore_errors=True)  # now holds the previous export
        else:
            os.rename(staging, target)
        fsync_dir(target.parent)
    except BaseException as err:
        if staging.exists() and staging != target:
            shutil.rmtree(staging, ignore_errors=True)
        reason = out_of_space(err)
        if reason:
            kept = "the previous export is untouched" if target.exists() else "nothing was left there"
            raise ExportError(f"could not write the export beside {target}: {reason}; {kept}") from None
        raise


def out_of_space(err: BaseException | None) -> str | None:
    """The OS's reason when `err` (or what caused it) is a full disk, quota or file-size limit.

    Python raises OSError(ENOSPC); safetensors' Rust writer raises SafetensorError("... (os error 28)")."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return os.strerror(err.errno)
        for code in _NO_SPACE:
            if f"(os error {code})" in str(err):
                return os.strerror(code)
        err = err.__cause__ or err.__context__
    return None
