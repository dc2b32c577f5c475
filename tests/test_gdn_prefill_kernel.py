"""The bf16 chunked gated-delta-rule prefill may run on vLLM's own CPU kernel (faster in
bf16 on AMX CPUs, the default there). That kernel keeps state rows as (HV, K, V), the
transpose of the cache layout (HV, V, K) the plugin's ops use; the layer runs it on
transposed copies. Pinned here: the kernel's layout, and that output and state then equal
the reference within bf16 tolerance."""

import pytest
import torch

from tests.ops._helpers import assert_close
from vllm_hybrid_neuron import envs
from vllm_hybrid_neuron.cpu.layers import gated_deltanet
from vllm_hybrid_neuron.cpu.layers.gated_deltanet import vllm_bf16_prefill_kernel
from vllm_hybrid_neuron.ops import chunk_gated_delta_rule_ref


def test_env_choice(monkeypatch):
    monkeypatch.setenv(envs.GDN_PREFILL_ENV, "plugin")
    assert vllm_bf16_prefill_kernel() is None
    monkeypatch.setenv(envs.GDN_PREFILL_ENV, "auto")  # vLLM 0.32 CPU ships the kernel
    fast = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert (vllm_bf16_prefill_kernel() is not None) == fast
    for amx, avx512_bf16, vllms in [(True, True, True),    # AMX: vLLM's (7.6x faster there)
                                    (False, True, True),   # Zen 4: vLLM's (2.7x)
                                    (False, False, False)]:  # AVX2: the plugin's (16x)
        monkeypatch.setattr(gated_deltanet, "has_amx", lambda: amx)
        monkeypatch.setattr(gated_deltanet, "has_avx512_bf16", lambda: avx512_bf16)
        assert (vllm_bf16_prefill_kernel() is not None) is vllms
    monkeypatch.setenv(envs.GDN_PREFILL_ENV, "fastest")
    with pytest.raises(ValueError, match=envs.GDN_PREFILL_ENV):
        vllm_bf16_prefill_kernel()


def test_vllm_kernel_matches_the_reference(monkeypatch):
    monkeypatch.setenv(envs.GDN_PREFILL_ENV, "vllm")
    kernel = vllm_bf16_prefill_kernel()
    torch.manual_seed(0)
    lens, H, HV, K, V = [130, 7], 2, 4, 128, 128
    T = sum(lens)
    qkv = torch.randn(T, 2 * H * K + HV * V, dtype=torch.bfloat16)  # packed, as the layer has it
    q = qkv[:, :H * K].view(1, T, H, K)
    k = qkv[:, H * K:2 * H * K].view(1, T, H, K)
    v = qkv[:, 2 * H * K:].view(1, T, HV, V)
    g = -torch.rand(1, T, HV) * 0.2
    beta = torch.rand(1, T, HV)
    pool = torch.randn(5, HV, V, K) * 0.05
    slots = torch.tensor([3, 1], dtype=torch.int32)
    cu = torch.tensor([0, lens[0], T], dtype=torch.int32)
    ref_pool = pool.clone()
    o_ref, _ = chunk_gated_delta_rule_ref(q, k, v, g, beta, None, ref_pool, False, cu, True,
                                          initial_state_indices=slots)
    pool_kv = pool.transpose(-1, -2).contiguous()  # (slots, HV, K, V): the kernel's layout
    o, _ = kernel(q, k, v, g, beta.to(torch.bfloat16), pool_kv, False, cu, False, True, slots, 1e-6)
    assert_close(o.float(), o_ref.float(), torch.bfloat16, "out")
    assert_close(pool_kv.transpose(-1, -2), ref_pool, torch.bfloat16, "state rows updated in place")
    # in the cache's own layout the kernel's state would be wrong: if this starts to pass,
    # vLLM changed its layout and the layer's transposes must go
    pool_vk = pool.clone()
    kernel(q, k, v, g, beta.to(torch.bfloat16), pool_vk, False, cu, False, True, slots, 1e-6)
    assert (pool_vk - ref_pool).abs().max() > 0.1


def test_layer_runs_the_vllm_kernel_on_transposed_state_rows(monkeypatch):
    """The layer's own call (keyword arguments through cpu/vllm_seam.py, state rows gathered,
    transposed, scattered back) equals the reference on the cache's layout."""
    from vllm_hybrid_neuron.cpu.layers.gated_deltanet import PluginGatedDeltaNet

    monkeypatch.setenv(envs.GDN_PREFILL_ENV, "vllm")
    kernel = vllm_bf16_prefill_kernel()
    torch.manual_seed(1)
    lens, H, HV, K, V = [70, 3], 1, 2, 64, 64
    T = sum(lens)
    q, k = (torch.randn(1, T, H, K, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, T, HV, V, dtype=torch.bfloat16)
    g, beta = -torch.rand(1, T, HV) * 0.2, torch.rand(1, T, HV)
    pool = torch.randn(4, HV, V, K) * 0.05  # the cache's (slots, HV, V, K)
    slots = torch.tensor([2, 3], dtype=torch.int32)
    cu = torch.tensor([0, lens[0], T], dtype=torch.int32)
    ref_pool = pool.clone()
    o_ref, _ = chunk_gated_delta_rule_ref(q, k, v, g, beta, None, ref_pool, False, cu, True,
                                          initial_state_indices=slots)
    before = pool.clone()
    o = PluginGatedDeltaNet._chunk_on_vllm_kernel(kernel, q, k, v, g, beta.to(torch.bfloat16),
                                                  pool, cu, slots)
    assert_close(o.float(), o_ref.float(), torch.bfloat16, "out")
    assert_close(pool, ref_pool, torch.bfloat16, "state rows, cache layout")
    assert torch.equal(pool[:2], before[:2])  # other slots untouched
