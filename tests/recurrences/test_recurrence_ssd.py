"""The Mamba2 SSM in ``recurrences``: the step against a float64 formula loop, the chunked scan
against the step-by-step recurrence (what the Granite port and the ops references run)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.recurrences import segsum, ssd_chunked, ssd_step

D64 = torch.float64


def _inputs(B, L, H, P, N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, P, generator=g)
    dt = F.softplus(torch.randn(B, L, H, generator=g))
    A = -torch.rand(H, generator=g) * 2 - 0.1
    Bm, Cm = torch.randn(B, L, H, N, generator=g), torch.randn(B, L, H, N, generator=g)
    return (*(t.to(dtype) for t in (x, dt)), A, *(t.to(dtype) for t in (Bm, Cm)))


def _recurrence(x, dt, A, Bm, Cm, state):
    """ssd_step over the tokens, per-head dt and A (as the Granite port decodes)."""
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(state, x[:, t], dt[:, t, :, None], A[:, None, None], Bm[:, t], Cm[:, t])
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("per_element", [False, True], ids=["per-head", "per-element"])
def test_step_matches_the_formula(per_element):
    """h <- exp(dt A) h + dt x B^T, y = h C, per head and channel in float64; per-element dt
    (B, H, P) and A (H, P, N) as vLLM's selective_state_update allows."""
    B, L, H, P, N = 2, 4, 3, 4, 5
    x, dt, A, Bm, Cm = _inputs(B, L, H, P, N, seed=7)
    g = torch.Generator().manual_seed(8)
    dt_full = (dt[..., None] + (torch.rand(B, L, H, P, generator=g) if per_element else 0)).expand(B, L, H, P)
    A_full = (A[:, None, None] - (torch.rand(H, P, N, generator=g) if per_element else 0)).expand(H, P, N)
    state = torch.randn(B, H, P, N, generator=g)
    h, eh = state, state.to(D64).clone()
    for t in range(L):
        y, h = ssd_step(h, x[:, t], dt_full[:, t] if per_element else dt[:, t, :, None],
                        A_full if per_element else A[:, None, None], Bm[:, t], Cm[:, t])
        ey = torch.zeros(B, H, P, dtype=D64)
        for b in range(B):
            for hh in range(H):
                for p in range(P):
                    d = dt_full[b, t, hh, p].to(D64)
                    eh[b, hh, p] = torch.exp(d * A_full[hh, p].to(D64)) * eh[b, hh, p] + \
                        d * x[b, t, hh, p].to(D64) * Bm[b, t, hh].to(D64)
                    ey[b, hh, p] = eh[b, hh, p] @ Cm[b, t, hh].to(D64)
        torch.testing.assert_close(y.to(D64), ey, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.to(D64), eh, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [8, 32], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("i", range(6), ids=["T1", "T2", "Tc-1", "Tc", "Tc+1", "T3c+5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_scan_equals_recurrence(chunk, i, dtype):
    """bf16 inputs: both compute in fp32 from the same rounded inputs."""
    L = [1, 2, chunk - 1, chunk, chunk + 1, 3 * chunk + 5][i]
    B, H, P, N = 2, 4, 8, 16
    x, dt, A, Bm, Cm = _inputs(B, L, H, P, N, seed=L, dtype=dtype)
    init = torch.randn(B, H, P, N)
    y, final = ssd_chunked(x, dt, A, Bm, Cm, chunk, state_pn=init)
    y_ref, final_ref = _recurrence(x, dt, A, Bm, Cm, init)
    assert y.dtype == final.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("L,chunk", [(64, 16), (129, 32), (45, 128)], ids=lambda v: str(v))
def test_chunked_scan_equals_recurrence_more_shapes(L, chunk):
    B, H, P, N = 2, 4, 8, 16
    x, dt, A, Bm, Cm = _inputs(B, L, H, P, N)
    init = torch.randn(B, H, P, N)
    y, final = ssd_chunked(x, dt, A, Bm, Cm, chunk, state_pn=init)
    y_ref, final_ref = _recurrence(x, dt, A, Bm, Cm, init)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


def test_no_initial_state_is_a_zero_state():
    x, dt, A, Bm, Cm = _inputs(1, 11, 2, 4, 8, seed=2)
    y, final = ssd_chunked(x, dt, A, Bm, Cm, 4)
    y0, final0 = ssd_chunked(x, dt, A, Bm, Cm, 4, state_pn=torch.zeros(1, 2, 4, 8))
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(final, final0, rtol=0, atol=0)


def test_padded_steps_with_zero_dt_leave_state_alone():
    B, L, H, P, N = 1, 20, 2, 4, 8
    x, dt, A, Bm, Cm = _inputs(B, L, H, P, N, seed=1)
    _, final = ssd_chunked(x[:, :13], dt[:, :13], A, Bm[:, :13], Cm[:, :13], 8)
    dt_pad = dt.clone()
    dt_pad[:, 13:] = 0
    _, final_pad = ssd_chunked(x, dt_pad, A, Bm, Cm, 8)
    torch.testing.assert_close(final_pad, final, rtol=1e-5, atol=1e-5)


def test_segsum():
    x = torch.randn(3, 6)
    out = segsum(x)
    for i in range(6):
        for j in range(6):
            expected = x[:, j + 1:i + 1].sum(-1) if j <= i else torch.full((3,), float("-inf"))
            torch.testing.assert_close(out[:, i, j], expected, rtol=1e-6, atol=1e-6)
