"""Real INT8 execution of exported W8A8 checkpoints (CPU + CUDA; Triton on GPU)."""

from vlmq.runtime.linear import (
    W8A8Linear,
    available_backends,
    quantize_per_token,
    quantize_static,
    register_backend,
)

__all__ = [
    "W8A8Linear",
    "available_backends",
    "quantize_per_token",
    "quantize_static",
    "register_backend",
]
