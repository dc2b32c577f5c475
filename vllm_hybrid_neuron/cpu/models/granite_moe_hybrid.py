"""IBM Granite 4.0-H (GraniteMoeHybrid): Mamba2 + attention + MoE with a shared expert."""

from vllm.model_executor.models.granitemoehybrid import (
    GraniteMoeHybridForCausalLM as _VllmGraniteMoeHybridForCausalLM,
)

from vllm_hybrid_neuron.cpu.layers.full_width_gated_norm import use_full_width_gated_norm


class GraniteMoeHybridForCausalLM(_VllmGraniteMoeHybridForCausalLM):
    """vLLM's Granite 4.0-H model with transformers' gated-norm semantics."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # transformers normalises the gated Mamba2 output over the full width;
        # vLLM per group. They differ when mamba_n_groups > 1.
        use_full_width_gated_norm(self)
