"""One Gated DeltaNet decode step (one token per sequence) in a single op.

conv update of the packed ``[q | k | v]`` row (SiLU), the gates
``g = -exp(A_log) softplus(a + dt_bias)``, ``beta = sigmoid(b)``, l2-normalised q (times
``scale``) and k, then the gated delta rule on each value head's (V, K) state, in place.
The C++ op streams each state row once (csrc/gdn_decode.cpp); the maths is exactly the two
ops the layer ran before (``causal_conv1d_update`` + ``fused_sigmoid_gating_delta_rule_update``),
so the reference composes their references.
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
