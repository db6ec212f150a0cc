"""Export formats, registered by name (`export.formats` in the config picks them)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from vlmq.export.registry import EXPORTERS, register_exporter

__all__ = ["EXPORTERS", "EXPORT_ORDER", "FORMAT_MODULES", "export_dtype", "get_exporter", "register_exporter"]

# Exporters run in this order: ModelOpt's export re-smooths the live model, so it goes last.
EXPORT_ORDER = ("compressed_tensors", "modelopt_hf")

# format name -> the module that registers its exporter, imported on first use
FORMAT_MODULES: dict[str, str] = {
    "compressed_tensors": "vlmq.export.compressed_tensors",
    "modelopt_hf": "vlmq.export.modelopt_hf",
}


def get_exporter(name: str) -> Callable[..., dict]:
    if name not in EXPORTERS and name in FORMAT_MODULES:
        importlib.import_module(FORMAT_MODULES[name])
    if name not in EXPORTERS:
        raise KeyError(f"unknown export format '{name}'")
    return EXPORTERS[name]


def export_dtype(name: str, snapshot_config: dict):
    """The torch dtype of a checkpoint's float tensors for `export.dtype` = `name`; auto: the snapshot's declared
    dtype (bf16 when it declares none), whatever arch.dtype quantization computed in (an fp32 run still writes a
    bf16 snapshot's float tensors in bf16)."""
    import torch

    from vlmq.config import DTYPES

    if name == "auto":
        text = snapshot_config.get("text_config") or {}
        declared = [c.get(k) for c in (snapshot_config, text) for k in ("dtype", "torch_dtype")]
        name = next((d for d in declared if d in DTYPES), "bfloat16")
    return getattr(torch, name)
