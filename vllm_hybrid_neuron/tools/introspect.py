"""Functions to run inside vLLM workers (``LLM.apply_model``) to see what served."""

from __future__ import annotations


def model_class_path(model) -> str:
    """``"module:Class"`` of the model instance a worker holds."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def plugin_op_counts(model) -> dict[str, int]:
    """How many layer calls in this worker went through the plugin's ops, by kind (empty
    unless the worker runs with ``VLLM_HYBRID_NEURON_COUNT_OPS=1``: ``tools/op_probe.py``)."""
    from vllm_hybrid_neuron.tools import op_probe

    return op_probe.snapshot()
