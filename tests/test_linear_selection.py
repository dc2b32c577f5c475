"""Which kernel the plugin's CPU model classes give their bf16 dense projections
(cpu/layers/bf16_linear_layers.py), and that a layer it takes keeps its weight and serves on
bf16_linear while the layers it leaves get vLLM's dispatch."""

from __future__ import annotations

import pytest
import torch

from vllm_hybrid_neuron import envs
from vllm_hybrid_neuron.cpu.layers import bf16_linear_layers as L

# (oneDNN bf16 matmul builds, this build's kernel, AMX) -> plugin takes the projections
AUTO = [
    ((False, "avx2", False), True),          # Zen 3: torch's slow bf16 linear otherwise
    ((False, "avx512", False), True),
    ((True, "avx512_bf16", False), True),    # Zen 4: oneDNN at 56-79% of the bandwidth
    ((True, "avx512_bf16", True), False),    # AMX: oneDNN's AMX matmul stays
    ((True, "avx512", False), False),        # built without VDPBF16PS: nothing to gain
]


@pytest.mark.parametrize("machine,takes", AUTO, ids=lambda v: str(v))
def test_auto_choice(monkeypatch, machine, takes):
    onednn, isa, amx = machine
    monkeypatch.delenv(envs.LINEAR_ENV, raising=False)
    monkeypatch.setattr(L, "onednn_bf16_matmul_available", lambda: onednn)
    monkeypatch.setattr(L, "kernel_isa", lambda: isa)
    monkeypatch.setattr(L, "has_amx", lambda: amx)
    assert L.plugin_linear_wanted() is takes


@pytest.mark.parametrize("value,takes", [("plugin", True), ("vllm", False), (" Plugin ", True)])
def test_override(monkeypatch, value, takes):
    monkeypatch.setenv(envs.LINEAR_ENV, value)
    monkeypatch.setattr(L, "has_amx", lambda: True)
    assert L.plugin_linear_wanted() is takes


def test_bad_override_names_the_variable(monkeypatch):
    monkeypatch.setenv(envs.LINEAR_ENV, "onednn")
    with pytest.raises(ValueError, match=envs.LINEAR_ENV):
        L.plugin_linear_wanted()


def _layer(weight: torch.Tensor) -> torch.nn.Module:
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.bias = None
    return layer


def test_taken_layer_keeps_its_weight_and_serves_on_bf16_linear():
    torch.manual_seed(0)
    layer = _layer(torch.randn(96, 64).bfloat16())
    L.Bf16LinearMethod().process_weights_after_loading(layer)
    assert layer._vhn_bf16_linear and layer.weight.shape == (96, 64)
    x = torch.randn(3, 64).bfloat16()
    out = layer.cpu_linear(x, layer.weight, None)
    ref = torch.nn.functional.linear(x.float(), layer.weight.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_fp32_layer_gets_vllms_dispatch():
    layer = _layer(torch.randn(96, 64))
    L.Bf16LinearMethod().process_weights_after_loading(layer)
    assert not getattr(layer, "_vhn_bf16_linear", False)
    assert layer.cpu_linear is not L.PluginLinear.apply
