"""What vLLM itself needs on the neuron backend: the architectures known, unsupported modes refused.

vllm-neuron 0.2 builds the model from NxDI (``MODEL_TYPES``), not from vLLM's model classes, but
vLLM's ``ModelConfig`` still resolves each architecture in its ``ModelRegistry`` first, and the
pinned vLLM 0.11 has no Qwen3.5-MoE or Gemma 4 class (and would treat Granite 4.0-H as a
Mamba hybrid, resizing cache blocks for a state that NxDI keeps on device). So every
architecture is registered with ``NxdiServedModel``, a placeholder that vLLM inspects but never
builds. A ``MODELS_CONFIG_MAP`` hook, which vLLM runs while it builds its config and before the
platform's ``check_and_update_config``, refuses speculative decoding (vllm-neuron would turn on
NxDI fused speculation, which cannot roll back a recurrent state) and turns off prefix caching
(vLLM enables it by default for non-hybrid models; the ports keep one contiguous state per
sequence slot, not NxDI's block KV layout).
"""

from __future__ import annotations

import logging
import os
from typing import ClassVar

import torch
from torch import nn

logger = logging.getLogger("vllm.hybrid_neuron")

PLACEHOLDER = "vllm_hybrid_neuron.neuron.vllm_side:NxdiServedModel"


class NxdiServedModel(nn.Module):
    """Registry placeholder: a text-generation model class vLLM can inspect; vllm-neuron serves
    the NxDI port instead, so building it is an error."""

    supports_pp: ClassVar[bool] = False

    def __init__(self, *, vllm_config=None, prefix: str = "") -> None:
        raise RuntimeError(
            "vllm-hybrid-neuron: on the neuron backend the model is built by vllm-neuron from "
            "the plugin's NxDI port; this vLLM class is only a registry entry. Is the vLLM "
            "Neuron platform plugin (vllm-neuron) installed and active?")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    get_input_embeddings = embed_input_ids

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def compute_logits(self, hidden_states: torch.Tensor, *args) -> torch.Tensor:
        raise NotImplementedError


def register_architectures(architectures) -> None:
    from vllm import ModelRegistry

    for arch in architectures:
        ModelRegistry.register_model(arch, PLACEHOLDER)
    install_config_hook(architectures)


def install_config_hook(architectures) -> None:
    """Chain ``check_neuron_engine_config`` in front of vLLM's hook for each architecture."""
    from vllm_hybrid_neuron import config_hook

    config_hook.install(architectures, check_neuron_engine_config)


def check_neuron_engine_config(vllm_config) -> None:
    """Refuse speculative decoding; turn prefix caching off (logged). Raises ValueError naming
    the setting."""
    arch = vllm_config.model_config.architecture
    if vllm_config.speculative_config is not None:
        raise ValueError(
            f"vllm-hybrid-neuron: speculative decoding (speculative_config / --speculative-config) "
            f"is not supported for {arch} on Neuron: NxDI fused speculation cannot roll back the "
            "recurrent (Mamba2 / Gated DeltaNet) state of rejected tokens, and the Gemma 4 port "
            "has no draft path. Remove --speculative-config.")
    if os.environ.get("DISABLE_NEURON_CUSTOM_SCHEDULER", "0").strip() not in ("", "0"):
        raise ValueError(
            "vllm-hybrid-neuron: DISABLE_NEURON_CUSTOM_SCHEDULER is set: vLLM's native scheduler "
            f"runs chunked prefill, which the {arch} port does not implement (vllm-neuron then "
            "asks NxDI for a block KV layout). Unset DISABLE_NEURON_CUSTOM_SCHEDULER.")
    cache_config = vllm_config.cache_config
    if cache_config.enable_prefix_caching:
        cache_config.enable_prefix_caching = False
        logger.warning(
            "vllm-hybrid-neuron: enable_prefix_caching turned off for %s on Neuron: the ports keep "
            "one contiguous state per sequence slot, not NxDI's block KV layout that vllm-neuron "
            "uses for prefix caching (pass --no-enable-prefix-caching to silence this)", arch)
