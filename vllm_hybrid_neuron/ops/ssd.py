"""Mamba2 chunked SSD prefill with ``mamba_chunk_scan_combined_varlen`` semantics.

The sequence is cut into chunks (``cu_chunk_seqlens``; a chunk never spans two sequences,
``seq_idx[c]`` is its sequence). Within a chunk of length L, with ``cum = cumsum(A * dt)``:
    Y     = (C B^T o exp(cum_i - cum_j)[j <= i] o dt_j) X  +  exp(cum_i) C_i S_prev^T
    S_end = exp(cum_L) S_prev + X^T (B o exp(cum_L - cum_j) dt_j)
(the SSD algorithm of Dao & Gu, "Transformers are SSMs", 2024). Returns the state at the end
of every chunk when ``return_intermediate_states`` (prefix-caching "align" mode indexes it with
``last_chunk_indices`` and reads block-boundary checkpoints from it), else one final state per
sequence.

The reference runs ``vllm_hybrid_neuron.recurrences.ssd_chunked`` on each chunk (one L x L scan,
entering state from the previous chunk of the same sequence); it adds dt's bias / softplus /
clamp, the group-to-head expansion, D and z, and the chunk / sequence bookkeeping.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_hybrid_neuron import recurrences
from vllm_hybrid_neuron.ops._library import ops, require_c


def _dt(dt, dt_bias, dt_softplus, dt_limit):
    d = dt.float()
    if dt_bias is not None:
        d = d + dt_bias.float()
    if dt_softplus:
        d = torch.where(d <= 20.0, F.softplus(d), d)
    return d.clamp(dt_limit[0], dt_limit[1])


def mamba_chunk_scan_combined_varlen_ref(
    x, dt, A, B, C, chunk_size, cu_seqlens, cu_chunk_seqlens, last_chunk_indices, seq_idx, out,
    D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
    dt_limit=(0.0, float("inf")), return_intermediate_states=False, state_dtype=None,
):
    """Reference chunked SSD (``recurrences.ssd_chunked``, one chunk at a time).

    x: (seqlen, nheads, headdim); dt: (seqlen, nheads); A: (nheads,)
    B, C: (seqlen, ngroups, dstate)
    chunk_size: int (chunks are given by cu_chunk_seqlens; kept for signature compatibility)
    cu_seqlens: (batch + 1,); cu_chunk_seqlens: (nchunks + 1,); last_chunk_indices: (batch,)
    seq_idx: (nchunks,) sequence of each chunk
    out: (seqlen, nheads, headdim) written in place
    D: (nheads, headdim) or (nheads,); z: (seqlen, nheads, headdim); dt_bias: (nheads,)
    initial_states: (batch, nheads, headdim, dstate) or None
    Returns (nchunks, nheads, headdim, dstate) if return_intermediate_states else
    (batch, nheads, headdim, dstate), in state_dtype (default x.dtype).
    """
    nheads, ngroups = x.shape[1], B.shape[1]
    rep = nheads // ngroups
    dtp = _dt(dt, dt_bias, dt_softplus, dt_limit)  # (seqlen, nheads)
    nchunks = cu_chunk_seqlens.numel() - 1
    states = x.new_zeros(nchunks, nheads, x.shape[2], B.shape[2], dtype=torch.float32)
    for c in range(nchunks):
        s, e, seq = int(cu_chunk_seqlens[c]), int(cu_chunk_seqlens[c + 1]), int(seq_idx[c])
        first = c == 0 or int(seq_idx[c - 1]) != seq
        if first:
            prev = (initial_states[seq].float() if initial_states is not None
                    else torch.zeros_like(states[0]))                       # (nheads, headdim, dstate)
        else:
            prev = states[c - 1]
        Bh = B[s:e].float().repeat_interleave(rep, 1)                       # (L, nheads, dstate)
        Ch = C[s:e].float().repeat_interleave(rep, 1)
        Y, S = recurrences.ssd_chunked(x[None, s:e].float(), dtp[None, s:e], A, Bh[None], Ch[None],
                                       chunk=e - s, state_pn=prev[None])  # one L x L scan
        Y, states[c] = Y[0], S[0]                                           # (L, nheads, headdim)
        if D is not None:
            Dh = D.float() if D.dim() == 2 else D.float()[:, None]
            Y = Y + x[s:e].float() * Dh
        if z is not None:
            Y = Y * F.silu(z[s:e].float())
        out[s:e] = Y.to(out.dtype)
    res = states if return_intermediate_states else states[last_chunk_indices.long()]
    return res.to(state_dtype if state_dtype is not None else x.dtype)


def mamba_chunk_scan_combined_varlen(
    x, dt, A, B, C, chunk_size, cu_seqlens, cu_chunk_seqlens, last_chunk_indices, seq_idx, out,
    D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
    dt_limit=(0.0, float("inf")), return_intermediate_states=False, state_dtype=None,
):
    """Chunked SSD prefill (C++ kernel, GEMMs per chunk). Same arguments as the reference."""
    require_c()
    nchunks = cu_chunk_seqlens.numel() - 1
    states = torch.empty(nchunks, x.shape[1], x.shape[2], B.shape[2], dtype=torch.float32)
    ops.ssd_chunk_scan(
        x, dt, A, B, C, D, z, dt_bias, initial_states, cu_chunk_seqlens, seq_idx, dt_softplus,
        float(dt_limit[0]), float(dt_limit[1]), out, states,
    )
    res = states if return_intermediate_states else states[last_chunk_indices.long()]
    return res.to(state_dtype if state_dtype is not None else x.dtype)
