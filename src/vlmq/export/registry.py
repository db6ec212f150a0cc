"""The export formats' registry: each exporter module registers its function under its format name.

A leaf module (it imports no exporter), so exporters import `register_exporter` from here without an
import cycle through `vlmq.export`, which imports the exporters on demand."""

from __future__ import annotations

from collections.abc import Callable

EXPORTERS: dict[str, Callable[..., dict]] = {}


def register_exporter(name: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    def wrap(fn: Callable[..., dict]) -> Callable[..., dict]:
        EXPORTERS[name] = fn
        return fn
    return wrap
