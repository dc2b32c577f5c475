"""Gated delta rule (Gated DeltaNet / Qwen3-Next / Qwen3.5 linear attention), vLLM 0.32 signatures.

Per value head, state S: (V, K); per token with decay g (log space) and beta:
    S <- exp(g) S;   u = beta (v - S k);   S <- S + u k^T;   o = S (scale q)
q/k have H heads, v has HV >= H heads (value head hv reads key head hv // (HV // H)).
``chunk_gated_delta_rule``: chunked prefill (WY form, chunk 64). ``fused_recurrent_gated_delta_rule``
and ``fused_sigmoid_gating_delta_rule_update``: decode / speculative decode with state indices:
initial state from ``ssm_state_indices[n, num_accepted - 1]``, state after token t to
``ssm_state_indices[n, t]``; entries <= 0 (null block / padding) are skipped.

The ``*_ref`` functions are the references the C++ kernels are tested against: the maths is
``vllm_hybrid_neuron.recurrences.gated_delta_rule`` (state ``(H, Dk, Dv)`` there, the transpose
of these (HV, V, K) rows); here only the head repeat, q/k l2-norm and scale, the varlen /
slot / speculative bookkeeping and the layout transposes.
"""

from __future__ import annotations

import torch

from vllm_hybrid_neuron.ops._library import ops, require_c
from vllm_hybrid_neuron import recurrences

CHUNK = 64


