"""`vlmq verify`: a checkpoint checked against its manifest (sha256) and its own config
(tensors <-> quantization_config, every LM linear quantized, vision tower floating point).

`verify_export` is the full check (the CLI, `vlmq check`). The sha256 part lives in
`vlmq.export.manifest` (`verify_hashes`, and `manifest_problems`, which the runtime loader runs for one
format directory before it trusts a checkpoint's tensors).

What is verified is what is loaded: for one format's directory, its own files must match the manifest and the
other formats' damage is a one-line warning; for an export root, every file must match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from vlmq.export.manifest import MANIFEST_NAME, manifest_problems, manifest_root, sibling_warning, verify_hashes
from vlmq.models.families import quantized_linear_names
from vlmq.runtime.loader import CheckpointError, inspect_checkpoint


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Verdict(NamedTuple):
    problems: list[str]       # empty: the checkpoint can be trusted
    summary: str              # one line: each format checked
    warnings: list[str]       # one line each: damage outside what was verified (another format's files)


def verify_export(path: Path) -> Verdict:
    """The checkpoint at `path` (an export root, or one format's directory) against its manifest and config."""
    path = Path(path)
    if not path.is_dir():
        return Verdict([f"not a directory: {path}"], "", [])
    root = manifest_root(path)
    if root == path:
        dirs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
    else:
        dirs = [path]
    problems: list[str] = []
    warnings: list[str] = []
    exclude: set[str] = set()
    if root is None:
        problems.append(f"no {MANIFEST_NAME} beside or above {path}")
    else:
        if root == path:
            problems += verify_hashes(root)
        else:
            problems += manifest_problems(path) or []
            warnings += [w for w in [sibling_warning(path)] if w]
        try:
            manifest = json.loads((root / MANIFEST_NAME).read_text())
            exclude = set(manifest.get("modules", {}).get("fallback_bf16", []))
        except (json.JSONDecodeError, AttributeError) as err:
            problems.append(f"{MANIFEST_NAME} unreadable: {err}")
    if not dirs:
        problems.append(f"no checkpoint directories in {path}")
    checked = []
    for fmt_dir in dirs:
        try:
            info = inspect_checkpoint(fmt_dir)
            text = info.config.get("text_config", info.config)
            num_layers = int(text["num_hidden_layers"])
        except CheckpointError as err:
            problems.append(str(err))
            continue
        except Exception as err:  # unreadable config or tensors: a verdict, not a crash
            problems.append(f"{fmt_dir.name}: unreadable checkpoint ({type(err).__name__}: {_first_line(err)})")
            continue
        expected = [n for n in quantized_linear_names(info.family, num_layers) if n not in exclude]
        missing = sorted(set(expected) - set(info.quantized))
        extra = sorted(set(info.quantized) - set(expected))
        if missing:
            problems.append(f"{fmt_dir.name}: language-model linear {missing[0]} is not int8")
        if extra:
            problems.append(f"{fmt_dir.name}: unexpected int8 module {extra[0]}")
        checked.append(f"{fmt_dir.name} ({info.format}, {len(info.quantized)} W8A8 linears, {info.activations})")
    return Verdict(problems, "; ".join(checked) + (", sha256 ok" if root else ""), warnings)
