"""Counts of the plugin's layer calls by kind, so tests can prove which ops served.

Installed only when ``VLLM_HYBRID_NEURON_COUNT_OPS=1`` (``envs.count_ops``; the tests set it):
it wraps the methods below in every process the plugin registers in, so the served code itself
counts nothing. Incremented once per layer call (not per token); read in a worker with
``LLM.apply_model(vllm_hybrid_neuron.tools.introspect.plugin_op_counts)``.
"""

from __future__ import annotations

import functools
import importlib
from collections import Counter

import torch

_COUNTS: Counter[str] = Counter()

# kind -> (module, class, method) whose every call is one layer call of that kind
PROBES: dict[str, tuple[str, str, str]] = {
    "mamba2_prefill": ("vllm_hybrid_neuron.cpu.layers.mamba2_mixer", "PluginMambaMixer2",
                       "_prefill"),
    "mamba2_decode": ("vllm_hybrid_neuron.cpu.layers.mamba2_mixer", "PluginMambaMixer2",
                      "_decode"),
    "mamba2_spec_decode": ("vllm_hybrid_neuron.cpu.layers.mamba2_mixer", "PluginMambaMixer2",
                           "_spec_decode"),
    "gdn_prefill": ("vllm_hybrid_neuron.cpu.layers.gated_deltanet", "PluginGatedDeltaNet",
                    "_prefill"),
    "gdn_decode": ("vllm_hybrid_neuron.cpu.layers.gated_deltanet", "PluginGatedDeltaNet",
                   "_decode"),
    "gdn_spec_decode": ("vllm_hybrid_neuron.cpu.layers.gated_deltanet", "PluginGatedDeltaNet",
                        "_spec_decode"),
    "gdn_prefill_vllm_bf16_kernel": ("vllm_hybrid_neuron.cpu.layers.gated_deltanet",
                                     "PluginGatedDeltaNet", "_chunk_on_vllm_kernel"),
    "moe_experts": ("vllm_hybrid_neuron.cpu.layers.moe_experts", "PluginCPUExperts", "apply"),
    "bf16_linear": ("vllm_hybrid_neuron.cpu.layers.bf16_linear_layers", "PluginLinear", "apply"),
}


def _counting(kind: str, method):
    @functools.wraps(method)
    def counted(*args, **kwargs):
        # Not counted while Dynamo traces (the routed experts' apply, in vLLM's compiled mode,
        # so a compiled run counts no moe_experts calls): a traced increment of this module's
        # Counter replaced the counts the opaque layers (Mamba2, GDN) kept adding to, so a
        # compiled run reported none of them.
        if not torch.compiler.is_compiling():
            _COUNTS[kind] += 1
        return method(*args, **kwargs)

    counted._vhn_probe = kind
    return counted


def install() -> int:
    """Wrap every probed method once (idempotent); returns how many are wrapped."""
    wrapped = 0
    for kind, (module, cls_name, name) in PROBES.items():
        cls = getattr(importlib.import_module(module), cls_name)
        raw = cls.__dict__[name]
        if getattr(getattr(raw, "__func__", raw), "_vhn_probe", None) is None:
            if isinstance(raw, staticmethod):
                setattr(cls, name, staticmethod(_counting(kind, raw.__func__)))
            else:
                setattr(cls, name, _counting(kind, raw))
        wrapped += 1
    return wrapped


def snapshot() -> dict[str, int]:
    return dict(_COUNTS)
