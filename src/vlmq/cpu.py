"""What this machine's CPU computes fast, for the choices vlmq makes when it runs on the CPU."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# x86 flags of native bf16 arithmetic. Without them torch's and vLLM's bf16 GEMMs convert on the fly: on an AMD EPYC
# with AVX2 only, bf16 and fp16 linears measured 4-8x slower than fp32 (docs/BENCHMARKS.md, "CPUs without AVX-512").
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return frozenset()
    return frozenset(f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split())


def slow_bf16(flags: frozenset[str] | None = None, machine: str | None = None) -> bool:
    """Whether bf16 (and fp16) arithmetic is emulated here: an x86 CPU without native bf16. Other CPUs: False."""
    machine = machine if machine is not None else platform.machine()
    flags = cpu_flags() if flags is None else flags
    return machine in ("x86_64", "AMD64") and not BF16_FLAGS & flags
