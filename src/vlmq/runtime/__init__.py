"""Real INT8 execution of exported W8A8 checkpoints (CPU + CUDA; Triton on GPU)."""

from vlmq.runtime.linear import (
    W8A8Linear,
    available_backends,
    quantize_per_token,
    quantize_static,
    register_backend,
)


def backend_choices() -> tuple[str, ...]:
    """What a ``--backend`` flag accepts: ``"auto"`` (``resolve_backend`` picks per device) and every
    registered backend. Every backend, ``"triton"`` included, registers when vlmq.runtime.linear is
    imported; the Triton backend imports triton only on its first call."""
    return ("auto", *available_backends())


__all__ = [
    "W8A8Linear",
    "available_backends",
    "backend_choices",
    "quantize_per_token",
    "quantize_static",
    "register_backend",
]
