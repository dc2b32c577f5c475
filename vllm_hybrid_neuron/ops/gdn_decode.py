"""One Gated DeltaNet decode step (one token per sequence) in a single op.

conv update of the packed ``[q | k | v]`` row (SiLU), the gates
``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)``, l2-normalised q (times
``scale``) and k, then the gated delta rule on each value head's (V, K) state, in place.
The C++ op streams each state row once (csrc/gdn_decode.cpp); the maths is exactly the two
ops the layer ran before (``causal_conv1d_update`` + ``fused_sigmoid_gating_delta_rule_update``),
so the reference composes their references.

``gdn_spec_decode`` is the same step over a speculative verification step's 1 + drafts tokens
per sequence, the state after each token to its own slot. It runs each token through the
same arithmetic as ``gdn_decode`` on the state as plain decode would have stored it, so
speculation reproduces plain decoding bit for bit (what keeps greedy tokens unmoved).
"""

from __future__ import annotations

import torch

from vllm_hybrid_neuron.ops._library import ops, require_c
from vllm_hybrid_neuron.ops.causal_conv1d import _silu, causal_conv1d_update_ref
from vllm_hybrid_neuron.ops.gated_delta_rule import fused_sigmoid_gating_delta_rule_update_ref


def _split(qkv, num_k_heads, head_k_dim, out):
    """(batch, 2*H*K + HV*V) -> q, k (1, batch, H, K), v (1, batch, HV, V)."""
    batch, (HV, V) = qkv.shape[0], out.shape[1:]
    key_dim = num_k_heads * head_k_dim
    q, k, v = qkv.split([key_dim, key_dim, HV * V], dim=-1)
    return (q.reshape(1, batch, num_k_heads, head_k_dim), k.reshape(1, batch, num_k_heads, head_k_dim),
            v.reshape(1, batch, HV, V))


def gdn_decode_ref(qkv, a, b, conv_state, conv_weight, conv_bias, ssm_state, A_log, dt_bias,
                   slots, num_k_heads, head_k_dim, out, activation="silu", scale=None):
    """Reference decode step.

    qkv: (batch, 2*num_k_heads*head_k_dim + HV*V) projected [q | k | v]; overwritten with the
        conv output (as vLLM's conv update does)
    a, b: (batch, HV) raw gate inputs; A_log, dt_bias: (HV,)
    conv_state: (slots, conv_dim, >= width - 1), same dtype as qkv; conv_weight: (conv_dim, width)
    ssm_state: (slots, HV, V, K) fp32 or bf16, updated in place
    slots: (batch,) state slot per sequence; entries <= 0 (null block, padding) are skipped:
        states untouched, output zero
    out: (batch, HV, V), written in place; scale defaults to head_k_dim ** -0.5
    """
    batch = qkv.shape[0]
    causal_conv1d_update_ref(qkv, conv_state, conv_weight, conv_bias, activation, slots,
                             null_block_id=0)
    q, k, v = _split(qkv, num_k_heads, head_k_dim, out)
    o, _ = fused_sigmoid_gating_delta_rule_update_ref(
        A_log, a, b, dt_bias, q, k, v, scale=scale, initial_state=ssm_state,
        inplace_final_state=True, cu_seqlens=torch.arange(batch + 1, dtype=torch.int32),
        ssm_state_indices=slots, use_qk_l2norm_in_kernel=True)
    out.copy_(o[0])
    return out


def gdn_decode(qkv, a, b, conv_state, conv_weight, conv_bias, ssm_state, A_log, dt_bias,
               slots, num_k_heads, head_k_dim, out, activation="silu", scale=None):
    """Decode step (one C++ op). Same arguments and result as ``gdn_decode_ref``."""
    require_c()
    scale = head_k_dim ** -0.5 if scale is None else scale
    ops.gdn_decode(qkv, a, b, conv_state, conv_weight, conv_bias, _silu(activation), ssm_state,
                   A_log, dt_bias, slots, num_k_heads, head_k_dim, float(scale), out)
    return out


def gdn_spec_decode_ref(qkv, a, b, conv_state, conv_weight, conv_bias, ssm_state, A_log, dt_bias,
                        slots, num_accepted, cu_seqlens, num_k_heads, head_k_dim, out,
                        activation="silu", scale=None):
    """Reference speculative verification step: ``gdn_decode_ref`` for 1 + drafts tokens per
    sequence.

    qkv: (tokens, 2*num_k_heads*head_k_dim + HV*V), sequence n's tokens at
        cu_seqlens[n] .. cu_seqlens[n + 1]; overwritten with the conv output
    a, b: (tokens, HV); out: (tokens, HV, V), written in place
    slots: (seqs, 1 + drafts): the state is read from slots[n, num_accepted[n] - 1], the state
        after token t is written to slots[n, t] (entries <= 0: not written; a sequence whose
        source slot is <= 0 is skipped, output zero); num_accepted: (seqs,); cu_seqlens: (seqs + 1,)
    Other arguments as ``gdn_decode_ref``. The state is rounded to ssm_state's dtype after every
    token, as plain decode stores it.
    """
    tokens = qkv.shape[0]
    causal_conv1d_update_ref(qkv, conv_state, conv_weight, conv_bias, activation, slots[:, 0],
                             num_accepted_tokens=num_accepted, query_start_loc=cu_seqlens,
                             max_query_len=slots.shape[1], null_block_id=0)
    q, k, v = _split(qkv, num_k_heads, head_k_dim, out)
    o, _ = fused_sigmoid_gating_delta_rule_update_ref(
        A_log, a, b, dt_bias, q, k, v, scale=scale, initial_state=ssm_state,
        inplace_final_state=True, cu_seqlens=cu_seqlens, ssm_state_indices=slots,
        num_accepted_tokens=num_accepted, use_qk_l2norm_in_kernel=True)
    out.copy_(o[0].reshape(tokens, *out.shape[1:]))
    return out


def gdn_spec_decode(qkv, a, b, conv_state, conv_weight, conv_bias, ssm_state, A_log, dt_bias,
                    slots, num_accepted, cu_seqlens, num_k_heads, head_k_dim, out,
                    activation="silu", scale=None):
    """Speculative verification step (one C++ op). Same arguments and result as
    ``gdn_spec_decode_ref``; bit for bit what one ``gdn_decode`` per token computes."""
    require_c()
    scale = head_k_dim ** -0.5 if scale is None else scale
    ops.gdn_spec_decode(qkv, a, b, conv_state, conv_weight, conv_bias, _silu(activation),
                        ssm_state, A_log, dt_bias, slots, num_accepted, cu_seqlens, num_k_heads,
                        head_k_dim, float(scale), out)
    return out
