"""One Mamba2 decode step (one token per sequence): conv update, then selective_state_update.

Fusing the two calls takes the per-layer Python glue (splits of the projected row, stride-0
expands of A / D / dt_bias, two wrappers) out of the decode loop; the math is the two single
ops', so the reference composes their references.
"""

from __future__ import annotations

from vllm_hybrid_neuron.ops._library import ops, require_c
from vllm_hybrid_neuron.ops.causal_conv1d import _silu, causal_conv1d_update_ref
from vllm_hybrid_neuron.ops.selective_state_update import selective_state_update_ref
from vllm_hybrid_neuron.ops.slots import NULL_BLOCK_ID


def mamba2_decode_ref(
    xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, slots, ngroups, out,
    activation="silu", null_block_id=NULL_BLOCK_ID,
):
    """Reference decode step.

    xbc: (batch, nheads*headdim + 2*ngroups*dstate) projected [x | B | C]; overwritten with
        the conv output (as vLLM's conv update does)
    dt: (batch, nheads) raw dt (dt_bias and softplus applied here)
    conv_state: (slots, conv_dim, width - 1); conv_weight: (conv_dim, width); conv_bias: (conv_dim,)
    ssm_state: (slots, nheads, headdim, dstate); A, D, dt_bias: (nheads,)
    slots: (batch,) state slot per sequence (null_block_id / negative: skipped)
    out: (batch, nheads, headdim) written in place
    """
    batch = xbc.shape[0]
    nheads, headdim, dstate = ssm_state.shape[1:]
    causal_conv1d_update_ref(xbc, conv_state, conv_weight, conv_bias, activation, slots,
                             null_block_id=null_block_id)
    x, B, C = xbc.split([nheads * headdim, ngroups * dstate, ngroups * dstate], dim=-1)
    selective_state_update_ref(
        ssm_state, x.reshape(batch, nheads, headdim), dt[..., None].expand(-1, -1, headdim),
        A[:, None, None].expand(-1, headdim, dstate).float(),
        B.reshape(batch, ngroups, dstate), C.reshape(batch, ngroups, dstate),
        D=None if D is None else D[:, None].expand(-1, headdim),
        dt_bias=None if dt_bias is None else dt_bias[:, None].expand(-1, headdim),
        dt_softplus=True, state_batch_indices=slots, dst_state_batch_indices=slots,
        null_block_id=null_block_id, out=out,
    )
    return out


def mamba2_decode(
    xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, slots, ngroups, out,
    activation="silu", null_block_id=NULL_BLOCK_ID,
):
    """Decode step (one C++ op). Same arguments as ``mamba2_decode_ref``."""
    require_c()
    ops.mamba2_decode(xbc, dt, conv_state, conv_weight, conv_bias, _silu(activation),
                      ssm_state, A, D, dt_bias, slots, ngroups, null_block_id, out)
    return out
