"""The gated delta rule (Gated DeltaNet): the recurrence, and its chunked WY / UT form.

Shapes: B batch, L tokens, H heads (value heads; key heads already repeated to them), Dk / Dv
key / value head dims, C chunk length. State ``state_kv``: (B, H, Dk, Dv) fp32. Per token t,
with log-space decay g_t <= 0 and write strength beta_t:

    S'  = exp(g_t) S_{t-1}
    S_t = S' + k_t (beta_t (v_t - S'^T k_t))^T        # (Dk, Dv)
    o_t = S_t^T q_t                                   # (Dv,)

q is used as given: l2-normalisation and the 1/sqrt(Dk) scale are the caller's. A token with
g = beta = 0 (padding, with k = v = 0) leaves the state untouched.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def gated_delta_rule_step(q, k, v, g, beta, state_kv):
    """One token. q, k: (..., H, Dk); v: (..., H, Dv); g, beta: (..., H);
    state_kv: (..., H, Dk, Dv). Returns o (..., H, Dv) and the new state_kv."""
    state_kv = state_kv * torch.exp(g)[..., None, None]  # (..., H, Dk, Dv)
    kv_mem = torch.einsum("...hkv,...hk->...hv", state_kv, k)  # S'^T k: (..., H, Dv)
    delta = (v - kv_mem) * beta[..., None]  # (..., H, Dv)
    state_kv = state_kv + k[..., :, None] * delta[..., None, :]
    return torch.einsum("...hkv,...hk->...hv", state_kv, q), state_kv


def gated_delta_rule(q, k, v, g, beta, state_kv):
    """The recurrence, one token at a time (the reference).

    q, k: (B, L, H, Dk); v: (B, L, H, Dv); g, beta: (B, L, H); state_kv: (B, H, Dk, Dv).
    Returns o (B, L, H, Dv) and the final state_kv (B, H, Dk, Dv), in the inputs' dtype
    (pass fp32).
    """
    outs = []
    for t in range(q.shape[1]):
        o, state_kv = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state_kv)
        outs.append(o)
    return torch.stack(outs, 1), state_kv


def unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """(I + A)^-1 for strictly lower triangular A: (..., C, C), by forward substitution.

    Row i of T = (I + A)^-1 is e_i - sum_{j<i} A_ij T_j, so each row needs only the rows above
    it: C - 1 small matmuls, no triangular solve. (neuronx-cc rejects XLA's TriangularSolve,
    which ``torch.linalg.solve_triangular`` lowers to; this uses matmul, cat and slicing only.)
    """
    C = A.shape[-1]
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand(A.shape)  # (..., C, C)
    T = eye[..., :1, :]  # (..., 1, C): row 0 of T is e_0
    for i in range(1, C):
        row = eye[..., i:i + 1, :] - A[..., i:i + 1, :i] @ T  # (..., 1, C)
        T = torch.cat([T, row], -2)  # (..., i + 1, C)
    return T


def chunk_gated_delta_rule(q, k, v, g, beta, state_kv, chunk: int = 64):
    """The same result as ``gated_delta_rule``, chunk by chunk (same arguments and returns;
    computed in fp32 whatever the inputs' dtype).

    Inside a chunk with cumulative decay G_i = g_1 + ... + g_i and S_0 the entering state,
    the per-token writes w_j = beta_j (v_j - exp(g_j) S_{j-1}^T k_j) satisfy the unit lower
    triangular system (I + A) W = beta V - (beta exp(G) K) S_0 with
    A_ij = beta_i exp(G_i - G_j) k_i.k_j (j < i). T = (I + A)^-1 (the UT transform, built by
    forward substitution: ``unit_lower_inverse``) gives U = T beta V and Wk = T beta exp(G) K,
    W = U - Wk S_0. Then
      o_i = exp(G_i) q_i S_0 + sum_{j<=i} exp(G_i - G_j) (q_i.k_j) w_j
      S_C = exp(G_C) S_0 + sum_j exp(G_C - G_j) k_j w_j^T.
    Every exponent is <= 0 (g <= 0), so nothing overflows. L is padded to a multiple of
    ``chunk`` with g = beta = 0, k = v = 0 (steps that leave the state alone).
    """
    B, L, H, Dk = k.shape
    Dv = v.shape[-1]
    pad = (-L) % chunk
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        g, beta = (F.pad(t, (0, 0, 0, pad)) for t in (g, beta))
    n = q.shape[1] // chunk
    q, k, v = (t.float().reshape(B, n, chunk, H, -1).permute(0, 3, 1, 2, 4) for t in (q, k, v))  # (B, H, n, C, D)
    g, beta = (t.float().reshape(B, n, chunk, H).permute(0, 3, 1, 2) for t in (g, beta))  # (B, H, n, C)
    G = torch.cumsum(g, -1)  # (B, H, n, C)

    causal = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool))  # j <= i
    decay = torch.exp((G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")))  # (B, H, n, C, C)
    A = (beta[..., None] * decay * (k @ k.transpose(-1, -2))).tril(-1)  # (B, H, n, C, C), strictly lower
    T = unit_lower_inverse(A)  # (B, H, n, C, C)
    U = T @ (beta[..., None] * v)  # (B, H, n, C, Dv)
    Wk = T @ ((beta * torch.exp(G))[..., None] * k)  # (B, H, n, C, Dk)
    qk = (q @ k.transpose(-1, -2)) * decay  # (B, H, n, C, C), zero above the diagonal
    q_decayed = torch.exp(G)[..., None] * q  # (B, H, n, C, Dk)
    k_to_end = torch.exp(G[..., -1:] - G)[..., None] * k  # (B, H, n, C, Dk)
    chunk_decay = torch.exp(G[..., -1])  # (B, H, n)

    state_kv = state_kv.float()
    outs = []
    for c in range(n):  # across chunks: the state recurrence
        W = U[:, :, c] - Wk[:, :, c] @ state_kv  # (B, H, C, Dv)
        outs.append(q_decayed[:, :, c] @ state_kv + qk[:, :, c] @ W)  # (B, H, C, Dv)
        state_kv = chunk_decay[:, :, c, None, None] * state_kv + k_to_end[:, :, c].transpose(-1, -2) @ W
    o = torch.stack(outs, 2)  # (B, H, n, C, Dv)
    return o.permute(0, 2, 3, 1, 4).reshape(B, n * chunk, H, Dv)[:, :L], state_kv
