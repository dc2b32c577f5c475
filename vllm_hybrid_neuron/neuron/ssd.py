"""Mamba2 pieces written for the Neuron compiler: shift-and-sum causal conv, chunked SSD scan.

Shapes: B batch, L tokens, C channels, K conv width, H heads, P head dim, G groups,
N state size. Padded (invalid) tokens carry dt = 0: exp(0 * A) = 1 and dt * x = 0,
so they neither decay nor feed the state.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def causal_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv as K shifted multiply-adds (no conv1d: the compiler-safe form).

    x: (B, L, C); conv_state: (B, C, K-1) (the K-1 inputs before x); weight: (C, K).
    Returns (B, L, C) before the activation.
    """
    K = weight.shape[-1]
    L = x.shape[1]
    window = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], 1)  # (B, K-1+L, C)
    out = sum(window[:, j:j + L] * weight[:, j] for j in range(K))  # (B, L, C)
    return out + bias if bias is not None else out


def next_conv_state(x: torch.Tensor, conv_state: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The last K-1 *valid* inputs of each row: (B, C, K-1).

    x: (B, L, C) right-padded; lengths: (B,) valid tokens per row; conv_state: (B, C, K-1)
    (zeros for a fresh prefill) supplies the inputs when a row is shorter than K-1.
    """
    km1 = conv_state.shape[-1]
    window = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], 1)  # (B, K-1+L, C)
    idx = lengths.long()[:, None] + torch.arange(km1)[None, :]  # (B, K-1): window rows len..len+K-2
    idx = idx[:, :, None].expand(-1, -1, x.shape[-1])
    return torch.gather(window, 1, idx).transpose(1, 2)  # (B, C, K-1)


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


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                Cm: torch.Tensor, chunk: int, init_state: torch.Tensor | None = None):
    """Mamba2 SSD scan, chunked: L x L log-space scan inside each chunk, a recurrence across.

    x: (B, L, H, P); dt: (B, L, H) (after softplus, 0 on padding); A: (H,) negative;
    Bm, Cm: (B, L, H, N) (groups already expanded to heads); init_state: (B, H, P, N).
    With L <= chunk this is exactly the single L x L scan. Returns
    y: (B, L, H, P) (without the D skip) and final state (B, H, P, N), fp32.
    """
    Bsz, L, H, P = x.shape
    pad = (-L) % chunk
    if pad:  # padded steps have dt = 0: no decay, no input
        x, dt, Bm, Cm = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, Bm, Cm))
    c = x.shape[1] // chunk
    X = (x.float() * dt.float()[..., None]).reshape(Bsz, c, chunk, H, P)  # (B, c, l, H, P)
    Adt = (dt.float() * A.float()).reshape(Bsz, c, chunk, H).permute(0, 3, 1, 2)  # (B, H, c, l)
    Bc = Bm.float().reshape(Bsz, c, chunk, H, -1)  # (B, c, l, H, N)
    Cc = Cm.float().reshape(Bsz, c, chunk, H, -1)
    A_cum = torch.cumsum(Adt, -1)  # (B, H, c, l)

    # 1. within each chunk: y_t = sum_{s<=t} C_t . B_s exp(A_s+1..A_t) X_s
    decay = torch.exp(segsum(Adt))  # (B, H, c, l, l)
    y = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, decay, X)

    # 2. each chunk's own end state
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)  # (B, H, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_to_end, X)  # (B, c, H, P, N)

    # 3. recurrence across chunks (c+1 x c+1 log-space scan over chunk totals)
    if init_state is None:
        init_state = torch.zeros_like(states[:, 0])
    states = torch.cat([init_state.float()[:, None], states], 1)  # (B, c+1, H, P, N)
    chunk_decay = torch.exp(segsum(F.pad(A_cum[..., -1], (1, 0))))  # (B, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    prev_states, final_state = states[:, :-1], states[:, -1]  # (B, c, H, P, N), (B, H, P, N)

    # 4. contribution of the state entering each chunk
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, prev_states, torch.exp(A_cum))
    return y.reshape(Bsz, c * chunk, H, P)[:, :L], final_state


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             Bm: torch.Tensor, Cm: torch.Tensor):
    """One decode step. state: (B, H, P, N) fp32; x: (B, H, P); dt: (B, H); Bm, Cm: (B, H, N).

    h' = exp(dt A) h + dt x B^T;  y = h' C. Returns y (B, H, P), h'.
    """
    dA = torch.exp(dt.float() * A.float())  # (B, H)
    state = state.float() * dA[..., None, None] + \
        (dt.float()[..., None] * x.float())[..., None] * Bm.float()[:, :, None, :]  # (B, H, P, N)
    y = torch.einsum("bhpn,bhn->bhp", state, Cm.float())
    return y, state
