"""Find, check and load a model snapshot (local dir), or fetch one from a hub.

The config is checked (model_type, architecture, safetensors present) before any weight is read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmq.models.families import Family, UnsupportedModelError, family_for

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class SnapshotError(ValueError):
    """A missing, partial or unsupported snapshot (one-line, user-facing)."""


@dataclass
class Snapshot:
    path: Path
    config: dict
    family: Family
    is_demo: bool


def declared_dtype(config: dict) -> str:
    """The float dtype a model config declares (`dtype` or `torch_dtype`, top level or text_config), as a
    DTYPES name; bfloat16 when it declares none."""
    text = config.get("text_config") or {}
    declared = [c.get(k) for c in (config, text) for k in ("dtype", "torch_dtype")]
    return next((d for d in declared if d in DTYPES), "bfloat16")


def require_snapshot_dir(path: Path) -> None:
    """The first check on a snapshot, cheap enough to run before anything else (before calibration data is read)."""
    if not Path(path).is_dir():
        raise SnapshotError(f"snapshot not found: {path} (download it with `vlmq fetch-model`)")


def inspect_snapshot(path: Path, trust_remote_code: bool = False) -> Snapshot:
    """Check a snapshot dir without reading weights: config, family, custom code, weight files."""
    from vlmq.models.demo import is_demo_snapshot

    path = Path(path)
    require_snapshot_dir(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SnapshotError(f"snapshot is incomplete: {config_file} is missing (re-run `vlmq fetch-model`)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SnapshotError(f"snapshot config is not valid JSON: {config_file}: {err}") from None
    if not isinstance(config, dict):
        raise SnapshotError(f"snapshot config is not a JSON object: {config_file}")
    auto_map = config.get("auto_map")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise SnapshotError(f"{path} is a quantized checkpoint ({method}); a bf16 snapshot is needed here")
    try:
        family = family_for(config.get("model_type"))
    except UnsupportedModelError as err:
        custom = " (it ships its own model code via auto_map, which vlmq does not quantize)" if auto_map else ""
        raise SnapshotError(f"{path}: {err}{custom}") from None
    architectures = config.get("architectures") or []
    if architectures and not set(architectures) & set(family.architectures):
        raise SnapshotError(f"{path}: architecture {architectures[0]} is not a {family.name} model "
                            f"(expected {', '.join(family.architectures)})")
    if auto_map and not trust_remote_code:
        first = next(iter(auto_map.values())) if isinstance(auto_map, dict) and auto_map else auto_map
        raise SnapshotError(f"{path}: config.json asks to run the snapshot's own code (auto_map -> {first}); "
                            "vlmq runs it only with arch.trust_remote_code=true")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickle weights {pickles[0]}; vlmq loads safetensors only)" if pickles else ""
        raise SnapshotError(f"snapshot has no *.safetensors weights: {path}{hint}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise SnapshotError(f"snapshot index is not valid: {index}: {err}") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise SnapshotError(f"snapshot is incomplete: {path} lacks {missing[0]} (re-run `vlmq fetch-model`)")
    for file in weights:
        check_safetensors_complete(file)
    return Snapshot(path=path, config=config, family=family, is_demo=is_demo_snapshot(path))


def check_safetensors_complete(file: Path) -> None:
    """Refuse a truncated or corrupt .safetensors from its header alone (no tensor data is read)."""
    size = file.stat().st_size
    bad = f"snapshot is incomplete: {file} is truncated or corrupt (re-run `vlmq fetch-model`)"
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise SnapshotError(bad)
        header_len = int.from_bytes(head, "little")
        if header_len > min(size - 8, 100 * 2**20):
            raise SnapshotError(bad)
        try:
            header = json.loads(fh.read(header_len))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError, AttributeError):
            raise SnapshotError(bad) from None
    if size < 8 + header_len + end:
        raise SnapshotError(bad)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SnapshotError(f"device={device} was asked for but no CUDA device is visible")
        try:
            index = torch.device(device).index
        except RuntimeError:
            raise SnapshotError(f"device={device} is not a device (cpu, cuda, cuda:N or auto)") from None
        if index is not None and index >= torch.cuda.device_count():
            raise SnapshotError(f"device={device} was asked for but only {torch.cuda.device_count()} CUDA "
                                "device(s) are visible")
    return device


def load_model(snapshot: Snapshot, dtype: str = "bfloat16", device: str = "auto",
               max_memory: dict[str, str] | None = None, trust_remote_code: bool = False):
    """Load the model in `dtype`: on CPU, one GPU, or sharded over several with device_map."""
    device = pick_device(device)
    kwargs: dict = {"dtype": DTYPES[dtype], "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if device == "cuda":
        kwargs["device_map"] = "auto" if torch.cuda.device_count() > 1 or max_memory else {"": 0}
        if max_memory:
            kwargs["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in max_memory.items()}
    model = snapshot.family.model_class().from_pretrained(snapshot.path, **kwargs)
    if device == "cpu":
        model = model.to("cpu")
    return model.eval()


def load_processor(path: Path, trust_remote_code: bool = False):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)


def fetch_model(repo_id: str, target: Path, source: str = "hf") -> Path:
    """Download a snapshot (safetensors + processor files) into `target`."""
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "*.md"]
    try:
        if source == "hf":
            from huggingface_hub import snapshot_download

            snapshot_download(repo_id=repo_id, local_dir=str(target), allow_patterns=patterns)
        elif source == "modelscope":
            try:
                from modelscope import snapshot_download as ms_download
            except ImportError:
                raise SnapshotError("source=modelscope needs `pip install modelscope`") from None
            ms_download(repo_id, local_dir=str(target), allow_patterns=patterns)
        else:
            raise SnapshotError(f"unknown source '{source}' (hf or modelscope)")
    except SnapshotError:
        raise
    except Exception as err:  # network libraries raise many types; all mean "could not download"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SnapshotError(f"could not download {repo_id} from {source} (offline?): {first}") from None
    return target
