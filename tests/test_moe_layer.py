"""Which kernel the routed MoE experts get: VLLM_HYBRID_NEURON_MOE is validated; "vllm" keeps
vLLM's experts class, "auto" (default) and "plugin" swap it (end to end: test_hf_equivalence.py
and test_cpu_backend.py, both kernels)."""

import pytest
from torch import nn

from vllm_hybrid_neuron import envs
from vllm_hybrid_neuron.cpu.layers.moe_experts import PluginCPUExperts, use_plugin_moe


def test_env_choice(monkeypatch):
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    assert issubclass(PluginCPUExperts, CPUUnquantizedExperts)
    for value, expected in [("auto", "auto"), ("", "auto"), (" VLLM ", "vllm"),
                            ("plugin", "plugin")]:
        monkeypatch.setenv(envs.MOE_ENV, value)
        assert envs.moe_kernel() == expected
        assert use_plugin_moe(nn.Linear(2, 2)) == 0  # no MoE layer to swap
    monkeypatch.setenv(envs.MOE_ENV, "fastest")
    with pytest.raises(ValueError, match=envs.MOE_ENV):
        use_plugin_moe(nn.Linear(2, 2))
