"""Build the vllm_hybrid_neuron._C CPU extension (torch.library ops in csrc/).

at::vec picks its SIMD width from the CPU_CAPABILITY macros: detect what the build machine
supports (AVX-512 > AVX2 > scalar) and compile for it. VHN_CPU_CAPABILITY=AVX2|DEFAULT overrides.
"""

import os
import platform
import runpy

from setuptools import setup


def _cpu_flags() -> frozenset[str]:
    """The build machine's CPU flags (the plugin's own reader; its package is not importable
    before the build)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "vllm_hybrid_neuron", "cpu", "cpu_features.py")
    return runpy.run_path(path)["cpu_flags"]()


def _capability() -> str:
    forced = os.environ.get("VHN_CPU_CAPABILITY")
    if forced:
        return forced.upper()
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "DEFAULT"


def _avx512_bf16(cap: str) -> bool:
    """AVX512-BF16 dot products (VDPBF16PS) for bf16_linear: where the build machine has them,
    unless VHN_NO_AVX512_BF16=1."""
    return (cap == "AVX512" and "avx512_bf16" in _cpu_flags()
            and os.environ.get("VHN_NO_AVX512_BF16", "0") != "1")


def _extension():
    from torch.utils.cpp_extension import CppExtension

    cap = _capability()
    args = ["-O3", "-std=c++17", f"-DCPU_CAPABILITY={cap}", "-fopenmp"]
    if cap == "AVX512":
        args += ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"]
        if _avx512_bf16(cap):
            args += ["-DVHN_AVX512BF16", "-mavx512bf16"]
    elif cap == "AVX2":
        args += ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
    return CppExtension(
        "vllm_hybrid_neuron._C",
        sources,
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=args,
        extra_link_args=["-fopenmp"],
    )


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=[_extension()], cmdclass={"build_ext": _build_ext()})
