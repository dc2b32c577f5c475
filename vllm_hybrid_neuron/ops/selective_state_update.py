"""Mamba2 ``selective_state_update`` (decode and speculative decode), vLLM 0.32 semantics.

Per token, per head h (group g = h // (nheads // ngroups)):
    dt    = softplus(dt + dt_bias)                        # (dim,)
    state = state * exp(A * dt) + (dt * x) B^T            # (dim, dstate)
    out   = state C + D * x, then out *= silu(z)          # (dim,)
Speculative mode (num_accepted_tokens): the initial state is read from
``state_batch_indices[b, num_accepted - 1]``, the state after token t is written to
``dst_state_batch_indices[b, t]``; null entries are skipped.

The reference's recurrence is ``vllm_hybrid_neuron.recurrences.ssd_step`` (the state rows are its
``state_pn`` layout, dt and A per element); here dt's bias / softplus, the group-to-head
expansion, D, z and the slot / speculative / null-block bookkeeping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_hybrid_neuron import recurrences
from vllm_hybrid_neuron.ops._library import ops, require_c
from vllm_hybrid_neuron.ops.slots import NULL_BLOCK_ID


def _normalize(state, x, dt, A, B, C, D, z, dt_bias, out, sbi, dsbi):
    """Add the head axis to the 2-D / 3-D single-head forms (as vLLM's wrapper does)."""
    if state.dim() == 3:
        state = state.unsqueeze(1)
    x, dt, z = (t.unsqueeze(1) if t is not None and t.dim() == 2 else t for t in (x, dt, z))
    A = A.unsqueeze(0) if A.dim() == 2 else A
    B = B.unsqueeze(1) if B.dim() == 2 else B
    C = C.unsqueeze(1) if C.dim() == 2 else C
    D = D.unsqueeze(0) if D is not None and D.dim() == 1 else D
    dt_bias = dt_bias.unsqueeze(0) if dt_bias is not None and dt_bias.dim() == 1 else dt_bias
    sbi = sbi.unsqueeze(1) if sbi is not None and sbi.dim() == 1 else sbi
    dsbi = dsbi.unsqueeze(1) if dsbi is not None and dsbi.dim() == 1 else dsbi
    if out is None:
        out = torch.empty_like(x)
    elif out.dim() == 2:
        out = out.unsqueeze(1)
    return state, x, dt, A, B, C, D, z, dt_bias, out, sbi, dsbi


def selective_state_update_ref(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
    state_batch_indices=None, dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
    out=None, num_accepted_tokens=None, cu_seqlens=None, **kwargs,
):
    """Reference selective_state_update (``recurrences.ssd_step`` per token).

    state: (slots, nheads, dim, dstate) or (slots, dim, dstate); may be a view with padded stride(0)
    x, dt, z: (tokens, nheads, dim) or (tokens, dim); dt may be a stride-0 expand of (tokens, nheads)
    A: (nheads, dim, dstate) (usually a stride-0 expand of (nheads,)); D, dt_bias: (nheads, dim)
    B, C: (tokens, ngroups, dstate)
    state_batch_indices, dst_state_batch_indices: (batch,) or (batch, max_tokens) slot indices
    null_block_id: index whose state is not read (zeros are used) nor written
    out: (tokens, nheads, dim) written in place (allocated when None) and returned
    num_accepted_tokens: (batch,) speculative mode (see module docstring)
    cu_seqlens: (batch + 1,) token offsets; without it every sequence has one token
    """
    squeeze = x.dim() == 2
    out_user = out
    (state, x, dt, A, B, C, D, z, dt_bias, out, sbi, dsbi) = _normalize(
        state, x, dt, A, B, C, D, z, dt_bias, out, state_batch_indices, dst_state_batch_indices)
    dsbi = sbi if dsbi is None else dsbi
    nheads, ngroups = x.shape[1], B.shape[1]
    batch = cu_seqlens.numel() - 1 if cu_seqlens is not None else x.shape[0]
    spec = num_accepted_tokens is not None
    for b in range(batch):
        bos, eos = (int(cu_seqlens[b]), int(cu_seqlens[b + 1])) if cu_seqlens is not None else (b, b + 1)
        if eos <= bos:
            continue
        col = max(int(num_accepted_tokens[b]) - 1, 0) if spec else 0
        src = int(sbi[b, col]) if sbi is not None else b
        valid = sbi is None or (src != null_block_id and src >= 0)
        h = state[src].float() if valid else state.new_zeros(state.shape[1:], dtype=torch.float32)
        for t in range(eos - bos):
            tok = bos + t
            d = dt[tok].float() + (dt_bias.float() if dt_bias is not None else 0.0)  # (nheads, dim)
            d = F.softplus(d) if dt_softplus else d
            Bh = B[tok].float().repeat_interleave(nheads // ngroups, 0)              # (nheads, dstate)
            Ch = C[tok].float().repeat_interleave(nheads // ngroups, 0)
            y, h = recurrences.ssd_step(h, x[tok], d, A, Bh, Ch)                     # (nheads, dim), h
            if D is not None:
                y = y + x[tok].float() * D.float()
            if z is not None:
                y = y * F.silu(z[tok].float())
            out[tok] = y.to(out.dtype)
            h = h.to(state.dtype).float()  # the next token starts from the state as stored
            if spec and valid:
                dst = int(dsbi[b, t])
                if dst != null_block_id and dst >= 0:
                    state[dst] = h.to(state.dtype)
        if not spec and valid:
            dst = int(dsbi[b, 0]) if dsbi is not None else b
            if dsbi is None or dst != null_block_id:
                state[dst] = h.to(state.dtype)
    return out.squeeze(1) if squeeze and out_user is None or (out_user is not None and out_user.dim() == 2) else out


def selective_state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
    state_batch_indices=None, dst_state_batch_indices=None, null_block_id=NULL_BLOCK_ID,
    out=None, num_accepted_tokens=None, cu_seqlens=None, **kwargs,
):
    """selective_state_update (C++ kernel). Same arguments as ``selective_state_update_ref``."""
    require_c()
    squeeze = x.dim() == 2
    out_user = out
    (state, x, dt, A, B, C, D, z, dt_bias, out, sbi, dsbi) = _normalize(
        state, x, dt, A, B, C, D, z, dt_bias, out, state_batch_indices, dst_state_batch_indices)
    ops.selective_state_update(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, sbi, dsbi,
        null_block_id if null_block_id is not None else -(2**62), out, num_accepted_tokens, cu_seqlens,
    )
    return out.squeeze(1) if squeeze and out_user is None or (out_user is not None and out_user.dim() == 2) else out
