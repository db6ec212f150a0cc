"""W8A8 INT8 linear layer: int8 weights (per output channel), int8 activations
(static per-tensor or dynamic per-token), integer GEMM with int32 accumulation,
dequantization in the epilogue.

Numerics (vlmq.numerics; shared by every backend; the Triton kernel reproduces the int8 values bit for bit):
  x' = x * pre_quant_scale                      (fp32; SmoothQuant factor, optional)
  s_x = input_scale            (static)   or   amax(|x'|, -1) / 127 clamped >= MIN_SCALE  (dynamic)
  q  = clamp(round_half_even(x' * (1 / s_x)), -128, 127)
  y  = (q @ W_q^T) [int32] * s_x[:, None] * weight_scale[None, :] + bias     -> x.dtype

Multiplying by the reciprocal scale is what ModelOpt's fake quantizer does
(``round(x * (127 / amax))``), and it is cheap inside a GEMM prologue. Divisions are IEEE
(tensor / tensor) so CPU, CUDA and Triton agree.

Backends are registered with ``@register_backend(name)``; a backend maps
``(layer, x2d [M, K]) -> y2d [M, N]`` in ``x2d.dtype``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmq.numerics import (  # noqa: F401  (re-exported: the runtime's public numerics)
    MIN_SCALE,
    QMAX,
    QMIN,
    block_hadamard,
    quantize_per_token,
    quantize_static,
    quantize_weight_per_channel,
)

BackendFn = Callable[["W8A8Linear", Tensor], Tensor]
_BACKENDS: dict[str, BackendFn] = {}


def register_backend(name: str) -> Callable[[BackendFn], BackendFn]:
    """Register a W8A8 forward implementation under ``name``."""

    def deco(fn: BackendFn) -> BackendFn:
        if name in _BACKENDS:
            raise ValueError(f"W8A8 backend {name!r} is already registered")
        _BACKENDS[name] = fn
        return fn

    return deco


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


TRITON_MIN_CAPABILITY = (8, 0)  # Triton has no int8 tensor-core MMA before Ampere (a T4 is sm75)


@functools.lru_cache(maxsize=16)
def triton_available(device_index: int) -> bool:
    """Whether the Triton W8A8 kernels run on this CUDA device."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(device_index) >= TRITON_MIN_CAPABILITY


