"""vllm-hybrid-neuron: hybrid SSM/attention models for vLLM on CPU and AWS Neuron.

Importing this package is cheap: nothing from vLLM or torch is imported until
``register()`` runs (vLLM calls it through the ``vllm.general_plugins`` entry point).
"""

__version__ = "0.1.0"


def register() -> None:
    """Entry point for ``vllm.general_plugins``; idempotent."""
    from vllm_hybrid_neuron.registration import register as _register

    _register()


__all__ = ["__version__", "register"]
