"""Chunked gated delta rule (Qwen3.5 prefill) against the token-by-token recurrence."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.neuron.gdn import chunk_gated_delta_rule, gated_delta_rule


def _inputs(B, L, H, Dk, Dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, L, H, Dk, generator=g), dim=-1) * Dk ** -0.5
    k = F.normalize(torch.randn(B, L, H, Dk, generator=g), dim=-1)
    v = torch.randn(B, L, H, Dv, generator=g)
    decay = -F.softplus(torch.randn(B, L, H, generator=g))  # log decay <= 0
    beta = torch.rand(B, L, H, generator=g)
    state = torch.randn(B, H, Dk, Dv, generator=g)
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("L", [1, 2, 63, 64, 65, 130], ids=lambda L: f"T{L}")
@pytest.mark.parametrize("chunk", [64, 16], ids=lambda c: f"C{c}")
def test_chunked_equals_recurrence(L, chunk):
    q, k, v, g, beta, state = _inputs(2, L, 3, 32, 16, seed=L)
    o, final = chunk_gated_delta_rule(q, k, v, g, beta, state, chunk)
    o_ref, final_ref = gated_delta_rule(q, k, v, g, beta, state)
    assert o.shape == o_ref.shape == (2, L, 3, 16)
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
    from vllm_hybrid_neuron.neuron.gdn import unit_lower_inverse

    g = torch.Generator().manual_seed(C)
    A = (torch.rand(2, 3, C, C, generator=g) - 0.5).tril(-1)  # |A_ij| <= 0.5, like beta*decay*k.k
    T = unit_lower_inverse(A)
    eye = torch.eye(C).expand(2, 3, C, C)
    ref = torch.linalg.solve_triangular(eye + A, eye, upper=False, unitriangular=True)
    torch.testing.assert_close(T, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((eye + A) @ T, eye, rtol=1e-5, atol=1e-5)
