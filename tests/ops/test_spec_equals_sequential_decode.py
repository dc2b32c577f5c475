"""A speculative verification step over L tokens must compute, bit for bit, what L plain decode
steps compute: the same outputs and the same state after every token. Otherwise speculation
moves greedy tokens wherever two candidates are close (in bf16, where the state is stored
rounded, a verification step that carried the state in fp32 between its tokens did).

Mamba2: ``mamba2_decode`` per token vs ``causal_conv1d_update`` + ``selective_state_update``
in speculative mode (the mixer's two paths). Gated DeltaNet: ``gdn_decode`` per token vs
``gdn_spec_decode``. Each with the C++ ops and with the pure-torch references.
"""

import pytest
import torch

from vllm_hybrid_neuron import ops

DTYPES = [torch.float32, torch.bfloat16]
SLOT = [[1, 2, 3, 4], [6, 7, 8, 9], [11, 12, 13, 14]]  # per sequence: 1 + 3 draft columns
IMPLS = {
    "cpp": dict(conv=ops.causal_conv1d_update, ssu=ops.selective_state_update,
                mamba2=ops.mamba2_decode, gdn=ops.gdn_decode, gdn_spec=ops.gdn_spec_decode),
    "ref": dict(conv=ops.causal_conv1d_update_ref, ssu=ops.selective_state_update_ref,
                mamba2=ops.mamba2_decode_ref, gdn=ops.gdn_decode_ref,
                gdn_spec=ops.gdn_spec_decode_ref),
}


def _spec_slots(tokens: list[int]):
    """Slots (seqs, 4), num_accepted = 1 and cu_seqlens for sequences of ``tokens`` tokens."""
    n = len(tokens)
    cu = torch.tensor([0] + torch.tensor(tokens).cumsum(0).tolist(), dtype=torch.int32)
    return torch.tensor(SLOT[:n], dtype=torch.int32), torch.ones(n, dtype=torch.int32), cu


def _sequential(step, tokens, ssm):
    """Token t of every sequence that has one, as one plain decode step per t:
    step(tok, idx) decodes tokens ``tok`` on state slots ``idx`` (column 0 of each sequence's
    slots) and returns their outputs. Returns the outputs in the spec layout (sum(tokens), ...)
    and {(sequence, t): state after its token t}."""
    outs, states = {}, {}
    for t in range(max(tokens)):
        rows = [s for s, n in enumerate(tokens) if n > t]
        tok = torch.tensor([sum(tokens[:s]) + t for s in rows])
        idx = torch.tensor([SLOT[s][0] for s in rows], dtype=torch.int32)
        for s, o in zip(rows, step(tok, idx)):
            outs[sum(tokens[:s]) + t] = o
            states[(s, t)] = ssm[SLOT[s][0]].clone()
    return torch.stack([outs[i] for i in range(sum(tokens))]), states


def _assert_bitwise_equal(spec_out, spec_states, decode_out, decode_states):
    assert torch.equal(spec_out, decode_out), (spec_out.float() - decode_out.float()).abs().max()
    for (s, t), state in decode_states.items():
        assert torch.equal(spec_states[SLOT[s][t]], state), (s, t)


# d_state: vector fast paths, and a ragged one. The ragged one is held to it by the served C++
# ops only: the references' torch reductions round a ragged row differently with the number of
# rows they see (AVX-512 torch on Zen 4: 6e-8 in fp32, as the GDN references below).
MAMBA2_CASES = [(impl, N) for impl in IMPLS for N in (16, 32)] + [("cpp", 20)]


