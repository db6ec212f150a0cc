"""Export formats, registered by name (`export.formats` in the config picks them)."""

from __future__ import annotations

from collections.abc import Callable

EXPORTERS: dict[str, Callable[..., dict]] = {}

# Exporters run in this order: ModelOpt's export re-smooths the live model, so it goes last.
EXPORT_ORDER = ("compressed_tensors", "modelopt_hf")


def register_exporter(name: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    def wrap(fn: Callable[..., dict]) -> Callable[..., dict]:
        EXPORTERS[name] = fn
        return fn
    return wrap


def get_exporter(name: str) -> Callable[..., dict]:
    if name not in EXPORTERS:
        if name == "modelopt_hf":
            import vlmq.export.modelopt_hf  # noqa: F401
        elif name == "compressed_tensors":
            import vlmq.export.compressed_tensors  # noqa: F401
    if name not in EXPORTERS:
        raise KeyError(f"unknown export format '{name}'")
    return EXPORTERS[name]
