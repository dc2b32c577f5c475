"""Every environment variable the plugin reads, in one place."""

from __future__ import annotations

import os

#: "auto" (default) follows the platform vLLM resolved; "cpu" or "neuron" force a backend.
BACKEND_ENV = "VLLM_HYBRID_NEURON_BACKEND"
BACKEND_CHOICES = ("auto", "cpu", "neuron")

#: Which kernel runs bf16 chunked gated-delta-rule prefills: "auto" (default: vLLM's own
#: bf16 CPU kernel on CPUs with AMX or AVX512-BF16, where it measured 7.6x (AMX) and 2.7x
#: (Zen 4) faster than the plugin's, and the plugin's everywhere else, where vLLM's measured
#: 16x slower on AVX2), "plugin" or "vllm".
#: fp32 prefills always run on the plugin's kernel.
GDN_PREFILL_ENV = "VLLM_HYBRID_NEURON_GDN_PREFILL"
GDN_PREFILL_CHOICES = ("auto", "plugin", "vllm")

#: Which kernel computes the routed experts of MoE blocks on CPU: "auto" (default) or "plugin" -
#: the plugin's moe_experts op wherever vLLM would use its portable "vec" kernel (1.1-1.9x it
#: from 64 tokens per call, level at decode sizes: benchmarks/results/moe.md), vLLM's AMX / ARM
#: / Power kernels kept - or "vllm": vLLM's own kernels everywhere.
MOE_ENV = "VLLM_HYBRID_NEURON_MOE"
MOE_CHOICES = ("auto", "plugin", "vllm")

#: Which kernel runs bf16 dense projections and the LM head of the plugin's CPU model classes:
#: "auto" (default: the plugin's bf16_linear where oneDNN has no bf16 matmul, and where this
#: build has AVX512-BF16 dot products and the CPU no AMX; vLLM's oneDNN path elsewhere),
#: "plugin" (bf16_linear everywhere) or "vllm" (vLLM's path everywhere).
LINEAR_ENV = "VLLM_HYBRID_NEURON_LINEAR"
LINEAR_CHOICES = ("auto", "plugin", "vllm")

#: "1": count the plugin's layer calls by kind in each process (``tools/op_probe.py``), so
#: tests can prove which ops served. Off by default: nothing is counted on the served path.
COUNT_OPS_ENV = "VLLM_HYBRID_NEURON_COUNT_OPS"


def _choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable ``name``, validated against ``choices`` (case and
    surrounding blanks ignored); "auto" when unset or empty."""
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def backend_override() -> str:
    """The requested backend, validated; "auto" when unset."""
    return _choice(BACKEND_ENV, BACKEND_CHOICES)


def gdn_prefill_kernel() -> str:
    """The requested bf16 chunked GDN prefill kernel, validated; "auto" when unset."""
    return _choice(GDN_PREFILL_ENV, GDN_PREFILL_CHOICES)


def moe_kernel() -> str:
    """The requested routed-experts kernel, validated; "auto" when unset."""
    return _choice(MOE_ENV, MOE_CHOICES)


def linear_kernel() -> str:
    """The requested dense-projection kernel, validated; "auto" when unset."""
    return _choice(LINEAR_ENV, LINEAR_CHOICES)


def count_ops() -> bool:
    """Whether the op-call probe is to be installed (``COUNT_OPS_ENV`` is "1")."""
    return os.environ.get(COUNT_OPS_ENV, "").strip() == "1"
