"""vlmq: W8A8 INT8 SmoothQuant for vision-language models with NVIDIA ModelOpt.

The Python API (vlmq.api, imported on first use): `vlmq.quantize(model_or_path, recipe=..., calib=...)` ->
`Quantized`, `.export(dir, formats=[...])`, `vlmq.load(dir)`; `vlmq.config_for(...)` is the config a call runs.
"""

import importlib
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["Quantized", "config_for", "load", "quantize"]


class _CallablePackage(types.ModuleType):
    """`vlmq.quantize` is also the subpackage vlmq/quantize/, and importing any of its modules sets the package
    as `vlmq.quantize`, which would hide a function of that name; so the package itself calls the API."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from vlmq.api import quantize

        return quantize(*args, **kwargs)


# A namespace package (no __init__.py): importing it runs no code.
_package = importlib.import_module(f"{__name__}.quantize")
_package.__class__ = _CallablePackage
_package.__doc__ = ("vlmq.quantize(model_or_path, recipe=None, calib=None, *, processor=None, overrides=()) -> "
                    "Quantized: see vlmq.api.quantize. Also the package of the quantization steps.")


def __getattr__(name: str) -> Any:
    if name in ("Quantized", "config_for", "load"):
        from vlmq import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
