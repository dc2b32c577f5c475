"""Every environment variable the plugin reads, in one place."""

from __future__ import annotations

import os

#: "auto" (default) follows the platform vLLM resolved; "cpu" or "neuron" force a backend.
BACKEND_ENV = "VLLM_HYBRID_NEURON_BACKEND"
BACKEND_CHOICES = ("auto", "cpu", "neuron")


def backend_override() -> str:
    """The requested backend, validated; "auto" when unset."""
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKEND_CHOICES:
        raise ValueError(
            f"{BACKEND_ENV}={value!r} is not one of {', '.join(BACKEND_CHOICES)}"
        )
    return value


#: Which kernel runs bf16 chunked gated-delta-rule prefills: "auto" (default: vLLM's own
#: bf16 CPU kernel when the installed vLLM has it, as it is faster than the plugin's in
#: bf16), "plugin" or "vllm". fp32 prefills always run on the plugin's kernel.
GDN_PREFILL_ENV = "VLLM_HYBRID_NEURON_GDN_PREFILL"
GDN_PREFILL_CHOICES = ("auto", "plugin", "vllm")


def gdn_prefill_kernel() -> str:
    """The requested bf16 chunked GDN prefill kernel, validated; "auto" when unset."""
    value = os.environ.get(GDN_PREFILL_ENV, "auto").strip().lower() or "auto"
    if value not in GDN_PREFILL_CHOICES:
        raise ValueError(
            f"{GDN_PREFILL_ENV}={value!r} is not one of {', '.join(GDN_PREFILL_CHOICES)}"
        )
    return value
