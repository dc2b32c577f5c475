"""Mamba2 ops of the Granite port against plain references: conv1d, and the step-by-step recurrence."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.neuron.ssd import causal_conv, next_conv_state, ssd_chunked, ssd_step


def _inputs(B, L, H, P, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, P, generator=g)
    dt = F.softplus(torch.randn(B, L, H, generator=g))
    A = -torch.rand(H, generator=g) * 2 - 0.1
    Bm, Cm = torch.randn(B, L, H, N, generator=g), torch.randn(B, L, H, N, generator=g)
    return x, dt, A, Bm, Cm


def _recurrence(x, dt, A, Bm, Cm, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t])
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("L,chunk", [(1, 8), (2, 8), (17, 8), (64, 16), (129, 32), (45, 128)],
                         ids=lambda v: str(v))
def test_chunked_scan_equals_recurrence(L, chunk):
    B, H, P, N = 2, 4, 8, 16
    x, dt, A, Bm, Cm = _inputs(B, L, H, P, N)
    init = torch.randn(B, H, P, N)
    y, final = ssd_chunked(x, dt, A, Bm, Cm, chunk, init_state=init)
    y_ref, final_ref = _recurrence(x, dt, A, Bm, Cm, init)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, final_ref, rtol=1e-4, atol=1e-4)


def test_padded_steps_with_zero_dt_leave_state_alone():
    B, L, H, P, N = 1, 20, 2, 4, 8
    x, dt, A, Bm, Cm = _inputs(B, L, H, P, N, seed=1)
    _, final = ssd_chunked(x[:, :13], dt[:, :13], A, Bm[:, :13], Cm[:, :13], 8)
    dt_pad = dt.clone()
    dt_pad[:, 13:] = 0
    _, final_pad = ssd_chunked(x, dt_pad, A, Bm, Cm, 8)
    torch.testing.assert_close(final_pad, final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L", [1, 2, 3, 5, 33])
def test_shift_sum_conv_equals_conv1d(L):
    B, C, K = 2, 6, 4
    g = torch.Generator().manual_seed(L)
    x, w, b = torch.randn(B, L, C, generator=g), torch.randn(C, K, generator=g), torch.randn(C, generator=g)
    state = torch.randn(B, C, K - 1, generator=g)
    ref = F.conv1d(torch.cat([state, x.transpose(1, 2)], -1), w[:, None], b, groups=C)  # (B, C, L)
    torch.testing.assert_close(causal_conv(x, state, w, b), ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_next_conv_state_takes_last_valid_inputs():
    B, L, C, K = 3, 6, 2, 4
    x = torch.arange(B * L * C, dtype=torch.float32).view(B, L, C)
    state = -torch.ones(B, C, K - 1)
    lengths = torch.tensor([6, 2, 0])
    got = next_conv_state(x, state, lengths)  # (B, C, K-1)
    torch.testing.assert_close(got[0], x[0, 3:6].T)
    torch.testing.assert_close(got[1], torch.cat([state[1, :, :1], x[1, :2].T], -1))
    torch.testing.assert_close(got[2], state[2])
