"""IBM Granite 4.0-H (GraniteMoeHybrid): Mamba2 + attention + MoE with a shared expert."""

from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.models.granitemoehybrid import (
    GraniteMoeHybridForCausalLM as _VllmGraniteMoeHybridForCausalLM,
)

from vllm_hybrid_neuron.cpu.layers.full_width_gated_norm import use_full_width_gated_norm
from vllm_hybrid_neuron.cpu.layers.mamba2_mixer import PluginMambaMixer2
from vllm_hybrid_neuron.cpu.layers.class_swap import require, swap_layer_class
from vllm_hybrid_neuron.cpu.layers.bf16_linear_layers import use_bf16_linear
from vllm_hybrid_neuron.cpu.layers.moe_experts import use_plugin_moe


class GraniteMoeHybridForCausalLM(_VllmGraniteMoeHybridForCausalLM):
    """vLLM's Granite 4.0-H model with its Mamba2 layers on the plugin's CPU ops and
    transformers' gated-norm semantics."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        require(2 <= config.mamba_d_conv <= 4, "mamba_d_conv",
                f"conv kernel width {config.mamba_d_conv} not supported (2..4)")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # transformers normalises the gated Mamba2 output over the full width;
        # vLLM per group. They differ when mamba_n_groups > 1.
        use_full_width_gated_norm(self)
        mixers = [m for m in self.modules() if type(m) is MambaMixer2]
        for mixer in mixers:
            require(not mixer.use_replayssm, "mamba backend",
                    "the ReplaySSM state cache is not supported on the CPU backend")
        swap_layer_class(self, MambaMixer2, PluginMambaMixer2)
        use_bf16_linear(self)
        use_plugin_moe(self)
