"""Gemma 4: sliding + global attention with different head dims, k_eq_v, softcapping."""

from vllm.model_executor.models.gemma4 import Gemma4ForCausalLM as _VllmGemma4ForCausalLM
from vllm.model_executor.models.gemma4_mm import (
    Gemma4ForConditionalGeneration as _VllmGemma4ForConditionalGeneration,
)


class Gemma4ForCausalLM(_VllmGemma4ForCausalLM):
    """vLLM's Gemma 4 text model, served by the plugin's CPU backend."""


class Gemma4ForConditionalGeneration(_VllmGemma4ForConditionalGeneration):
    """vLLM's Gemma 4 multimodal model (used text-only), served by the plugin."""
