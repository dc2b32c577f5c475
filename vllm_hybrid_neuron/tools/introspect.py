"""Functions to run inside vLLM workers (``LLM.apply_model``) to see what served."""

from __future__ import annotations


def model_class_path(model) -> str:
    """``"module:Class"`` of the model instance a worker holds."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def plugin_op_counts(model) -> dict[str, int]:
    """How many layer calls in this worker went through the plugin's ops, by kind."""
    from vllm_hybrid_neuron.cpu.layers import op_stats

    return op_stats.snapshot()
