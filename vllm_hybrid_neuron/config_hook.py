"""Chain a per-architecture check in front of vLLM's own config hook (both backends use it).

vLLM applies ``MODELS_CONFIG_MAP[arch].verify_and_update_config(vllm_config)`` while it builds
the engine config (``VllmConfig.try_verify_and_update_config``, before the platform's
``check_and_update_config``). The plugin replaces each of its architectures' entries with a
class that runs vLLM's entry (if any), then the plugin's check.
"""

from __future__ import annotations

from typing import Callable


def install(architectures, check: Callable[[object], object]) -> None:
    """For each architecture, run ``check(vllm_config)`` after vLLM's hook (idempotent: an
    architecture already hooked by the plugin is left alone)."""
    from vllm.model_executor.models import config as vllm_model_config
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    config_map = vllm_model_config.MODELS_CONFIG_MAP
    for arch in architectures:
        previous = config_map.get(arch)
        if getattr(previous, "_vllm_hybrid_neuron_hook", False):
            continue

        class PluginConfigHook(VerifyAndUpdateConfig):
            _vllm_hybrid_neuron_hook = True
            wrapped = previous

            @classmethod
            def verify_and_update_config(cls, vllm_config) -> None:
                from vllm_hybrid_neuron.registration import announce

                announce()  # vLLM's logging is set up by now in this process
                if cls.wrapped is not None:
                    cls.wrapped.verify_and_update_config(vllm_config)
                check(vllm_config)

        config_map[arch] = PluginConfigHook
