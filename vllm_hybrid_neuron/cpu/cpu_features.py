"""What the CPU offers, read once per process (the kernels' choices depend on it)."""

from __future__ import annotations

import functools


@functools.cache
def has_amx() -> bool:
    """Whether the CPU has AMX tiles (the kernel's flag in Linux's /proc/cpuinfo; every core
    lists the same flags, so the first line is read). Read once per process, not per layer."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False
