"""GPU kernels for the runtime (imported lazily: Triton is optional)."""
