"""Export formats, registered by name (`export.formats` in the config picks them)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from vlmq.export.registry import EXPORTERS, register_exporter

__all__ = ["EXPORTERS", "EXPORT_ORDER", "FORMAT_MODULES", "get_exporter", "register_exporter"]

# Exporters run in this order (both write from the quantized state; the deployable format first).
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
