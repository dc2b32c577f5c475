"""causal_conv1d_fn / causal_conv1d_update: C++ kernels vs references, references vs the formula."""

import pytest
import torch

from tests.ops._helpers import assert_close, padded_state
from vllm_hybrid_neuron.ops import _library
from vllm_hybrid_neuron.ops.causal_conv1d import (
    causal_conv1d_fn, causal_conv1d_fn_ref, causal_conv1d_update, causal_conv1d_update_ref,
)

DTYPES = [torch.float32, torch.bfloat16]


def naive_conv(seq, w, b, silu):
    """out[:, t] = bias + sum_j w[:, j] * seq[:, t + j] over a (dim, width-1+L) window."""
    W = w.shape[1]
    L = seq.shape[1] - (W - 1)
    out = torch.stack([b + sum(w[:, j] * seq[:, t + j] for j in range(W)) for t in range(L)], 1)
    return torch.nn.functional.silu(out) if silu else out


@pytest.mark.parametrize("width", [2, 3, 4])
def test_fn_ref_matches_formula(width):
    torch.manual_seed(0)
    dim, L = 6, 5
    x, w, b = torch.randn(dim, L), torch.randn(dim, width), torch.randn(dim)
    states = torch.randn(2, dim, width - 1)
    expect = naive_conv(torch.cat([states[1], x], 1), w, b, True)
    st = states.clone()
    out = causal_conv1d_fn_ref(x, w, b, st, torch.tensor([0, L]), torch.tensor([1]), torch.tensor([True]))
    assert_close(out, expect)
    assert_close(st[1], torch.cat([states[1], x], 1)[:, -(width - 1):])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("lens", [[1], [2], [1, 2, 7], [129, 3, 0, 66]])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("layout", ["vllm", "channel-major"])
def test_fn_fast_vs_ref(dtype, width, lens, silu, layout):
    torch.manual_seed(1)
    dim, slots = 72, 8  # dim not a multiple of the 64-channel block
    T = sum(lens)
    if layout == "vllm":  # channel-last x and state, as vLLM passes them (vector path)
        x = torch.randn(T, dim, dtype=dtype).t()
        states = torch.randn(slots, width - 1 + 2, dim, dtype=dtype).transpose(1, 2)  # (slots, dim, sl)
    else:  # strided channels (scalar path)
        x = torch.randn(dim, T, dtype=dtype)
        states = torch.randn(slots, dim, width - 1 + 2, dtype=dtype)
    w, b = torch.randn(dim, width), torch.randn(dim)
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    n = len(lens)
    idx = torch.tensor([(i * 2 + 1) % slots for i in range(n)], dtype=torch.int32)
    if n > 1:
        idx[1] = -1  # padded slot
    has_init = torch.tensor([i % 2 == 0 for i in range(n)])
    s1, s2 = states.clone(), states.clone()
    o1 = causal_conv1d_fn_ref(x, w, b, s1, qsl, idx, has_init, "silu" if silu else None)
    o2 = causal_conv1d_fn(x, w, b, s2, qsl, idx, has_init, "silu" if silu else None)
    assert_close(o2, o1, dtype, "out")
    assert_close(s2, s1, dtype, "conv_states")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", ["2d", "3d"])
def test_update_plain(dtype, width, layout):
    torch.manual_seed(2)
    dim, batch, slots = 80, 4, 7
    w, b = torch.randn(dim, width), torch.randn(dim)
    x = torch.randn(batch, dim, dtype=dtype) if layout == "2d" else torch.randn(batch, dim, 2, dtype=dtype)
    idx = torch.tensor([3, 0, 5, 1], dtype=torch.int32)  # 0 = null block
    states = torch.randn(slots, width - 1, dim, dtype=dtype).transpose(1, 2)
    s1, s2 = states.clone(), states.clone()
    o1 = causal_conv1d_update_ref(x.clone(), s1, w, b, "silu", idx)
    o2 = causal_conv1d_update(x.clone(), s2, w, b, "silu", idx)
    assert_close(o2, o1, dtype, "out")
    assert_close(s2, s1, dtype, "conv_state")
    # the ref against the formula for the first sequence, single token
    if layout == "2d":
        seq = torch.cat([states[3].float(), x[0].float()[:, None]], 1)
        assert_close(o1[0], naive_conv(seq, w, b, True)[:, 0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_spec", [1, 2, 3])
@pytest.mark.parametrize("width", [3, 4])
def test_update_spec_every_accepted_count(dtype, num_spec, width):
    torch.manual_seed(3)
    dim, slots = 70, 9
    w, b = torch.randn(dim, width), torch.randn(dim)
    L = 1 + num_spec
    accepted = list(range(1, L + 1))  # every accepted count, one sequence each
    n = len(accepted) + 1
    lens = [L] * len(accepted) + [L - 1 if L > 1 else 1]  # last sequence shorter (varlen)
    qsl = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    x = torch.randn(int(qsl[-1]), dim, dtype=dtype)
    idx = torch.arange(1, n + 1, dtype=torch.int32)[:, None].repeat(1, L)  # 2-D, column 0 used
    idx[0, 0] = 0  # null block skipped
    nacc = torch.tensor(accepted + [1], dtype=torch.int32)
    states = torch.randn(slots + 2, width - 1 + num_spec, dim, dtype=dtype).transpose(1, 2)
    s1, s2 = states.clone(), states.clone()
    o1 = causal_conv1d_update_ref(x.clone(), s1, w, b, True, idx, nacc, qsl, L)
    o2 = causal_conv1d_update(x.clone(), s2, w, b, True, idx, nacc, qsl, L)
    assert_close(o2, o1, dtype, "out")
    assert_close(s2, s1, dtype, "conv_state")
    # rolling-buffer contract: window at offset num_accepted-1, then [last width-2 of it, drafts]
    b1 = 1
    off = int(nacc[b1]) - 1
    xs = x[qsl[b1]:qsl[b1 + 1]].t().float()
    win = states[2, :, off:off + width - 1].float()
    assert_close(o1[qsl[b1]:qsl[b1 + 1]].t(), naive_conv(torch.cat([win, xs], 1), w, b, True), dtype)
    assert_close(s1[2, :, : width - 2 + L], torch.cat([win[:, 1:], xs], 1), dtype)


def test_opcheck():
    torch.manual_seed(4)
    dim, W = 16, 4
    x = torch.randn(dim, 9)
    w, b = torch.randn(dim, W), torch.randn(dim)
    st = torch.randn(3, dim, W - 1)
    qsl = torch.tensor([0, 4, 9], dtype=torch.int32)
    torch.library.opcheck(_library.ops.causal_conv1d_fwd,
                          (x, w, b, st, qsl, torch.tensor([1, 2], dtype=torch.int32),
                           torch.tensor([True, False]), True, -1, torch.empty_like(x)))
    xu = torch.randn(2, dim, 1)
    torch.library.opcheck(_library.ops.causal_conv1d_update,
                          (xu, st, w, b, True, torch.tensor([1, 2], dtype=torch.int32), None, None, -1, 0,
                           torch.empty_like(xu)))
