"""What the CPU offers, read once per process (the kernels' choices depend on it)."""

from __future__ import annotations

import functools


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's flags in Linux's /proc/cpuinfo (every core lists the same ones, so the first
    line is read); empty where there is none. Read once per process, not per layer."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def has_amx() -> bool:
    """Whether the CPU has AMX tiles."""
    return "amx_tile" in cpu_flags()


def has_avx512_bf16() -> bool:
    """Whether the CPU has AVX512-BF16 dot products (VDPBF16PS)."""
    return "avx512_bf16" in cpu_flags()
