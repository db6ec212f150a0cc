"""manifest.json: what was run, with what, on what data, and the sha256 of every file written."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
PACKAGES = ("vlmq", "torch", "torchvision", "transformers", "accelerate", "nvidia-modelopt",
            "compressed-tensors", "safetensors", "hydra-core", "omegaconf")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(root: Path, skip: str | None = None) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under root (posix relative paths), manifest excluded; `skip` names a
    top-level folder whose files are left out."""
    out = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME or (skip is not None and rel.startswith(f"{skip}/")):
            continue
        out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_manifest(root: Path, content: dict[str, Any]) -> Path:
    """Write root/manifest.json with `content` plus the hashes of every file under root."""
    body = dict(content)
    body["files"] = file_hashes(root)
    path = Path(root) / MANIFEST_NAME
    path.write_text(json.dumps(body, indent=2, sort_keys=False, default=str) + "\n")
    return path


def manifest_root(path: Path) -> Path | None:
    """The export root whose manifest.json covers `path` (path itself or its parent), else None."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / MANIFEST_NAME).is_file():
            return candidate
    return None


def compare_hashes(recorded: dict[str, Any], actual: dict[str, dict[str, Any]], prefix: str = "") -> list[str]:
    """Missing, unlisted and changed files: `recorded` (the manifest's entries) against `actual`
    (`file_hashes`); `prefix` is put in front of each relative path in the messages."""
    problems = [f"missing file {prefix}{rel}" for rel in sorted(set(recorded) - set(actual))]
    problems += [f"unlisted file {prefix}{rel}" for rel in sorted(set(actual) - set(recorded))]
    problems += [f"sha256 mismatch {prefix}{rel}" for rel in sorted(set(recorded) & set(actual))
                 if recorded[rel].get("sha256") != actual[rel]["sha256"]]
    return problems


def _recorded_files(manifest_path: Path) -> dict[str, Any] | str:
    """The manifest's `files` table, or the one-line problem that makes it unreadable."""
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"{manifest_path} is unreadable: {err}"
    return recorded


def verify_hashes(root: Path) -> list[str]:
    """Problems found comparing the files under root with its manifest (empty: all match)."""
    manifest_path = Path(root) / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"no {MANIFEST_NAME} in {root}"]
    recorded = _recorded_files(manifest_path)
    if isinstance(recorded, str):
        return [recorded]
    return compare_hashes(recorded, file_hashes(root))


# The rule for an export with several formats: what is loaded or verified is checked, and must match; the other
# formats' files beside it are checked too, but their damage is a one-line warning (`sibling_warning`), not a
# failure. Verifying the export root checks every file and fails on any difference.

def manifest_problems(path: Path) -> list[str] | None:
    """sha256/size problems of the files under `path` (an export root or one format's directory)
    against the manifest beside or above it; what the runtime loader checks before trusting tensors.

    None when there is no manifest (nothing to check against); [] when every file matches."""
    path = Path(path)
    root = manifest_root(path)
    if root is None:
        return None
    if root == path:
        return verify_hashes(root)
    manifest_path = root / MANIFEST_NAME
    recorded = _recorded_files(manifest_path)
    if isinstance(recorded, str):
        return [recorded]
    prefix = path.name + "/"
    recorded = {rel[len(prefix):]: v for rel, v in recorded.items() if rel.startswith(prefix)}
    if not recorded:
        return [f"{manifest_path} lists no files under {path.name}/"]
    return compare_hashes(recorded, file_hashes(path), prefix)


def sibling_problems(path: Path) -> list[str]:
    """For one format's directory of an export: problems of the export's other files (the sibling formats)
    against the manifest; [] for an export root, without a manifest, or when they all match."""
    path = Path(path)
    root = manifest_root(path)
    if root is None or root == path:
        return []
    recorded = _recorded_files(root / MANIFEST_NAME)
    if isinstance(recorded, str):   # manifest_problems reports an unreadable manifest
        return []
    prefix = path.name + "/"
    others = {rel: v for rel, v in recorded.items() if not rel.startswith(prefix)}
    return compare_hashes(others, file_hashes(root, skip=path.name))


def sibling_warning(path: Path) -> str | None:
    """One line when another format of `path`'s export is damaged (`path` itself is checked separately)."""
    problems = sibling_problems(path)
    if not problems:
        return None
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return (f"{manifest_root(Path(path))}: another format of this export does not match manifest.json: "
            f"{problems[0]}{more}; {Path(path).name}/ itself matches and is the one used")
