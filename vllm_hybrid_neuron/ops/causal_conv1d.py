"""Depthwise causal conv1d of Mamba2 / Gated DeltaNet layers (vLLM 0.32 call signatures).

``causal_conv1d_fn``: varlen prefill; ``causal_conv1d_update``: decode and speculative decode.
Each has a plain-torch ``*_ref`` with the same signature. Layouts follow vLLM: ``x`` is
``(dim, tokens)`` for prefill, conv states are ``(slots, dim, state_len)`` (possibly a transposed
view), ``out[t] = act(bias + sum_j weight[:, j] * window[t + j])`` over the window
``[last width-1 inputs ++ new tokens]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_hybrid_neuron.ops._library import ops, require_c
from vllm_hybrid_neuron.ops.slots import NULL_BLOCK_ID, PAD_SLOT_ID


def _silu(activation) -> bool:
    if isinstance(activation, bool):
        return activation
    assert activation in (None, "silu", "swish"), activation
    return activation in ("silu", "swish")


def causal_conv1d_fn_ref(
    x, weight, bias, conv_states, query_start_loc, cache_indices=None, has_initial_state=None,
    activation="silu", pad_slot_id=PAD_SLOT_ID, **kwargs,
):
    """Varlen causal conv1d prefill (reference).

    x: (dim, tokens), sequences concatenated along tokens
    weight: (dim, width); bias: (dim,) or None
    conv_states: (slots, dim, state_len >= width - 1), updated in place: columns [0, width-1)
        of slot ``cache_indices[i]`` receive the last width-1 inputs of sequence i
    query_start_loc: (batch + 1,) int32 token offsets
    cache_indices: (batch,) slot per sequence (default: i); ``pad_slot_id`` entries are skipped
    has_initial_state: (batch,) bool, use the slot's state as the left context (else zeros)
    Returns out: (dim, tokens) in x's dtype (rows of skipped sequences are zero).
    """
    _reject_apc(kwargs)
    dtype = x.dtype
    x = x.to(conv_states.dtype)
    dim, width = weight.shape
    out = torch.zeros_like(x)
    for i in range(query_start_loc.numel() - 1):
        bos, eos = int(query_start_loc[i]), int(query_start_loc[i + 1])
        slot = int(cache_indices[i]) if cache_indices is not None else i
        if eos <= bos or slot == pad_slot_id or slot < 0:
            continue
        init = has_initial_state is not None and bool(has_initial_state[i])
        left = conv_states[slot, :, : width - 1] if init else x.new_zeros(dim, width - 1)
        xs = torch.cat([left, x[:, bos:eos]], dim=1).float()  # (dim, width-1+L)
        y = F.conv1d(xs[None], weight.float()[:, None], None if bias is None else bias.float(), groups=dim)[0]
        out[:, bos:eos] = (F.silu(y) if _silu(activation) else y).to(x.dtype)
        conv_states[slot, :, : width - 1] = xs[:, -(width - 1):].to(conv_states.dtype)
    return out.to(dtype)


def causal_conv1d_fn(
    x, weight, bias, conv_states, query_start_loc, cache_indices=None, has_initial_state=None,
    activation="silu", pad_slot_id=PAD_SLOT_ID, **kwargs,
):
    """Varlen causal conv1d prefill (C++ kernel). Same arguments as ``causal_conv1d_fn_ref``."""
    _reject_apc(kwargs)
    require_c()
    dtype = x.dtype
    x = x.to(conv_states.dtype)
    out = torch.zeros_like(x)
    ops.causal_conv1d_fwd(
        x, weight, bias, conv_states, query_start_loc, cache_indices, has_initial_state,
        _silu(activation), pad_slot_id, out,
    )
    return out.to(dtype)


def causal_conv1d_update_ref(
    x, conv_state, weight, bias=None, activation=None, conv_state_indices=None,
    num_accepted_tokens=None, query_start_loc=None, max_query_len=-1,
    null_block_id=NULL_BLOCK_ID, out=None, **kwargs,
):
    """Causal conv1d decode / speculative decode (reference).

    x: (batch, dim), (batch, dim, seqlen), or (tokens, dim) with query_start_loc
    conv_state: (slots, dim, state_len), state_len >= width - 1 (+ num_spec for speculation)
    weight: (dim, width); bias: (dim,)
    conv_state_indices: (batch,) or (batch, k) slot per sequence (column 0 is used);
        ``null_block_id`` (and negative) entries are skipped, their output is left untouched
    num_accepted_tokens: (batch,) speculative mode: the conv window starts at state column
        num_accepted - 1 (a rolling buffer); afterwards the state holds the last width-2
        window columns followed by all the new tokens
    query_start_loc: (batch + 1,) varlen offsets; max_query_len: longest query in the batch
    out: optional output like x; by default x is overwritten (vLLM semantics)
    """
    _reject_apc(kwargs)
    x3, o3, ret, qsl, lmax = _prep_update(x, conv_state, out, query_start_loc, max_query_len)
    width = weight.shape[1]
    spec = num_accepted_tokens is not None
    s_eff = width - 1 + (lmax - 1 if spec else 0)
    idx = conv_state_indices
    if idx is not None and idx.dim() == 2:
        idx = idx[:, 0]
    batch = qsl.numel() - 1 if qsl is not None else x3.shape[0]
    for b in range(batch):
        if qsl is not None:
            bos, L = int(qsl[b]), int(qsl[b + 1]) - int(qsl[b])
            xs, os_ = x3[0, :, bos:bos + L], o3[0, :, bos:bos + L]
        else:
            L, xs, os_ = lmax, x3[b], o3[b]
        slot = int(idx[b]) if idx is not None else b
        if L <= 0 or slot == null_block_id or slot < 0:
            continue
        off = int(num_accepted_tokens[b]) - 1 if spec else 0
        s_b = s_eff - (lmax - L)
        state = conv_state[slot]  # (dim, state_len)
        seq = torch.cat([state[:, off:off + width - 1], xs], dim=1).float()  # window ++ tokens
        shift = 1 if spec else L
        nkeep = max(s_b - L, 0)
        kept = state[:, off + shift: off + shift + nkeep].float()
        new = torch.cat([kept, xs.float()], dim=1)[:, -s_b:] if s_b > 0 else None
        y = F.conv1d(seq[None], weight.float()[:, None], None if bias is None else bias.float(),
                     groups=weight.shape[0])[0]
        os_.copy_(F.silu(y) if _silu(activation) else y)
        if new is not None:
            state[:, :s_b] = new.to(state.dtype)
    return ret()


def causal_conv1d_update(
    x, conv_state, weight, bias=None, activation=None, conv_state_indices=None,
    num_accepted_tokens=None, query_start_loc=None, max_query_len=-1,
    null_block_id=NULL_BLOCK_ID, out=None, **kwargs,
):
    """Causal conv1d decode / speculative decode (C++ kernel). See ``causal_conv1d_update_ref``."""
    _reject_apc(kwargs)
    require_c()
    x3, o3, ret, qsl, lmax = _prep_update(x, conv_state, out, query_start_loc, max_query_len)
    idx = conv_state_indices
    if idx is not None and idx.dim() == 2:
        idx = idx[:, 0]
    ops.causal_conv1d_update(
        x3, conv_state, weight, bias, _silu(activation), idx, num_accepted_tokens, qsl, lmax,
        null_block_id if null_block_id is not None else -(2**62), o3,
    )
    return ret()


def _prep_update(x, conv_state, out, query_start_loc, max_query_len):
    """Bring x / out to (batch, dim, seqlen) (or (1, dim, tokens) for varlen) views."""
    dtype = x.dtype
    xc = x.to(conv_state.dtype)
    if out is None:
        o = xc  # vLLM: overwrite the input
    else:
        assert out.shape == x.shape
        o = out if out.dtype == conv_state.dtype else torch.empty_like(xc)
    if query_start_loc is not None:
        x3, o3 = xc.t()[None], o.t()[None]
        lmax = max_query_len if max_query_len > 0 else int(query_start_loc.diff().max())
    elif x.dim() == 2:
        x3, o3 = xc[..., None], o[..., None]
        lmax = 1
    else:
        x3, o3 = xc, o
        lmax = x.shape[-1]

    def ret():
        if out is not None and o is not out:
            out.copy_(o)
            return out
        return o.to(dtype)

    return x3, o3, ret, query_start_loc, lmax


def _reject_apc(kwargs) -> None:
    for k in ("block_idx_first_scheduled_token", "block_idx_last_scheduled_token", "initial_state_idx"):
        if kwargs.get(k) is not None:
            raise NotImplementedError(f"{k} (prefix-caching block indices) is not supported yet")
