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
