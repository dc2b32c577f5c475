"""The CPU backend's per-architecture config hook (chained by ``config_hook.install``).

vLLM 0.32 applies ``MODELS_CONFIG_MAP[arch].verify_and_update_config(vllm_config)``
while it builds the engine config (``VllmConfig.try_verify_and_update_config``),
before ``HybridAttentionMambaModelConfig`` derives the Mamba cache mode from
``enable_prefix_caching``. The plugin chains its own hook in front of whatever vLLM
has for its architectures.

What it changes, on the CPU backend only: speculative decoding together with
prefix caching. vLLM's GPU model runner (which the CPU runner inherits) moves hybrid
state between cache blocks for that combination with Triton kernels
(``v1/worker/mamba_utils.py``: ``run_fused_precopy`` / ``run_fused_postprocess``),
and Triton has no CPU backend, so the engine dies on its first decode. The hook turns
prefix caching off for such an engine and says so; speculative decoding, and prefix
caching without it, are unaffected. ``tests/test_config_hooks.py`` pins the vLLM code
this relies on.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.hybrid_neuron")


def install(architectures) -> None:
    """Chain the CPU backend's check in front of vLLM's hook for each architecture (idempotent)."""
    from vllm_hybrid_neuron import config_hook

    config_hook.install(architectures, disable_prefix_caching_under_speculation)


def disable_prefix_caching_under_speculation(vllm_config) -> bool:
    """Turn prefix caching off when speculative decoding is on; True if it did."""
    cache_config = vllm_config.cache_config
    if (vllm_config.speculative_config is None or not cache_config.enable_prefix_caching
            or not vllm_config.model_config.is_hybrid):  # Gemma 4: no recurrent state to move
        return False
    cache_config.enable_prefix_caching = False
    logger.warning(
        "vllm-hybrid-neuron: enable_prefix_caching turned off for %s: speculative "
        "decoding with prefix caching of hybrid state needs vLLM's Triton state-copy "
        "kernels, which do not run on CPU",
        vllm_config.model_config.architecture)
    return True