@pytest.mark.parametrize("impl,N", MAMBA2_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [[2, 2, 2], [4, 1, 3]])
def test_mamba2_spec_equals_decode_steps(impl, dtype, N, tokens):
    f = IMPLS[impl]
    torch.manual_seed(0)
    H, P, G, W = 4, 8, 2, 4
    dim = H * P + 2 * G * N
    T = sum(tokens)
    xbc_in = torch.randn(T, dim, dtype=dtype)
    dt_in = torch.randn(T, H, dtype=dtype)
    cw, cb = (torch.randn(dim, W) * 0.5).to(dtype), torch.randn(dim).to(dtype)
    A, D, dtb = -torch.rand(H) - 0.5, torch.randn(H), torch.randn(H)
    conv0 = torch.randn(16, dim, W - 1 + 3, dtype=dtype)
    ssm0 = (torch.randn(16, H, P, N) * 0.5).to(dtype)

    # Spec: all tokens in one step, the state after token t to column t.
    slots, acc, cu = _spec_slots(tokens)
    conv, ssm = conv0.clone(), ssm0.clone()
    xbc = f["conv"](xbc_in.clone(), conv, cw, cb, "silu", conv_state_indices=slots,
                    num_accepted_tokens=acc, query_start_loc=cu, max_query_len=4)
    x, B, C = xbc.split([H * P, G * N, G * N], dim=-1)
    spec_out = torch.empty(T, H, P, dtype=dtype)
    f["ssu"](ssm, x.reshape(T, H, P), dt_in[:, :, None].expand(-1, -1, P),
             A[:, None, None].expand(-1, P, N), B.reshape(T, G, N), C.reshape(T, G, N),
             D=D[:, None].expand(-1, P), dt_bias=dtb[:, None].expand(-1, P), dt_softplus=True,
             state_batch_indices=slots, dst_state_batch_indices=slots, out=spec_out,
             num_accepted_tokens=acc, cu_seqlens=cu)
    spec_states = ssm

    # Plain decode: one token per step, the state in place in column 0.
    conv, ssm = conv0.clone(), ssm0.clone()

    def step(tok, idx):
        out = torch.empty(len(tok), H, P, dtype=dtype)
        f["mamba2"](xbc_in[tok].clone(), dt_in[tok].clone(), conv, cw, cb, ssm, A, D, dtb, idx,
                    G, out)
        return out

    _assert_bitwise_equal(spec_out, spec_states, *_sequential(step, tokens, ssm))


# The served C++ ops only: the references' torch gating and l2 norms round some elements
# differently with the number of rows they see (vectorised bodies vs tails), ~1e-8 in fp32;
# test_gdn_decode.py holds them to the C++ ops within tolerance.
@pytest.mark.parametrize("impl", ["cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("state_dtype", DTYPES)
@pytest.mark.parametrize("tokens", [[2, 2, 2], [4, 1, 3]])
def test_gdn_spec_equals_decode_steps(impl, dtype, state_dtype, tokens):
    f = IMPLS[impl]
    torch.manual_seed(0)
    Hk, K, HV, V, W = 2, 24, 4, 16, 4  # K not a multiple of the vector width
    dim = 2 * Hk * K + HV * V
    T = sum(tokens)
    qkv_in = torch.randn(T, dim, dtype=dtype)
    a_in, b_in = torch.randn(T, HV, dtype=dtype), torch.randn(T, HV, dtype=dtype)
    cw, cb = (torch.randn(dim, W) * 0.5).to(dtype), torch.randn(dim).to(dtype)
    A_log, dtb = torch.randn(HV), torch.randn(HV)
    conv0 = torch.randn(16, dim, W - 1 + 3, dtype=dtype)
    ssm0 = (torch.randn(16, HV, V, K) * 0.5).to(state_dtype)

    slots, acc, cu = _spec_slots(tokens)
    conv, ssm = conv0.clone(), ssm0.clone()
    spec_out = torch.empty(T, HV, V, dtype=dtype)
    f["gdn_spec"](qkv_in.clone(), a_in, b_in, conv, cw, cb, ssm, A_log, dtb, slots, acc, cu, Hk,
                  K, spec_out)
    spec_states = ssm

    conv, ssm = conv0.clone(), ssm0.clone()

    def step(tok, idx):
        out = torch.empty(len(tok), HV, V, dtype=dtype)
        f["gdn"](qkv_in[tok].clone(), a_in[tok].clone(), b_in[tok].clone(), conv, cw, cb, ssm,
                 A_log, dtb, idx, Hk, K, out)
        return out

    _assert_bitwise_equal(spec_out, spec_states, *_sequential(step, tokens, ssm))
