"""Keep the hybrid cache block size the engine core laid its KV cache out with (vLLM 0.32, CPU).

The one patch of vLLM internals on the CPU backend, and why:

- vLLM's CPU worker enlarges ``cache_config.block_size`` until an attention page holds a
  Mamba / GDN state page (``Platform._align_hybrid_block_size``: 256 tokens for the tiny
  Qwen3.5 in fp32), and the engine core adopts the KV cache groups' size
  (``EngineCore._initialize_kv_caches``).
- After its start-up handshake the engine-core process re-runs ``VllmConfig.__post_init__``
  (``EngineCoreProc._perform_handshakes``), and ``CpuPlatform.check_and_update_config`` resets
  a block size the user did not give to 128.
- The scheduler's align-mode split (``Scheduler._mamba_block_aligned_split``) reads that
  128: a prompt's last prefill chunk stops at ``(len - 1) // 128 * 128``, which is a state
  boundary only when it is also a multiple of 256. So a repeated 690- or 1024-token Qwen3.5
  prompt got no cached tokens while 314- or 640-token ones did (measured; the output was right,
  the state was just never kept). With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (no handshake)
  the same prompts hit.

The patch wraps ``CpuPlatform.check_and_update_config``: for the plugin's architectures, once
the KV cache is laid out (``num_gpu_blocks`` set, which only the engine core's re-validation
sees), the block size it was laid out with is kept. ``tests/test_config_hooks.py`` pins the
vLLM code this relies on and fails when it changes.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.hybrid_neuron")


def install(architectures) -> None:
    """Wrap ``CpuPlatform.check_and_update_config`` (idempotent)."""
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.check_and_update_config.__func__
    if getattr(original, "original", None) is not None:
        return
    CpuPlatform.check_and_update_config = classmethod(keeping_block_size(original, architectures))


def keeping_block_size(original, architectures):
    """``original`` (a platform's ``check_and_update_config(cls, vllm_config)``), except that for
    ``architectures`` a block size the KV cache was laid out with survives it."""
    archs = frozenset(architectures)

    def check_and_update_config(cls, vllm_config) -> None:
        cache_config, model_config = vllm_config.cache_config, vllm_config.model_config
        laid_out = bool(cache_config.num_gpu_blocks and model_config is not None
                        and model_config.architecture in archs)
        block_size = cache_config.block_size
        original(cls, vllm_config)
        if laid_out and cache_config.block_size != block_size:
            logger.debug("vllm-hybrid-neuron: kept block_size %d (CpuPlatform reset it to %d "
                         "after the KV cache was laid out)", block_size, cache_config.block_size)
            cache_config.block_size = block_size
            if cache_config.mamba_cache_mode == "align":
                cache_config.mamba_block_size = block_size

    check_and_update_config.original = original
    return check_and_update_config