def _l2(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def _flat(t):
    """[B, T, ...] -> [B*T, ...] (B is 1 for varlen)."""
    return t.reshape(-1, *t.shape[2:])


# ----------------------------------------------------------------------------- recurrent
def fused_recurrent_gated_delta_rule_ref(
    q, k, v, g, beta=None, scale=None, initial_state=None, inplace_final_state=True,
    cu_seqlens=None, ssm_state_indices=None, num_accepted_tokens=None, use_qk_l2norm_in_kernel=False,
):
    """Reference recurrent gated delta rule (``recurrences.gated_delta_rule_step`` per token).

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV] (g in log space)
    initial_state: [slots, HV, V, K] (with ssm_state_indices) or [N, HV, V, K]
    inplace_final_state: write states into initial_state (by index) instead of returning a new
        [B*T, HV, V, K] tensor of per-token states
    cu_seqlens: [N + 1] (B must be 1); without it each of the B*T rows is its own sequence of... 
        one token when B == 1, else the B sequences have T tokens each
    ssm_state_indices: [N] or [N, T_max]; num_accepted_tokens: [N] (speculative decoding)
    Returns (o [B, T, HV, V], final_state).
    """
    Bsz, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    beta = torch.ones_like(g) if beta is None else beta
    qf, kf, vf, gf, bf = (_flat(t).float() for t in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        qf, kf = _l2(qf), _l2(kf)
    qf, kf = qf.repeat_interleave(HV // H, 1) * scale, kf.repeat_interleave(HV // H, 1)  # (B*T, HV, K)
    o = torch.zeros(Bsz * T, HV, V, dtype=v.dtype)
    final = initial_state if inplace_final_state else initial_state.new_empty(Bsz * T, HV, V, K)
    if cu_seqlens is not None:
        bounds = [(int(cu_seqlens[n]), int(cu_seqlens[n + 1])) for n in range(cu_seqlens.numel() - 1)]
    else:
        bounds = [(n * T, n * T + T) for n in range(Bsz)]
    idx = ssm_state_indices
    if idx is not None and idx.dim() == 1:
        idx = idx[:, None]
    for n, (bos, eos) in enumerate(bounds):
        if eos <= bos:
            continue
        if idx is not None:
            col = int(num_accepted_tokens[n]) - 1 if num_accepted_tokens is not None else 0
            src = int(idx[n, col])
            if src <= 0:
                continue
            S = initial_state[src].float()                                  # (HV, V, K)
        else:
            S = initial_state[n].float() if initial_state is not None else torch.zeros(HV, V, K)
        S_kv = S.transpose(-1, -2)                                          # (HV, K, V)
        for t in range(eos - bos):
            tok = bos + t
            o_t, S_kv = recurrences.gated_delta_rule_step(qf[tok], kf[tok], vf[tok], gf[tok], bf[tok], S_kv)
            o[tok] = o_t.to(o.dtype)
            S = S_kv.transpose(-1, -2).to(final.dtype)                      # (HV, V, K)
            S_kv = S.transpose(-1, -2).float()  # the next token starts from the state as stored
            if inplace_final_state:
                dst = int(idx[n, t]) if idx is not None else n
                if idx is None or dst > 0:
                    final[dst] = S
            else:
                final[tok] = S
    return o.view(Bsz, T, HV, V), final


def fused_recurrent_gated_delta_rule(
    q, k, v, g, beta=None, scale=None, initial_state=None, inplace_final_state=True,
    cu_seqlens=None, ssm_state_indices=None, num_accepted_tokens=None, use_qk_l2norm_in_kernel=False,
):
    """Recurrent gated delta rule (C++ kernel). Same arguments as the reference."""
    require_c()
    Bsz, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    beta = torch.ones_like(g) if beta is None else beta
    if cu_seqlens is None and Bsz > 1 or (cu_seqlens is None and T > 1):
        cu_seqlens = torch.arange(0, (Bsz + 1) * T, T, dtype=torch.int32)
    if initial_state is None:
        n = cu_seqlens.numel() - 1 if cu_seqlens is not None else Bsz * T
        initial_state = torch.zeros(n, HV, V, K, dtype=torch.float32)
    final = initial_state if inplace_final_state else initial_state.new_empty(Bsz * T, HV, V, K)
    o = torch.empty(Bsz * T, HV, V, dtype=v.dtype)
    ops.gdn_recurrent(
        _flat(q), _flat(k), _flat(v), _flat(g), _flat(beta), float(scale),
        None if inplace_final_state else initial_state, final, cu_seqlens, ssm_state_indices,
        num_accepted_tokens, inplace_final_state, use_qk_l2norm_in_kernel, o,
    )
    return o.view(Bsz, T, HV, V), final


def sigmoid_gating(A_log, a, b, dt_bias, beta=1.0, threshold=20.0):
    """Qwen3.5's gates: log-space decay g = -exp(A_log) softplus(a + dt_bias) and
    beta = sigmoid(b), both fp32, shaped like ``a``."""
    x = a.float() + dt_bias.float()
    sp = torch.where(beta * x <= threshold, torch.log1p(torch.exp(beta * x)) / beta, x)
    return -torch.exp(A_log.float()) * sp, torch.sigmoid(b.float())


def fused_sigmoid_gating_delta_rule_update_ref(
    A_log, a, b, dt_bias, q, k, v, beta=1.0, threshold=20.0, scale=None, initial_state=None,
    inplace_final_state=True, cu_seqlens=None, ssm_state_indices=None, num_accepted_tokens=None,
    use_qk_l2norm_in_kernel=False, is_kda=False,
):
    """Reference: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b), then the recurrence.

    A_log, dt_bias: [HV]; a, b: [T, HV] or [B, T, HV]; other arguments as in
    ``fused_recurrent_gated_delta_rule_ref`` (``beta``/``threshold`` parametrise the softplus).
    """
    assert not is_kda
    g, bt = sigmoid_gating(A_log, a, b, dt_bias, beta, threshold)
    g, bt = g.reshape(*v.shape[:3]), bt.reshape(*v.shape[:3])
    return fused_recurrent_gated_delta_rule_ref(
        q, k, v, g, bt, scale, initial_state, inplace_final_state, cu_seqlens, ssm_state_indices,
        num_accepted_tokens, use_qk_l2norm_in_kernel)


def fused_sigmoid_gating_delta_rule_update(
    A_log, a, b, dt_bias, q, k, v, beta=1.0, threshold=20.0, scale=None, initial_state=None,
    inplace_final_state=True, cu_seqlens=None, ssm_state_indices=None, num_accepted_tokens=None,
    use_qk_l2norm_in_kernel=False, is_kda=False,
):
    """Fused sigmoid gating + recurrent gated delta rule (C++ kernel for the recurrence)."""
    assert not is_kda, "KDA is not supported"
    g, bt = sigmoid_gating(A_log, a, b, dt_bias, beta, threshold)
    g, bt = g.reshape(*v.shape[:3]), bt.reshape(*v.shape[:3])
    return fused_recurrent_gated_delta_rule(
        q, k, v, g, bt, scale, initial_state, inplace_final_state, cu_seqlens, ssm_state_indices,
        num_accepted_tokens, use_qk_l2norm_in_kernel)


# ----------------------------------------------------------------------------- chunked prefill
def chunk_gated_delta_rule_ref(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False, initial_state_indices=None, **kwargs,
):
    """Reference chunked gated delta rule (``recurrences.chunk_gated_delta_rule``, chunk 64).

    q, k: [B, T, H, K]; v: [B, T, HV, V]; g, beta: [B, T, HV]; cu_seqlens: [N + 1] (B == 1)
    initial_state: [N, HV, V, K], or with ``initial_state_indices`` ([N]) the state pool, which
        then receives the final states in place (skipping negative indices)
    Returns (o [B, T, HV, V], final_state [N, HV, V, K] fp32 or None).
    """
    Bsz, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    qf, kf, vf, gf, bf = (_flat(t).float() for t in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        qf, kf = _l2(qf), _l2(kf)
    qf, kf = qf.repeat_interleave(HV // H, 1) * scale, kf.repeat_interleave(HV // H, 1)  # (B*T, HV, K)
    cu = cu_seqlens if cu_seqlens is not None else torch.arange(0, (Bsz + 1) * T, T)
    N = cu.numel() - 1
    o = torch.zeros(Bsz * T, HV, V, dtype=v.dtype)
    finals = torch.zeros(N, HV, V, K)
    for n in range(N):
        bos, eos = int(cu[n]), int(cu[n + 1])
        slot = int(initial_state_indices[n]) if initial_state_indices is not None else n
        if slot < 0:
            continue
        S = initial_state[slot].float() if initial_state is not None else torch.zeros(HV, V, K)
        if eos > bos:
            sl = slice(bos, eos)
            O, S_kv = recurrences.chunk_gated_delta_rule(qf[None, sl], kf[None, sl], vf[None, sl], gf[None, sl],
                                                         bf[None, sl], S.transpose(-1, -2)[None], CHUNK)
            o[sl] = O[0].to(o.dtype)
            S = S_kv[0].transpose(-1, -2)                                   # (HV, V, K)
        finals[n] = S
        if initial_state_indices is not None:
            initial_state[slot] = S.to(initial_state.dtype)
    return o.view(Bsz, T, HV, V), (finals if output_final_state else None)


def chunk_gated_delta_rule(
    q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
    use_qk_l2norm_in_kernel=False, initial_state_indices=None, **kwargs,
):
    """Chunked gated delta rule prefill (C++ kernel). Same arguments as the reference."""
    require_c()
    Bsz, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K ** -0.5 if scale is None else scale
    cu = cu_seqlens if cu_seqlens is not None else torch.arange(0, (Bsz + 1) * T, T, dtype=torch.int32)
    N = cu.numel() - 1
    if initial_state_indices is not None:
        state, idx = initial_state, initial_state_indices
    else:
        state = (initial_state.float().clone() if initial_state is not None
                 else torch.zeros(N, HV, V, K, dtype=torch.float32))
        idx = None
    o = torch.empty(Bsz * T, HV, V, dtype=v.dtype)
    ops.gdn_chunk(_flat(q), _flat(k), _flat(v), _flat(g), _flat(beta), float(scale), state, cu, idx,
                  use_qk_l2norm_in_kernel, CHUNK, o)
    if not output_final_state:
        return o.view(Bsz, T, HV, V), None
    final = state if idx is None else state[idx.long().clamp(min=0)].float()
    return o.view(Bsz, T, HV, V), final
