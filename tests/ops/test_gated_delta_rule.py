"""Gated delta rule: C++ chunked / recurrent kernels vs references; references vs a naive recurrence."""

import pytest
import torch
import torch.nn.functional as F

from tests.ops._helpers import assert_close
from vllm_hybrid_neuron.ops import _library
from vllm_hybrid_neuron.ops.gated_delta_rule import (
    chunk_gated_delta_rule, chunk_gated_delta_rule_ref, fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_ref, fused_sigmoid_gating_delta_rule_update,
    fused_sigmoid_gating_delta_rule_update_ref,
)

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(T, H=2, HV=4, K=32, V=32, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    q, k = torch.randn(1, T, H, K, dtype=dtype), torch.randn(1, T, H, K, dtype=dtype)
    v = torch.randn(1, T, HV, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(1, T, HV) + 3)        # decays close to 1
    beta = torch.rand(1, T, HV).sigmoid()
    return q, k, v, g, beta


def naive(q, k, v, g, beta, h0, cu):
    """S_t = exp(g_t) S_{t-1} + beta_t (v_t - exp(g_t) S_{t-1} k_t) k_t^T, o_t = S_t q_t / sqrt(K)."""
    H, K, HV = q.shape[2], q.shape[3], v.shape[2]
    o = torch.zeros(v.shape[1], HV, v.shape[3])
    finals = []
    for n in range(cu.numel() - 1):
        S = h0[n].clone()
        for t in range(int(cu[n]), int(cu[n + 1])):
            for hv in range(HV):
                kt = F.normalize(k[0, t, hv // (HV // H)].float(), dim=0, eps=0)
                qt = F.normalize(q[0, t, hv // (HV // H)].float(), dim=0, eps=0) * K ** -0.5
                Sd = torch.exp(g[0, t, hv]) * S[hv]
                S[hv] = Sd + beta[0, t, hv] * torch.outer(v[0, t, hv].float() - Sd @ kt, kt)
                o[t, hv] = S[hv] @ qt
        finals.append(S)
    return o[None], torch.stack(finals)


def test_refs_match_naive_recurrence():
    lens = [1, 2, 70]
    q, k, v, g, beta = _inputs(sum(lens))
    cu = torch.tensor([0, 1, 3, 73], dtype=torch.int32)
    h0 = torch.randn(3, 4, 32, 32) * 0.1
    eo, ef = naive(q, k, v, g, beta, h0, cu)
    o, f = chunk_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True, cu, True)
    assert_close(o, eo, name="chunk ref out")
    assert_close(f, ef, name="chunk ref state")
    o, f = fused_recurrent_gated_delta_rule_ref(q, k, v, g, beta, None, h0.clone(), False, cu, None, None, True)
    assert_close(o, eo, name="recurrent ref out")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[1], [2], [65], [130, 3, 17]])
@pytest.mark.parametrize("dims", [(2, 4, 32, 32), (1, 2, 64, 128), (1, 1, 16, 24)])  # last: vector tails
def test_chunk_fast_vs_ref(dtype, lens, dims):
    H, HV, K, V = dims
    T = sum(lens)
    q, k, v, g, beta = _inputs(T, H, HV, K, V, dtype, seed=len(lens))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    h0 = torch.randn(len(lens), HV, V, K) * 0.1
    h0[0] = 0  # a sequence without initial state
    o1, f1 = chunk_gated_delta_rule_ref(q, k, v, g, beta, None, h0, True, cu, True)
    o2, f2 = chunk_gated_delta_rule(q, k, v, g, beta, None, h0, True, cu, True)
    assert_close(o2, o1, dtype, "out")
    assert_close(f2, f1, dtype, "final state")


def test_chunk_state_indices_in_place():
    q, k, v, g, beta = _inputs(40)
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    pool = torch.randn(5, 4, 32, 32) * 0.1
    idx = torch.tensor([3, 1], dtype=torch.int32)
    p1, p2 = pool.clone(), pool.clone()
    o1, _ = chunk_gated_delta_rule_ref(q, k, v, g, beta, None, p1, False, cu, True, initial_state_indices=idx)
    o2, _ = chunk_gated_delta_rule(q, k, v, g, beta, None, p2, False, cu, True, initial_state_indices=idx)
    assert_close(o2, o1)
    assert_close(p2, p1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_spec", [0, 1, 2, 3])
@pytest.mark.parametrize("K", [32, 48])
def test_recurrent_spec_every_accepted_count(dtype, num_spec, K):
    L = 1 + num_spec
    accepted = list(range(1, L + 1))
    lens = accepted and [L] * len(accepted) + [max(L - 1, 1)]
    nseq = len(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    q, k, v, g, beta = _inputs(int(cu[-1]), K=K, dtype=dtype, seed=num_spec)
    slots = 1 + nseq * L
    pool = torch.randn(slots, 4, 32, K) * 0.1
    idx = torch.arange(1, slots, dtype=torch.int32).view(nseq, L)
    if L > 1:
        idx[0, L - 1] = 0
    nacc = torch.tensor(accepted + [1], dtype=torch.int32)
    p1, p2 = pool.clone(), pool.clone()
    o1, _ = fused_recurrent_gated_delta_rule_ref(q, k, v, g, beta, None, p1, True, cu, idx, nacc, True)
    o2, _ = fused_recurrent_gated_delta_rule(q, k, v, g, beta, None, p2, True, cu, idx, nacc, True)
    assert_close(o2, o1, dtype, "out")
    assert_close(p2, p1, torch.float32, "state")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_gating_decode(dtype):
    q, k, v, _, _ = _inputs(6, dtype=dtype)
    torch.manual_seed(9)
    A_log, dt_bias = torch.randn(4), torch.randn(4)
    a, b = torch.randn(6, 4, dtype=dtype), torch.randn(6, 4, dtype=dtype)
    cu = torch.arange(7, dtype=torch.int32)
    idx = torch.tensor([2, 0, 5, 1, 3, -1], dtype=torch.int32)  # null and padded entries
    pool = torch.randn(7, 4, 32, 32) * 0.1
    p1, p2 = pool.clone(), pool.clone()
    o1, _ = fused_sigmoid_gating_delta_rule_update_ref(A_log, a, b, dt_bias, q, k, v, initial_state=p1,
                                                       cu_seqlens=cu, ssm_state_indices=idx,
                                                       use_qk_l2norm_in_kernel=True)
    o2, _ = fused_sigmoid_gating_delta_rule_update(A_log, a, b, dt_bias, q, k, v, initial_state=p2,
                                                   cu_seqlens=cu, ssm_state_indices=idx,
                                                   use_qk_l2norm_in_kernel=True)
    assert_close(o2, o1, dtype, "out")
    assert_close(p2, p1, torch.float32, "state")


def test_opcheck():
    q, k, v, g, beta = _inputs(5)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    pool = torch.randn(4, 4, 32, 32)
    idx = torch.tensor([[1, 2, 3], [2, 3, 0]], dtype=torch.int32)
    f = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
    out = torch.empty(5, 4, 32)
    torch.library.opcheck(_library.ops.gdn_recurrent,
                          (f(q), f(k), f(v), f(g), f(beta), 0.2, None, pool, cu, idx,
                           torch.tensor([1, 2], dtype=torch.int32), True, True, out))
    torch.library.opcheck(_library.ops.gdn_chunk,
                          (f(q), f(k), f(v), f(g), f(beta), 0.2, pool[:2].clone(), cu, None, True, 64, out))
