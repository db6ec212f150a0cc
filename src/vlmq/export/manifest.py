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


def file_hashes(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under root (posix relative paths), manifest excluded."""
    out = {}
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
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


def verify_hashes(root: Path) -> list[str]:
    """Problems found comparing the files under root with its manifest (empty: all match)."""
    manifest_path = Path(root) / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"no {MANIFEST_NAME} in {root}"]
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as err:
        return [f"{manifest_path} is unreadable: {err}"]
    actual = file_hashes(root)
    problems = [f"missing file {rel}" for rel in sorted(set(recorded) - set(actual))]
    problems += [f"unlisted file {rel}" for rel in sorted(set(actual) - set(recorded))]
    problems += [f"sha256 mismatch {rel}" for rel in sorted(set(recorded) & set(actual))
                 if recorded[rel]["sha256"] != actual[rel]["sha256"]]
    return problems
