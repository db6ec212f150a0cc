"""`vlmq verify`: a checkpoint checked against its manifest (sha256) and its own config
(tensors <-> quantization_config, every LM linear quantized, vision tower floating point)."""

from __future__ import annotations

import json
from pathlib import Path

from vlmq.export.manifest import MANIFEST_NAME, verify_hashes
from vlmq.models.families import quantized_linear_names
from vlmq.runtime.loader import CheckpointError, inspect_checkpoint


def _format_dirs(path: Path) -> tuple[Path | None, list[Path]]:
    """(export root holding manifest.json or None, the format dirs to check)."""
    if (path / MANIFEST_NAME).is_file():
        return path, sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
    if (path.parent / MANIFEST_NAME).is_file():
        return path.parent, [path]
    return None, [path]


def verify_export(path: Path) -> tuple[list[str], str]:
    """(problems, one-line summary). No problems means the checkpoint can be trusted."""
    path = Path(path)
    if not path.is_dir():
        return [f"not a directory: {path}"], ""
    root, dirs = _format_dirs(path)
    problems: list[str] = []
    exclude: set[str] = set()
    if root is None:
        problems.append(f"no {MANIFEST_NAME} beside or above {path}")
    else:
        problems += verify_hashes(root)
        try:
            manifest = json.loads((root / MANIFEST_NAME).read_text())
            exclude = set(manifest.get("modules", {}).get("fallback_bf16", []))
        except json.JSONDecodeError as err:
            problems.append(f"{MANIFEST_NAME} unreadable: {err}")
    if not dirs:
        problems.append(f"no checkpoint directories in {path}")
    checked = []
    for fmt_dir in dirs:
        try:
            info = inspect_checkpoint(fmt_dir)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        text = info.config.get("text_config", info.config)
        expected = [n for n in quantized_linear_names(info.family, text["num_hidden_layers"]) if n not in exclude]
        missing = sorted(set(expected) - set(info.quantized))
        extra = sorted(set(info.quantized) - set(expected))
        if missing:
            problems.append(f"{fmt_dir.name}: language-model linear {missing[0]} is not int8")
        if extra:
            problems.append(f"{fmt_dir.name}: unexpected int8 module {extra[0]}")
        checked.append(f"{fmt_dir.name} ({info.format}, {len(info.quantized)} W8A8 linears, {info.activations})")
    return problems, "; ".join(checked) + (", sha256 ok" if root else "")
