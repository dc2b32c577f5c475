"""Qwen3.5-MoE: Gated DeltaNet + gated GQA + MoE with a sigmoid-gated shared expert."""

from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import (
    QwenGatedDeltaNetAttention,
)
from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5MoeForCausalLM as _VllmQwen3_5MoeForCausalLM,
)
from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5MoeForConditionalGeneration as _VllmQwen3_5MoeForConditionalGeneration,
)

from vllm_hybrid_neuron.cpu import vllm_seam
from vllm_hybrid_neuron.cpu.layers.gated_deltanet import PluginGatedDeltaNet
from vllm_hybrid_neuron.cpu.layers.class_swap import require, swap_layer_class
from vllm_hybrid_neuron.cpu.layers.bf16_linear_layers import use_bf16_linear
from vllm_hybrid_neuron.cpu.layers.moe_experts import use_plugin_moe

# Key head dims the C++ gated-delta-rule kernels take.
SUPPORTED_HEAD_DIMS = range(16, 257)


def route_gated_deltanet(model, vllm_config) -> None:
    """Check the config against the plugin's ops, then run every GDN layer on them."""
    config = vllm_config.model_config.hf_text_config
    for name in ("linear_key_head_dim", "linear_value_head_dim"):
        dim = getattr(config, name)
        require(dim in SUPPORTED_HEAD_DIMS, name, f"{dim} not supported (16..256)")
    require(2 <= config.linear_conv_kernel_dim <= 4, "linear_conv_kernel_dim",
            f"{config.linear_conv_kernel_dim} not supported (2..4)")
    require(config.linear_num_value_heads % config.linear_num_key_heads == 0,
            "linear_num_value_heads", "must be a multiple of linear_num_key_heads")
    layers = [m for m in model.modules() if type(m) is QwenGatedDeltaNetAttention]
    for layer in layers:
        require(not layer.gqa_interleaved_layout, "gqa_interleaved_layout",
                "the Qwen3-Next interleaved projection layout is not supported")
        require(hasattr(layer, "in_proj_qkvz"), "LoRA",
                "LoRA on Gated DeltaNet layers is not supported on the CPU backend")
    swap_layer_class(model, QwenGatedDeltaNetAttention, PluginGatedDeltaNet)
    for layer in layers:
        vllm_seam.rebind_forward(layer)


class Qwen3_5MoeForCausalLM(_VllmQwen3_5MoeForCausalLM):
    """vLLM's Qwen3.5-MoE text model with its Gated DeltaNet layers on the plugin's ops."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        route_gated_deltanet(self, vllm_config)
        use_bf16_linear(self)
        use_plugin_moe(self)


class Qwen3_5MoeForConditionalGeneration(_VllmQwen3_5MoeForConditionalGeneration):
    """vLLM's Qwen3.5-MoE multimodal model (used text-only), GDN on the plugin's ops."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        route_gated_deltanet(self, vllm_config)
        use_bf16_linear(self)
        use_plugin_moe(self)
