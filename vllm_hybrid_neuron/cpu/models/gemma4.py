"""Gemma 4: sliding + global attention with different head dims, k_eq_v, softcapping."""

from vllm.model_executor.models.gemma4 import Gemma4ForCausalLM as _VllmGemma4ForCausalLM
from vllm.model_executor.models.gemma4_mm import (
    Gemma4ForConditionalGeneration as _VllmGemma4ForConditionalGeneration,
)

from vllm_hybrid_neuron.cpu.layers.bf16_linear_layers import use_bf16_linear
from vllm_hybrid_neuron.cpu.layers.moe_experts import use_plugin_moe


class Gemma4ForCausalLM(_VllmGemma4ForCausalLM):
    """vLLM's Gemma 4 text model; bf16 projections and routed experts on the plugin's ops."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        use_bf16_linear(self)
        use_plugin_moe(self)


class Gemma4ForConditionalGeneration(_VllmGemma4ForConditionalGeneration):
    """vLLM's Gemma 4 multimodal model (used text-only), served by the plugin."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        use_bf16_linear(self)
        use_plugin_moe(self)
