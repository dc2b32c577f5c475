"""The config hook (vllm_hybrid_neuron/cpu/config_hooks.py, chained by config_hook.py), pinned."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

from vllm_hybrid_neuron.compat import cpu_block_size
from vllm_hybrid_neuron.cpu import config_hooks
from vllm_hybrid_neuron.registration import CPU_MODELS


def _config(spec: bool, prefix_caching: bool, hybrid: bool = True):
    return SimpleNamespace(
        speculative_config=object() if spec else None,
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
        model_config=SimpleNamespace(architecture="GraniteMoeHybridForCausalLM",
                                     is_hybrid=hybrid))


def test_prefix_caching_off_only_under_speculation_of_hybrid_models():
    for spec, pc, hybrid, changed in [(True, True, True, True), (True, False, True, False),
                                      (False, True, True, False), (False, False, True, False),
                                      (True, True, False, False)]:
        cfg = _config(spec, pc, hybrid)
        assert config_hooks.disable_prefix_caching_under_speculation(cfg) is changed
        assert cfg.cache_config.enable_prefix_caching == (pc and not changed)


def _platform_config(arch: str, num_gpu_blocks):
    return SimpleNamespace(
        cache_config=SimpleNamespace(block_size=256, mamba_block_size=256,
                                     mamba_cache_mode="align", num_gpu_blocks=num_gpu_blocks),
        model_config=SimpleNamespace(architecture=arch))


def test_block_size_kept_once_the_kv_cache_is_laid_out():
    def resets_to_128(cls, vllm_config):  # what CpuPlatform does to a block size not given
        vllm_config.cache_config.block_size = 128

    patched = cpu_block_size.keeping_block_size(resets_to_128, CPU_MODELS)
    for arch, blocks, kept in [("Qwen3_5MoeForCausalLM", 1000, True),
                               ("Qwen3_5MoeForCausalLM", None, False),  # first validation
                               ("JambaForCausalLM", 1000, False)]:  # not the plugin's
        cfg = _platform_config(arch, blocks)
        patched(None, cfg)
        assert cfg.cache_config.block_size == (256 if kept else 128), (arch, blocks)


def test_vllm_code_the_block_size_patch_relies_on_is_unchanged():
    """If any of these changes in a new vLLM, revisit compat/cpu_block_size.py."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCoreProc

    from vllm_hybrid_neuron import registration

    registration.register()
    patched = CpuPlatform.check_and_update_config.__func__
    assert patched.original is not None  # installed by register() on the CPU backend
    # 1. The CPU platform resets a block size the user did not give.
    src = inspect.getsource(patched.original)
    assert "elif not cache_config.user_specified_block_size:\n" \
           "            cache_config.block_size = 128" in src
    # 2. The engine core re-validates its config after the handshake.
    assert "vllm_config.__post_init__()" in inspect.getsource(EngineCoreProc._perform_handshakes)
    # 3. The align-mode split reads the cache config's block size.
    assert "block_size = self.cache_config.block_size" in inspect.getsource(
        Scheduler._mamba_block_aligned_split)


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
