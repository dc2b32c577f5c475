"""tools/op_probe.py counts layer calls only once installed, once per call however often installed."""

import torch

from vllm_hybrid_neuron import envs
from vllm_hybrid_neuron.cpu.layers.gated_deltanet import PluginGatedDeltaNet, vllm_bf16_prefill_kernel
from vllm_hybrid_neuron.tools import op_probe


def test_probe_counts_each_call_once(monkeypatch):
    monkeypatch.setattr(op_probe, "_COUNTS", op_probe.Counter())
    import importlib

    # Start unwrapped (an earlier test in this process may have installed the probe); the
    # methods are put back as they were after the test.
    for module, cls_name, name in op_probe.PROBES.values():
        cls = getattr(importlib.import_module(module), cls_name)
        raw = cls.__dict__[name]
        fn = getattr(raw, "__func__", raw)
        fn = fn.__wrapped__ if getattr(fn, "_vhn_probe", None) else fn
        monkeypatch.setattr(cls, name, staticmethod(fn) if isinstance(raw, staticmethod) else fn)
    T, H, HV, K = 5, 1, 2, 64
    q, k = (torch.randn(1, T, H, K, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, T, HV, K, dtype=torch.bfloat16)
    g, beta = -torch.rand(1, T, HV) * 0.1, torch.rand(1, T, HV).to(torch.bfloat16)
    args = (torch.ops._C.chunk_gated_delta_rule_cpu, q, k, v, g, beta, torch.zeros(3, HV, K, K),
            torch.tensor([0, T], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))
    monkeypatch.setenv(envs.GDN_PREFILL_ENV, "vllm")  # "auto" takes it on AMX CPUs only
    assert vllm_bf16_prefill_kernel() is not None
    PluginGatedDeltaNet._chunk_on_vllm_kernel(*args)
    assert op_probe.snapshot() == {}  # not installed: nothing counted
    assert op_probe.install() == len(op_probe.PROBES)
    op_probe.install()  # idempotent: still one wrapper
    PluginGatedDeltaNet._chunk_on_vllm_kernel(*args)
    assert op_probe.snapshot() == {"gdn_prefill_vllm_bf16_kernel": 1}
