"""The shift-and-sum causal conv in ``recurrences`` against conv1d, and the conv state it leaves."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.recurrences import causal_conv, next_conv_state


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
