"""Fused Gated DeltaNet decode step (conv update + gating + l2 norms + recurrence) vs its
reference, and vs the two ops the layer ran before it."""

import pytest
import torch

from tests.ops._helpers import assert_close
from vllm_hybrid_neuron.ops import (
    _library,
    causal_conv1d_update,
    fused_sigmoid_gating_delta_rule_update,
    gdn_decode,
    gdn_decode_ref,
    gdn_spec_decode,
    gdn_spec_decode_ref,
)

SLOTS = 11


def _inputs(dtype, state_dtype, batch=3, H=2, ratio=2, K=32, V=24, width=4, spec=0, seed=0,
            slots=None):
    torch.manual_seed(seed)
    HV = H * ratio
    conv_dim = 2 * H * K + HV * V
    # projected rows with trailing columns: qkv is a strided view, as the layer's split gives
    proj = torch.randn(batch, conv_dim + 5, dtype=dtype)
    qkv = proj[:, :conv_dim]
    state_len = width - 1 + spec
    conv_state = torch.randn(SLOTS, state_len, conv_dim, dtype=dtype).transpose(1, 2)  # vLLM layout
    w, bias = torch.randn(conv_dim, width) * 0.5, torch.randn(conv_dim)
    # recurrent state with a padded slot stride, as vLLM's hybrid cache blocks have
    n = HV * V * K
    ssm = (torch.randn(SLOTS, n + 16) * 0.3).to(state_dtype)[:, :n].view(SLOTS, HV, V, K)
    a, b = torch.randn(batch, HV, dtype=dtype) * 2, torch.randn(batch, HV, dtype=dtype) * 2
    A_log, dt_bias = torch.randn(HV) * 0.5, torch.randn(HV)
    if slots is None:
        slots = [3, 7, 1, 5, 9, 2, 4, 8, 6, 10][:batch]
    idx = torch.tensor(slots, dtype=torch.int32)
    out = torch.full((batch, HV, V), 7.0, dtype=dtype)  # not zero: skipped rows must be zeroed
    return dict(qkv=qkv, a=a, b=b, conv_state=conv_state, conv_weight=w, conv_bias=bias,
                ssm_state=ssm, A_log=A_log, dt_bias=dt_bias, slots=idx, num_k_heads=H,
                head_k_dim=K, out=out)


def _clone(kw):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _run_both(kw):
    r, f = _clone(kw), _clone(kw)
    gdn_decode_ref(**r)
    gdn_decode(**f)
    return r, f


