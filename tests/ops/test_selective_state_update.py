"""selective_state_update: C++ kernel vs reference (plain and speculative), reference vs scalar recurrence."""

import math

import pytest
import torch

from tests.ops._helpers import assert_close, padded_state
from vllm_hybrid_neuron.ops import _library
from vllm_hybrid_neuron.ops.selective_state_update import selective_state_update, selective_state_update_ref

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(T, H=4, P=8, N=16, G=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(T, H, P, dtype=dtype)
    dt = torch.randn(T, H, dtype=dtype)[..., None].expand(-1, -1, P)       # vLLM: expanded (tie_hdim)
    A = -torch.rand(H)[:, None, None].expand(-1, P, N)
    B, C = torch.randn(T, G, N, dtype=dtype), torch.randn(T, G, N, dtype=dtype)
    D = torch.randn(H)[:, None].expand(-1, P)
    z = torch.randn(T, H, P, dtype=dtype)
    dt_bias = torch.randn(H)[:, None].expand(-1, P)
    return x, dt, A, B, C, D, z, dt_bias


def test_ref_matches_scalar_recurrence():
    x, dt, A, B, C, D, z, dtb = _inputs(1, H=2, P=3, N=4, G=1)
    state = torch.randn(1, 2, 3, 4)
    expect_state, expect_out = state.clone(), torch.zeros(1, 2, 3)
    for h in range(2):
        for p in range(3):
            d = math.log1p(math.exp(dt[0, h, p] + dtb[h, p]))
            acc = 0.0
            for n in range(4):
                s = expect_state[0, h, p, n] * math.exp(A[h, p, n] * d) + d * B[0, 0, n] * x[0, h, p]
                expect_state[0, h, p, n] = s
                acc += s * C[0, 0, n]
            y = acc + D[h, p] * x[0, h, p]
            expect_out[0, h, p] = y * z[0, h, p] * torch.sigmoid(z[0, h, p])
    out = selective_state_update_ref(state, x, dt, A, B, C, D, z, dtb, True)
    assert_close(out, expect_out)
    assert_close(state, expect_state)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", DTYPES)
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("with_z", [True, False])
@pytest.mark.parametrize("N", [16, 24])
def test_plain_decode(dtype, state_dtype, G, with_z, N):
    batch = 5
    x, dt, A, B, C, D, z, dtb = _inputs(batch, N=N, G=G, dtype=dtype)
    state = padded_state(8, 4, 8, N, dtype=state_dtype)
    idx = torch.tensor([3, 0, 6, 1, 7], dtype=torch.int32)  # 0 = null block (zero state, no write)
    s1, s2 = state.clone(), state.clone()
    zz = z if with_z else None
    o1 = selective_state_update_ref(s1, x, dt, A, B, C, D, zz, dtb, True, idx, idx)
    o2 = selective_state_update(s2, x, dt, A, B, C, D, zz, dtb, True, idx, idx)
    assert_close(o2, o1, dtype, "out")
    assert_close(s2, s1, state_dtype, "state")


def test_plain_decode_no_indices_and_dst():
    x, dt, A, B, C, D, z, dtb = _inputs(3)
    state = padded_state(6, 4, 8, 16)
    src, dst = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 0])
    s1, s2 = state.clone(), state.clone()
    assert_close(selective_state_update(s2, x, dt, A, B, C, D, None, dtb, False, src, dst),
                 selective_state_update_ref(s1, x, dt, A, B, C, D, None, dtb, False, src, dst))
    assert_close(s2, s1)
    st1, st2 = torch.randn(3, 4, 8, 16), None
    st2 = st1.clone()
    assert_close(selective_state_update(st2, x, dt, A, B, C, D, z, dtb, True),
                 selective_state_update_ref(st1, x, dt, A, B, C, D, z, dtb, True))
    assert_close(st2, st1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_spec", [0, 1, 2, 3])
def test_speculative_every_accepted_count(dtype, num_spec):
    L = 1 + num_spec
    accepted = list(range(1, L + 1))
    lens = [L] * len(accepted) + [max(L - 1, 1)]
    nseq = len(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    x, dt, A, B, C, D, z, dtb = _inputs(int(cu[-1]), dtype=dtype, seed=num_spec)
    slots = 1 + nseq * L
    state = padded_state(slots, 4, 8, 16)
    idx = torch.arange(1, slots, dtype=torch.int32).view(nseq, L)
    if L > 1:
        idx[0, L - 1] = 0  # a null column: that draft's state is not written
    nacc = torch.tensor(accepted + [1], dtype=torch.int32)
    s1, s2 = state.clone(), state.clone()
    o1 = selective_state_update_ref(s1, x, dt, A, B, C, D, z, dtb, True, idx, idx,
                                    num_accepted_tokens=nacc, cu_seqlens=cu)
    o2 = selective_state_update(s2, x, dt, A, B, C, D, z, dtb, True, idx, idx,
                                num_accepted_tokens=nacc, cu_seqlens=cu)
    assert_close(o2, o1, dtype, "out")
    assert_close(s2, s1, torch.float32, "state")
    # contract: state after draft t of sequence 1 equals a plain decode from column nacc-1
    b = min(1, nseq - 1)
    h = state[idx[b, nacc[b] - 1]].clone()[None]
    for t in range(int(cu[b + 1] - cu[b])):
        tok = int(cu[b]) + t
        selective_state_update_ref(h, x[tok:tok + 1], dt[tok:tok + 1], A, B[tok:tok + 1], C[tok:tok + 1],
                                   D, z[tok:tok + 1], dtb, True)
        if int(idx[b, t]) != 0:
            assert_close(s1[idx[b, t]], h[0], torch.float32, f"draft {t}")


@pytest.mark.parametrize("state_dtype", DTYPES)
@pytest.mark.parametrize("N", [64, 128])
@pytest.mark.parametrize("L", [1, 3])
def test_model_dstate(state_dtype, N, L):
    """Real d_state sizes (the vectorised block paths), plain and speculative, aligned slots."""
    nseq, H, P = 3, 4, 16
    x, dt, A, B, C, D, z, dtb = _inputs(nseq * L, H=H, P=P, N=N, G=2, dtype=torch.bfloat16, seed=L)
    state = torch.randn(1 + nseq * L, H, P, N).to(state_dtype)
    idx = torch.arange(1, 1 + nseq * L, dtype=torch.int32).view(nseq, L)
    idx[1, 0] = 0  # null source for sequence 1: zero state, nothing written
    kw = {}
    if L > 1:
        kw = dict(num_accepted_tokens=torch.tensor([1, 2, 3], dtype=torch.int32),
                  cu_seqlens=torch.arange(0, nseq * L + 1, L, dtype=torch.int32))
        idx[1, 0] = 5
        idx[2, 1] = 0  # a null draft column: not written
    sidx = idx if L > 1 else idx[:, 0]
    s1, s2 = state.clone(), state.clone()
    o1 = selective_state_update_ref(s1, x, dt, A, B, C, D, z, dtb, True, sidx, sidx, **kw)
    o2 = selective_state_update(s2, x, dt, A, B, C, D, z, dtb, True, sidx, sidx, **kw)
    assert_close(o2, o1, torch.bfloat16, "out")
    assert_close(s2, s1, state_dtype, "state")


def test_opcheck():
    x, dt, A, B, C, D, z, dtb = _inputs(2)
    state = torch.randn(4, 4, 8, 16)
    idx = torch.tensor([[1], [2]], dtype=torch.int32)
    torch.library.opcheck(_library.ops.selective_state_update,
                          (state, x, dt, A, B, C, D, z, dtb, True, idx, idx, 0, torch.empty_like(x), None, None))
