"""IBM Granite 4.0-H (GraniteMoeHybrid): Mamba2 + attention + MoE with a shared expert."""

from vllm.model_executor.models.granitemoehybrid import (
    GraniteMoeHybridForCausalLM as _VllmGraniteMoeHybridForCausalLM,
)


class GraniteMoeHybridForCausalLM(_VllmGraniteMoeHybridForCausalLM):
    """vLLM's Granite 4.0-H model, served by the plugin's CPU backend."""
