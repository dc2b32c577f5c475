"""The gated delta rule in ``recurrences``: the recurrence against a float64 formula loop, the
chunked form against the recurrence (what the Qwen3.5 port and the ops reference run)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.recurrences import chunk_gated_delta_rule, gated_delta_rule, unit_lower_inverse

D64 = torch.float64


def _inputs(B, L, H, Dk, Dv, seed=0, dtype=torch.float32):
    """q, k, v as the port feeds them (l2-normed, q scaled); log decay <= 0; fp32 state."""
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, L, H, Dk, generator=g), dim=-1) * Dk ** -0.5
    k = F.normalize(torch.randn(B, L, H, Dk, generator=g), dim=-1)
    v = torch.randn(B, L, H, Dv, generator=g)
    decay = -F.softplus(torch.randn(B, L, H, generator=g))
    beta = torch.rand(B, L, H, generator=g)
    state = torch.randn(B, H, Dk, Dv, generator=g)
    return (*(t.to(dtype) for t in (q, k, v, decay, beta)), state)


def formula_loop(q, k, v, g, beta, S):
    """Per batch row, head and token, float64: S <- exp(g) S; S <- S + k (beta (v - S^T k))^T;
    o = S^T q. S: (B, H, Dk, Dv)."""
    q, k, v, g, beta, S = (t.to(D64) for t in (q, k, v, g, beta, S.clone()))
    B, L, H, _ = q.shape
    o = torch.zeros(B, L, H, v.shape[-1], dtype=D64)
    for b in range(B):
        for h in range(H):
            for t in range(L):
                S[b, h] = torch.exp(g[b, t, h]) * S[b, h]
                S[b, h] = S[b, h] + beta[b, t, h] * torch.outer(k[b, t, h], v[b, t, h] - S[b, h].T @ k[b, t, h])
                o[b, t, h] = S[b, h].T @ q[b, t, h]
    return o, S


@pytest.mark.parametrize("L", [1, 5, 20])
def test_recurrence_matches_the_formula(L):
    q, k, v, g, beta, state = _inputs(2, L, 3, 8, 5, seed=L)
    o, final = gated_delta_rule(q, k, v, g, beta, state)
    eo, efinal = formula_loop(q, k, v, g, beta, state)
    torch.testing.assert_close(o.to(D64), eo, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.to(D64), efinal, rtol=1e-5, atol=1e-5)


def _lengths(chunk):
    return [1, 2, chunk - 1, chunk, chunk + 1, 3 * chunk + 5]


@pytest.mark.parametrize("chunk", [64, 16], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("i", range(6), ids=["T1", "T2", "Tc-1", "Tc", "Tc+1", "T3c+5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_equals_recurrence(chunk, i, dtype):
    """bf16 inputs: the chunked form computes in fp32, so it equals the recurrence on the same
    (rounded) inputs in fp32."""
    L = _lengths(chunk)[i]
    q, k, v, g, beta, state = _inputs(2, L, 3, 32, 16, seed=L, dtype=dtype)
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk)
    o_ref, final_ref = gated_delta_rule(*(t.float() for t in (q, k, v, g, beta)), state)
    assert o.shape == o_ref.shape == (2, L, 3, 16) and o.dtype == final.dtype == torch.float32
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


def test_chunked_strong_decay_stays_finite():
    """Large |g| (cumulative log decay far below -88 in a chunk) must not overflow exp()."""
    q, k, v, g, beta, state = _inputs(1, 70, 2, 16, 8, seed=3)
    g = g * 40
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, state)
    o_ref, final_ref = gated_delta_rule(q, k, v, g, beta, state)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


def test_padded_steps_leave_state_alone():
    """Right padding as the port feeds it: g = beta = 0 and k = v = 0 after the last valid token."""
    q, k, v, g, beta, state = _inputs(2, 80, 2, 16, 8, seed=1)
    valid = 67
    _, final_ref = gated_delta_rule(q[:, :valid], k[:, :valid], v[:, :valid], g[:, :valid], beta[:, :valid], state)
    pad = torch.arange(80) >= valid  # (L,)
    k, v = k.masked_fill(pad[:, None, None], 0.0), v.masked_fill(pad[:, None, None], 0.0)
    g, beta = g.masked_fill(pad[:, None], 0.0), beta.masked_fill(pad[:, None], 0.0)
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)
    o_ref, _ = gated_delta_rule(q, k, v, g, beta, state)
    torch.testing.assert_close(o[:, :valid], o_ref[:, :valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("C", [1, 2, 16, 64])
def test_unit_lower_inverse_by_forward_substitution(C):
    """(I + A)^-1 without a triangular solve, against torch.linalg (used here only, as the oracle)."""
    g = torch.Generator().manual_seed(C)
    A = (torch.rand(2, 3, C, C, generator=g) - 0.5).tril(-1)  # |A_ij| <= 0.5, like beta*decay*k.k
    T = unit_lower_inverse(A)
    eye = torch.eye(C).expand(2, 3, C, C)
    ref = torch.linalg.solve_triangular(eye + A, eye, upper=False, unitriangular=True)
    torch.testing.assert_close(T, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((eye + A) @ T, eye, rtol=1e-5, atol=1e-5)
