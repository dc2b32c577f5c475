"""Fused Mamba2 decode step (conv update + selective_state_update) vs its reference and vs the
two single ops it fuses."""

import pytest
import torch

from tests.ops._helpers import assert_close
from vllm_hybrid_neuron.ops import (
    _library,
    causal_conv1d_update,
    mamba2_decode,
    mamba2_decode_ref,
    selective_state_update,
)


def _inputs(dtype, G, width=4, batch=5, H=6, P=16, N=32, slots=9, seed=0):
    torch.manual_seed(seed)
    conv_dim = H * P + 2 * G * N
    # projected rows with trailing dt columns: xbc is a strided view, as in vLLM's mixer
    proj = torch.randn(batch, conv_dim + H, dtype=dtype)
    xbc, dt = proj[:, :conv_dim], proj[:, conv_dim:]
    conv_state = torch.randn(slots, width - 1, conv_dim, dtype=dtype).transpose(1, 2)  # vLLM layout
    w, b = torch.randn(conv_dim, width) * 0.5, torch.randn(conv_dim)
    # ssm state with a padded slot stride, as vLLM's hybrid cache blocks have
    ssm = torch.randn(slots, H * P * N + 64, dtype=dtype)[:, :H * P * N].view(slots, H, P, N) * 0.3
    A, D, dtb = -torch.rand(H) - 0.1, torch.randn(H), torch.randn(H)
    idx = torch.tensor([3, 0, 7, 1, 5][:batch], dtype=torch.int32)  # 0 = null block: skipped
    return xbc, dt, conv_state, w, b, ssm, A, D, dtb, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("width", [2, 4])
def test_fast_vs_ref(dtype, G, width):
    xbc, dt, cs, w, b, ssm, A, D, dtb, idx = _inputs(dtype, G, width)
    H, P = ssm.shape[1], ssm.shape[2]
    x1, cs1, s1 = xbc.clone(), cs.clone(), ssm.clone()
    x2, cs2, s2 = xbc.clone(), cs.clone(), ssm.clone()
    o1 = torch.zeros(xbc.shape[0], H, P, dtype=dtype)
    o2 = o1.clone()
    mamba2_decode_ref(x1, dt, cs1, w, b, s1, A, D, dtb, idx, G, o1)
    mamba2_decode(x2, dt, cs2, w, b, s2, A, D, dtb, idx, G, o2)
    live = idx != 0
    assert_close(o2[live], o1[live], dtype, "out")
    assert_close(x2[live], x1[live], dtype, "conv output")
    assert_close(cs2, cs1, dtype, "conv_state")
    assert_close(s2, s1, dtype, "ssm_state")
    assert torch.equal(s2[0], ssm[0]) and torch.equal(cs2[0], cs[0])  # null block untouched


def test_equals_the_two_single_ops():
    dtype, G = torch.bfloat16, 2
    xbc, dt, cs, w, b, ssm, A, D, dtb, idx = _inputs(dtype, G)
    H, P, N = ssm.shape[1:]
    x1, cs1, s1 = xbc.clone(), cs.clone(), ssm.clone()
    o1 = torch.zeros(xbc.shape[0], H, P, dtype=dtype)
    mamba2_decode(x1, dt, cs1, w, b, s1, A, D, dtb, idx, G, o1)
    x2, cs2, s2 = xbc.clone(), cs.clone(), ssm.clone()
    o2 = torch.zeros_like(o1)
    causal_conv1d_update(x2, cs2, w, b, "silu", idx)
    x, B, C = x2.split([H * P, G * N, G * N], dim=-1)
    selective_state_update(s2, x.reshape(-1, H, P), dt[..., None].expand(-1, -1, P),
                           A[:, None, None].expand(-1, P, N), B.reshape(-1, G, N), C.reshape(-1, G, N),
                           D=D[:, None].expand(-1, P), dt_bias=dtb[:, None].expand(-1, P),
                           dt_softplus=True, state_batch_indices=idx, dst_state_batch_indices=idx, out=o2)
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and torch.equal(cs1, cs2)


def test_bad_shapes_are_refused():
    xbc, dt, cs, w, b, ssm, A, D, dtb, idx = _inputs(torch.float32, 1)
    out = torch.zeros(xbc.shape[0], ssm.shape[1], ssm.shape[2])
    with pytest.raises(RuntimeError, match="mamba2_decode: xbc"):
        mamba2_decode(xbc[:, :-1], dt, cs, w, b, ssm, A, D, dtb, idx, 1, out)


def test_opcheck():
    xbc, dt, cs, w, b, ssm, A, D, dtb, idx = _inputs(torch.float32, 2)
    out = torch.zeros(xbc.shape[0], ssm.shape[1], ssm.shape[2])
    torch.library.opcheck(_library.ops.mamba2_decode,
                          (xbc.clone(), dt, cs.clone(), w, b, True, ssm.clone(), A, D, dtb, idx, 2, 0, out))