def _check(r, f, dtype, state_dtype):
    live = r["slots"] > 0
    assert_close(f["out"], r["out"], dtype, "out")
    assert_close(f["qkv"][live], r["qkv"][live], dtype, "conv output")
    assert_close(f["conv_state"], r["conv_state"], dtype, "conv_state")
    assert_close(f["ssm_state"], r["ssm_state"], state_dtype, "ssm_state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("ratio", [1, 2])
def test_fast_vs_ref(dtype, state_dtype, batch, ratio):
    kw = _inputs(dtype, state_dtype, batch=batch, ratio=ratio)
    _check(*_run_both(kw), dtype, state_dtype)


# K = 128 / 64 take the register-resident kernel, the rest the generic loop; odd V leaves a
# single last row; 40 is not a multiple of any vector width
@pytest.mark.parametrize("K,V", [(128, 128), (64, 33), (40, 7), (16, 1), (256, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims(K, V, dtype):
    kw = _inputs(dtype, torch.float32, batch=2, K=K, V=V)
    _check(*_run_both(kw), dtype, torch.float32)


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("spec", [0, 3])
def test_conv_widths_and_spec_columns(width, spec):
    # a conv state with speculative columns (num_spec > 0): plain decode uses its first
    # width - 1 columns only
    kw = _inputs(torch.float32, torch.float32, width=width, spec=spec)
    _check(*_run_both(kw), torch.float32, torch.float32)


def test_null_and_padding_slots_are_skipped():
    kw = _inputs(torch.float32, torch.float32, batch=4, slots=[3, 0, -1, 5])
    r, f = _run_both(kw)
    _check(r, f, torch.float32, torch.float32)
    assert torch.equal(f["out"][1:3], torch.zeros_like(f["out"][1:3]))
    untouched = [s for s in range(SLOTS) if s not in (3, 5)]
    assert torch.equal(f["ssm_state"][untouched], kw["ssm_state"][untouched])
    assert torch.equal(f["conv_state"][untouched], kw["conv_state"][untouched])
    assert torch.equal(f["qkv"][1:3], kw["qkv"][1:3])  # raw rows left as they were


def test_equals_the_two_ops_it_replaces():
    """The layer's previous decode: conv update, then sigmoid gating + recurrence."""
    dtype = torch.bfloat16
    kw = _inputs(dtype, torch.float32, batch=5, K=128, V=128, H=2)
    f = _clone(kw)
    gdn_decode(**f)
    t = _clone(kw)
    H, K, (HV, V) = kw["num_k_heads"], kw["head_k_dim"], kw["out"].shape[1:]
    x = causal_conv1d_update(t["qkv"], t["conv_state"], t["conv_weight"], t["conv_bias"], "silu",
                             conv_state_indices=t["slots"])
    q, k, v = x.split([H * K, H * K, HV * V], dim=-1)
    o, _ = fused_sigmoid_gating_delta_rule_update(
        A_log=t["A_log"], a=t["a"], b=t["b"], dt_bias=t["dt_bias"], q=q.reshape(1, -1, H, K),
        k=k.reshape(1, -1, H, K), v=v.reshape(1, -1, HV, V), initial_state=t["ssm_state"],
        inplace_final_state=True, cu_seqlens=torch.arange(6, dtype=torch.int32),
        ssm_state_indices=t["slots"], use_qk_l2norm_in_kernel=True)
    assert torch.equal(f["qkv"], x) and torch.equal(f["conv_state"], t["conv_state"])
    torch.testing.assert_close(f["out"].float(), o[0].float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(f["ssm_state"], t["ssm_state"], atol=1e-5, rtol=1e-5)


def test_a_wrong_gate_fails_the_check():
    """The comparison can fail: the reference with dt_bias dropped differs from the op."""
    kw = _inputs(torch.float32, torch.float32)
    r, f = _clone(kw), _clone(kw)
    r["dt_bias"] = torch.zeros_like(r["dt_bias"])
    gdn_decode_ref(**r)
    gdn_decode(**f)
    with pytest.raises(AssertionError):
        _check(r, f, torch.float32, torch.float32)


def test_bad_shapes_are_refused():
    kw = _inputs(torch.float32, torch.float32)
    kw["qkv"] = kw["qkv"][:, :-1]
    with pytest.raises(RuntimeError, match="gdn_decode: qkv"):
        gdn_decode(**kw)
    kw = _inputs(torch.float32, torch.float32)
    kw["conv_state"] = kw["conv_state"].to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="share one dtype"):
        gdn_decode(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    kw = _inputs(dtype, torch.float32, K=64, V=16)
    torch.library.opcheck(_library.ops.gdn_decode, (
        kw["qkv"].clone(), kw["a"], kw["b"], kw["conv_state"].clone(), kw["conv_weight"],
        kw["conv_bias"], True, kw["ssm_state"].clone(), kw["A_log"], kw["dt_bias"], kw["slots"],
        kw["num_k_heads"], kw["head_k_dim"], 64 ** -0.5, kw["out"]))


# -- gdn_spec_decode: a verification step's 1 + drafts tokens per sequence -----------------

def _spec_inputs(dtype, state_dtype, tokens, accepted, slot_rows, K=32, V=24, ratio=2):
    """Sequences of ``tokens`` tokens; ``slot_rows``: each sequence's slot columns."""
    T = sum(tokens)
    kw = _inputs(dtype, state_dtype, batch=T, K=K, V=V, ratio=ratio, spec=3)
    kw["slots"] = torch.tensor(slot_rows, dtype=torch.int32)  # (seqs, 4)
    kw["num_accepted"] = torch.tensor(accepted, dtype=torch.int32)
    kw["cu_seqlens"] = torch.tensor([0] + torch.tensor(tokens).cumsum(0).tolist(),
                                    dtype=torch.int32)
    return kw


SPEC_CASES = {  # tokens, num_accepted, slot columns (0: null block)
    "even": ([2, 2, 2], [1, 2, 1], [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]),
    # sequence 0 reads column 2 and overwrites it (token 2), as vLLM's columns are reused
    "ragged": ([4, 1, 3], [3, 1, 2], [[1, 2, 3, 4], [5, 6, 7, 8], [10, 9, 0, 0]]),
    "null source": ([2, 3], [1, 2], [[0, 2, 3, 4], [5, 6, 7, 8]]),
    "null last column": ([3, 1], [1, 1], [[1, 2, 0, 4], [5, 6, 7, 8]]),
}


def _run_spec(kw):
    r, f = _clone(kw), _clone(kw)
    gdn_spec_decode_ref(**r)
    gdn_spec_decode(**f)
    return r, f


@pytest.mark.parametrize("case", SPEC_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_spec_fast_vs_ref(case, dtype, state_dtype):
    kw = _spec_inputs(dtype, state_dtype, *SPEC_CASES[case])
    r, f = _run_spec(kw)
    assert_close(f["out"], r["out"], dtype, "out")
    assert_close(f["conv_state"], r["conv_state"], dtype, "conv_state")
    assert_close(f["ssm_state"], r["ssm_state"], state_dtype, "ssm_state")
    if case == "null source":  # sequence 0 skipped: output zero, its slots untouched
        assert torch.equal(f["out"][:2], torch.zeros_like(f["out"][:2]))
        assert torch.equal(f["ssm_state"][[2, 3, 4]], kw["ssm_state"][[2, 3, 4]])
    if case == "null last column":  # no state written for a token whose column is null
        assert torch.equal(f["ssm_state"][0], kw["ssm_state"][0])


@pytest.mark.parametrize("K,V", [(128, 16), (64, 33), (40, 7)])
def test_spec_head_dims(K, V):
    kw = _spec_inputs(torch.bfloat16, torch.bfloat16, *SPEC_CASES["ragged"], K=K, V=V)
    r, f = _run_spec(kw)
    assert_close(f["out"], r["out"], torch.bfloat16, "out")
    assert_close(f["ssm_state"], r["ssm_state"], torch.bfloat16, "ssm_state")


def test_spec_a_wrong_source_column_fails_the_check():
    """The comparison can fail: the reference reading column 0 instead of num_accepted - 1."""
    kw = _spec_inputs(torch.float32, torch.float32, *SPEC_CASES["ragged"])
    r, f = _clone(kw), _clone(kw)
    r["num_accepted"] = torch.ones_like(r["num_accepted"])
    gdn_spec_decode_ref(**r)
    gdn_spec_decode(**f)
    with pytest.raises(AssertionError):
        assert_close(f["out"], r["out"], torch.float32, "out")


def test_spec_too_many_tokens_are_refused():
    kw = _spec_inputs(torch.float32, torch.float32, [2, 2], [1, 1], [[1, 2], [3, 4]])
    kw["cu_seqlens"] = torch.tensor([0, 3, 4], dtype=torch.int32)  # 3 tokens, 2 columns
    with pytest.raises(RuntimeError, match="gdn_spec_decode: sequence 0 has 3 tokens"):
        gdn_spec_decode(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spec_opcheck(dtype):
    kw = _spec_inputs(dtype, torch.bfloat16, *SPEC_CASES["ragged"], K=64, V=16)
    torch.library.opcheck(_library.ops.gdn_spec_decode, (
        kw["qkv"].clone(), kw["a"], kw["b"], kw["conv_state"].clone(), kw["conv_weight"],
        kw["conv_bias"], True, kw["ssm_state"].clone(), kw["A_log"], kw["dt_bias"], kw["slots"],
        kw["num_accepted"], kw["cu_seqlens"], kw["num_k_heads"], kw["head_k_dim"], 64 ** -0.5,
        kw["out"]))