@functools.lru_cache(maxsize=1)
def cpu_has_int8_dot() -> bool:
    """Whether torch's CPU kernels run with AVX-512 (where oneDNN's int8 GEMM behind ``torch._int_mm`` has VNNI
    dot products). On an AVX2-only CPU ``torch._int_mm`` measured 3.0-3.6 GFLOP/s against 46-54 for
    ``fp32_blocks`` at 512 rows (docs/BENCHMARKS.md, "CPUs without AVX-512")."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_backend(name: str, device: torch.device) -> str:
    """Map ``"auto"`` to a concrete backend for ``device`` (the Triton kernels on Ampere or newer, else
    ``torch._int_mm``; on a CPU without AVX-512, the exact fp32 block GEMM); validate other names."""
    if name == "auto":
        if device.type != "cuda":
            return "int_mm" if cpu_has_int8_dot() else "fp32_blocks"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "triton" if triton_available(index) else "int_mm"
    if name not in _BACKENDS:
        raise ValueError(f"unknown W8A8 backend {name!r}; available: {available_backends()}")
    return name


# ---------------------------------------------------------------------------
# integer GEMMs: int8 [M,K] x int8 [N,K] -> int32 [M,N]
# ---------------------------------------------------------------------------


def int_gemm_reference(a: Tensor, w: Tensor) -> Tensor:
    """Exact integer GEMM via float64 (|sum| <= 2^14 * K, far below 2^53); any device."""
    return (a.double() @ w.double().t()).to(torch.int32)


def _pad_dim(t: Tensor, dim: int, size: int) -> Tensor:
    extra = size - t.shape[dim]
    if extra <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]
    return F.pad(t, pad)


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def int_gemm_int_mm(a: Tensor, w: Tensor) -> Tensor:
    """``torch._int_mm`` with the padding CUDA needs (M > 16, K and N multiples of 8).

    CPU accepts any shape; padding with zeros leaves the sums unchanged.
    """
    m, k = a.shape
    n = w.shape[0]
    if not a.is_cuda:
        return torch._int_mm(a.contiguous(), w.t())
    mp, kp, np_ = max(_round_up(m, 8), 24), _round_up(k, 8), _round_up(n, 8)
    a_p = _pad_dim(_pad_dim(a, 0, mp), 1, kp).contiguous()
    w_p = _pad_dim(_pad_dim(w, 0, np_), 1, kp).contiguous()
    # w_p.t() is column-major [K, N]: the layout cuBLAS wants for the second operand.
    return torch._int_mm(a_p, w_p.t())[:m, :n]


# An int8 x int8 product is at most 128 * 128 = 2^14 in magnitude, so a dot product over at most 1024 of them
# stays within 2^24, below which every integer is an exact fp32: each 1024-wide slice of K summed in fp32 is
# exact whatever order the BLAS adds in, and the slices add exactly in int32.
EXACT_FP32_SLICE = 1024


def int_gemm_fp32_blocks(a: Tensor, w: Tensor) -> Tensor:
    """The integer GEMM, exact, as fp32 GEMMs over slices of K: for CPUs whose int8 GEMM is slow."""
    def part(start: int) -> Tensor:
        stop = start + EXACT_FP32_SLICE
        return (a[:, start:stop].float() @ w[:, start:stop].float().t()).to(torch.int32)

    out = part(0)
    for start in range(EXACT_FP32_SLICE, a.shape[1], EXACT_FP32_SLICE):
        out += part(start)
    return out


# ---------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------


class W8A8Linear(nn.Module):
    """Linear layer executed with int8 x int8 -> int32 matrix products.

    Buffers: ``weight`` int8 [N, K]; ``weight_scale`` fp32 [N]; optional ``bias`` [N];
    optional ``input_scale`` fp32 scalar (static activation scale; ``None`` = dynamic
    per-token); optional ``pre_quant_scale`` fp32 [K] (SmoothQuant factor applied to x).
    ``input_hadamard`` (block size, 0 = none): x is first rotated by a block-diagonal Hadamard (vLLM's
    `hadamard` input transform; the weight already holds W H).
    """

    weight: Tensor
    weight_scale: Tensor
    bias: Tensor | None
    input_scale: Tensor | None
    pre_quant_scale: Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        static: bool = False,
        pre_quant_scale: bool = False,
        bias_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.input_hadamard = 0
        n, k = out_features, in_features
        self.register_buffer("weight", torch.zeros(n, k, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(n, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(n, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer(
            "input_scale",
            torch.ones((), dtype=torch.float32, device=device) if static else None,
        )
        self.register_buffer(
            "pre_quant_scale",
            torch.ones(k, dtype=torch.float32, device=device) if pre_quant_scale else None,
        )

    # -- construction -------------------------------------------------------

    @classmethod
    def from_quantized(
        cls,
        weight: Tensor,
        weight_scale: Tensor,
        bias: Tensor | None = None,
        input_scale: Tensor | float | None = None,
        pre_quant_scale: Tensor | None = None,
        backend: str = "auto",
    ) -> W8A8Linear:
        """Wrap already-quantized tensors (as found in an exported checkpoint)."""
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
        n, k = weight.shape
        layer = cls(
            k,
            n,
            bias=bias is not None,
            static=input_scale is not None,
            pre_quant_scale=pre_quant_scale is not None,
            bias_dtype=bias.dtype if bias is not None else torch.bfloat16,
            device=weight.device,
            backend=backend,
        )
        layer.weight.copy_(weight)
        layer.weight_scale.copy_(_as_vector(weight_scale, n, "weight_scale"))
        if bias is not None:
            layer.bias.copy_(bias.reshape(n))
        if input_scale is not None:
            layer.input_scale.copy_(_as_scalar(input_scale, "input_scale"))
        if pre_quant_scale is not None:
            layer.pre_quant_scale.copy_(_as_vector(pre_quant_scale, k, "pre_quant_scale"))
        return layer

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        input_scale: Tensor | float | None = None,
        pre_quant_scale: Tensor | None = None,
        backend: str = "auto",
    ) -> W8A8Linear:
        """Quantize a float ``nn.Linear``; with ``pre_quant_scale`` s the weight is W / s
        (columns), so the layer still approximates ``linear(x)``."""
        w = linear.weight.detach().float()
        if pre_quant_scale is not None:
            w = w / pre_quant_scale.float().reshape(1, -1).to(w.device)
        w_q, w_s = quantize_weight_per_channel(w)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_quantized(w_q, w_s, bias, input_scale, pre_quant_scale, backend)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):  # type: ignore[no-untyped-def]
        n, k = self.out_features, self.in_features
        key = prefix + "weight_scale"
        if key in state_dict:
            state_dict[key] = _as_vector(state_dict[key], n, "weight_scale")
        # Optional buffers appear on load when the checkpoint has them.
        for name, shape in (
            ("bias", (n,)),
            ("input_scale", ()),
            ("pre_quant_scale", (k,)),
        ):
            key = prefix + name
            if key not in state_dict:
                continue
            t = state_dict[key]
            t = _as_scalar(t, name) if shape == () else t.reshape(shape)
            if name != "bias":
                t = t.float()
            state_dict[key] = t
            if getattr(self, name) is None:
                setattr(self, name, torch.empty_like(t, device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    # -- forward ------------------------------------------------------------

    @property
    def is_static(self) -> bool:
        return self.input_scale is not None

    def quantize_input(self, x2d: Tensor) -> tuple[Tensor, Tensor]:
        """Activation quantization for the eager backends: ``(q int8 [M,K], scale fp32 [M] or [])``."""
        xf = x2d.float()
        if self.pre_quant_scale is not None:
            xf = xf * self.pre_quant_scale
        if self.input_scale is not None:
            return quantize_static(xf, self.input_scale), self.input_scale.float()
        return quantize_per_token(xf)

    def dequantize(self, acc: Tensor, x_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
        x_s = x_scale.reshape(-1, 1) if x_scale.dim() else x_scale
        y = acc.float() * x_s * self.weight_scale.reshape(1, -1)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected last dim {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if self.input_hadamard:
            x2d = block_hadamard(x2d, self.input_hadamard)
        if x2d.shape[0] == 0:
            return x.new_empty(*lead, self.out_features)
        fn = _BACKENDS[resolve_backend(self.backend, x.device)]
        return fn(self, x2d).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        mode = "static" if self.is_static else "dynamic-per-token"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, act={mode}, "
            f"smooth={self.pre_quant_scale is not None}, backend={self.backend}"
            + (f", input_hadamard={self.input_hadamard}" if self.input_hadamard else "")
        )


def _as_vector(t: Tensor, n: int, name: str) -> Tensor:
    if t.numel() != n:
        raise ValueError(f"{name}: expected {n} elements, got shape {tuple(t.shape)}")
    return t.reshape(n).float()


def _as_scalar(t: Tensor | float, name: str) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.numel() != 1:
        raise ValueError(f"{name}: expected a scalar, got shape {tuple(t.shape)}")
    return t.reshape(())


# ---------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------


def _eager(layer: W8A8Linear, x2d: Tensor, gemm: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    q, s = layer.quantize_input(x2d)
    return layer.dequantize(gemm(q, layer.weight), s, x2d.dtype)


@register_backend("int_mm")
def _backend_int_mm(layer: W8A8Linear, x2d: Tensor) -> Tensor:
    return _eager(layer, x2d, int_gemm_int_mm)


# Up to this many rows torch._int_mm beats fp32_blocks even on an AVX2-only CPU (converting the weight to fp32
# costs more than the GEMM saves): measured crossover between 2 and 4 rows (benchmarks/bench_cpu_gemm.py).
FP32_BLOCKS_MIN_ROWS = 3


@register_backend("fp32_blocks")
def _backend_fp32_blocks(layer: W8A8Linear, x2d: Tensor) -> Tensor:
    gemm = int_gemm_fp32_blocks if x2d.shape[0] >= FP32_BLOCKS_MIN_ROWS else int_gemm_int_mm
    return _eager(layer, x2d, gemm)


@register_backend("reference")
def _backend_reference(layer: W8A8Linear, x2d: Tensor) -> Tensor:
    return _eager(layer, x2d, int_gemm_reference)


@register_backend("triton")
def _backend_triton(layer: W8A8Linear, x2d: Tensor) -> Tensor:
    from vlmq.runtime.kernels.triton_w8a8 import w8a8_linear

    return w8a8_linear(
        x2d,
        layer.weight,
        layer.weight_scale,
        bias=layer.bias,
        input_scale=layer.input_scale,
        pre_quant_scale=layer.pre_quant_scale,
    )
