"""Qwen3.5-MoE: Gated DeltaNet + gated GQA + MoE with a sigmoid-gated shared expert."""

from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5MoeForCausalLM as _VllmQwen3_5MoeForCausalLM,
)
from vllm.model_executor.models.qwen3_5 import (
    Qwen3_5MoeForConditionalGeneration as _VllmQwen3_5MoeForConditionalGeneration,
)


class Qwen3_5MoeForCausalLM(_VllmQwen3_5MoeForCausalLM):
    """vLLM's Qwen3.5-MoE text model, served by the plugin's CPU backend."""


class Qwen3_5MoeForConditionalGeneration(_VllmQwen3_5MoeForConditionalGeneration):
    """vLLM's Qwen3.5-MoE multimodal model (used text-only), served by the plugin."""
