"""The Mamba2 SSM (SSD): the recurrence, and the chunked scan.

Shapes: B batch, L tokens, H heads, P head dim, N state size (B and C already expanded from
their groups to the heads). State ``state_pn``: (B, H, P, N) fp32. Per token t, with step
dt_t >= 0 (after softplus / clamp) and A < 0:

    h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t^T      # (P, N)
    y_t = h_t C_t                                     # (P,)

(the D skip and the z gate are the caller's). A token with dt = 0 (padding) neither decays
nor feeds the state: exp(0 A) = 1 and dt x = 0.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def ssd_step(state_pn: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor):
    """One token (the reference recurrence), in fp32.

    state_pn: (..., H, P, N); x: (..., H, P); B, C: (..., H, N).
    dt: broadcastable to x, (..., H, 1) for Mamba2's per-head step (vLLM's
    selective_state_update also allows (..., H, P)); A: broadcastable to (H, P, N),
    (H, 1, 1) per head. Returns y (..., H, P) and the new state_pn.
    """
    dt = dt.float()
    dA = torch.exp(dt[..., None] * A.float())  # (..., H, P or 1, N or 1)
    state_pn = state_pn.float() * dA + (dt * x.float())[..., None] * B.float()[..., None, :]  # (..., H, P, N)
    y = torch.einsum("...hpn,...hn->...hp", state_pn, C.float())
    return y, state_pn


def segsum(x: torch.Tensor) -> torch.Tensor:
    """x: (..., T) -> (..., T, T) with out[i, j] = x[j+1] + ... + x[i] (i >= j), -inf above.

    Built by masking then cumsum (no subtraction of large cumsums: stable in log space).
    """
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)  # (..., T, T): column j holds x
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool), -1)
    x = x.masked_fill(~lower, 0.0)
    out = torch.cumsum(x, -2)
    return out.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), float("-inf"))


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                C: torch.Tensor, chunk: int, state_pn: torch.Tensor | None = None):
    """The same result as running ``ssd_step`` over the tokens, chunked: an L x L log-space scan
    inside each chunk, a recurrence across chunks (the SSD algorithm of Dao & Gu,
    "Transformers are SSMs", 2024). Within a chunk, with cum = cumsum(A dt):

        y_i   = sum_{j<=i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j  +  exp(cum_i) h_0 C_i
        h_end = exp(cum_L) h_0 + sum_j exp(cum_L - cum_j) (dt_j x_j) B_j^T

    x: (B, L, H, P); dt: (B, L, H) (0 on padding); A: (H,) negative; B, C: (B, L, H, N);
    state_pn: (B, H, P, N) entering state (zeros when None). With L <= chunk this is exactly
    the single L x L scan. Returns y (B, L, H, P) and the final state_pn (B, H, P, N), fp32.
    """
    Bsz, L, H, P = x.shape
    pad = (-L) % chunk
    if pad:  # padded steps have dt = 0: no decay, no input
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = x.shape[1] // chunk
    X = (x.float() * dt.float()[..., None]).reshape(Bsz, c, chunk, H, P)  # (B, c, l, H, P)
    Adt = (dt.float() * A.float()).reshape(Bsz, c, chunk, H).permute(0, 3, 1, 2)  # (B, H, c, l)
    Bc = B.float().reshape(Bsz, c, chunk, H, -1)  # (B, c, l, H, N)
    Cc = C.float().reshape(Bsz, c, chunk, H, -1)
    A_cum = torch.cumsum(Adt, -1)  # (B, H, c, l)

    # 1. within each chunk: y_t = sum_{s<=t} C_t . B_s exp(A_s+1..A_t) X_s
    decay = torch.exp(segsum(Adt))  # (B, H, c, l, l)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay, X)

    # 2. each chunk's own end state
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (B, H, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, X)  # (B, c, H, P, N)

    # 3. recurrence across chunks (c+1 x c+1 log-space scan over chunk totals)
    if state_pn is None:
        state_pn = torch.zeros_like(states[:, 0])
    states = torch.cat([state_pn.float()[:, None], states], 1)  # (B, c+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (B, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    prev_states, final_state = states[:, :-1], states[:, -1]  # (B, c, H, P, N), (B, H, P, N)

    # 4. contribution of the state entering each chunk
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, prev_states, torch.exp(A_cum))
    return y.reshape(Bsz, c * chunk, H, P)[:, :L], final_state
