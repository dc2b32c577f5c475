"""The config hook (vllm_hybrid_neuron/cpu/config_hooks.py, chained by config_hook.py), pinned."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from vllm_hybrid_neuron.cpu import config_hooks
from vllm_hybrid_neuron.registration import CPU_MODELS


def _config(spec: bool, prefix_caching: bool):
    return SimpleNamespace(
        speculative_config=object() if spec else None,
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
        model_config=SimpleNamespace(architecture="GraniteMoeHybridForCausalLM"))


def test_prefix_caching_off_only_under_speculation():
    for spec, pc, changed in [(True, True, True), (True, False, False),
                              (False, True, False), (False, False, False)]:
        cfg = _config(spec, pc)
        assert config_hooks.disable_prefix_caching_under_speculation(cfg) is changed
        assert cfg.cache_config.enable_prefix_caching == (pc and not spec)


def test_hook_chains_vllms_own_and_is_idempotent():
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    before = {arch: MODELS_CONFIG_MAP.get(arch) for arch in CPU_MODELS}
    try:
        config_hooks.install(CPU_MODELS)
        installed = {arch: MODELS_CONFIG_MAP[arch] for arch in CPU_MODELS}
        config_hooks.install(CPU_MODELS)
        for arch in CPU_MODELS:
            assert MODELS_CONFIG_MAP[arch] is installed[arch]
            original = before[arch]
            if getattr(original, "_vllm_hybrid_neuron_hook", False):
                original = original.wrapped
            assert installed[arch].wrapped is original
    finally:
        MODELS_CONFIG_MAP.update(before)


def test_vllm_code_the_hook_relies_on_is_unchanged():
    """If either fact changes in a new vLLM, revisit config_hooks.py."""
    from vllm.config.vllm import VllmConfig
    from vllm.v1.worker import mamba_utils

    # 1. Per-arch hooks run before the hybrid hook derives the Mamba cache mode.
    src = inspect.getsource(VllmConfig.try_verify_and_update_config)
    assert src.index("cls.verify_and_update_config(self)") < src.index(
        "HybridAttentionMambaModelConfig.verify_and_update_config(self)")
    # 2. Speculation + align-mode state moves are Triton kernels (no CPU backend).
    ctx = mamba_utils.MambaSpecDecodeGPUContext
    assert "[grid](" in inspect.getsource(ctx.run_fused_precopy)
    assert "[grid](" in inspect.getsource(ctx.run_fused_postprocess)
