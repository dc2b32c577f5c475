"""Pieces shared by the ports: norms, per-slot state I/O, cached attention, routed experts.

Conventions (NxDI's): a batch row b belongs to state slot ``seq_ids[b]``; prefill
("context encoding", CTE) inputs are right-padded with ``attention_mask`` 1 on
valid tokens; decode ("token generation", TKG) has one token per row at
``position_ids[b]``. State tensors are never written in place: each layer returns
the new full tensor, which NxDI aliases onto the input (``input_output_aliases``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """y = w * x / rms(x), computed in fp32 (``offset=1`` gives the (1 + w) variant)."""

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return ((self.weight.float() + self.offset) * x32).type_as(x)


def rms_norm_gated(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> torch.Tensor:
    """Gate first, then normalise: w * norm(x * silu(gate)) (Mamba2 norm_before_gate=False)."""
    h = x.float() * F.silu(gate.float())
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).type_as(x)


# --- per-slot state I/O ----------------------------------------------------------------------
# Every state tensor has one spare row after the real slots (``HybridModelMixin.init_states``):
# batch rows that belong to no sequence (seq_id < 0: NxDI's padding with apply_seq_ids_mask, or
# a prefill row without a valid token) read and write that row, so they never touch a real slot.


def slot_rows(seq_ids: torch.Tensor, rows_in_state: int) -> torch.Tensor:
    """seq_ids (B,) -> row of each batch line in a state of ``rows_in_state`` rows (the spare
    last row for seq_id < 0). int64 for index_select / index_copy, whatever NxDI feeds (int32)."""
    spare = torch.full_like(seq_ids, rows_in_state - 1)
    return torch.where(seq_ids >= 0, seq_ids, spare).long()


def read_slots(state: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """state: (slots + 1, ...) -> the rows of this batch: (batch, ...)."""
    return torch.index_select(state, 0, slot_rows(seq_ids, state.shape[0]))


def write_slots(state: torch.Tensor, seq_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A new state tensor equal to ``state`` with rows ``seq_ids`` replaced; every other slot is
    untouched, and rows with seq_id < 0 land in the spare row."""
    return state.index_copy(0, slot_rows(seq_ids, state.shape[0]), rows.to(state.dtype))


def last_valid_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, L) right-padded mask -> index of each row's last valid token: (batch,)."""
    return attention_mask.long().sum(-1) - 1


# --- attention over an NxDI-style contiguous KV cache ----------------------------------------


def rope_cos_sin(position_ids: torch.Tensor, rot_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids: (B, L) -> cos, sin: (B, 1, L, rot_dim) (half-rotation layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, L, rot_dim/2)
    emb = torch.cat([freqs, freqs], -1)[:, None]  # (B, 1, L, rot_dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rot_dim channels of x: (B, H, L, D); the rest pass through."""
    rot_dim = cos.shape[-1]
    xr, xp = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = xr.chunk(2, -1)
    xr = xr * cos + torch.cat([-x2, x1], -1) * sin
    return torch.cat([xr, xp], -1)


def attention_with_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         k_cache: torch.Tensor, v_cache: torch.Tensor,
                         attention_mask: torch.Tensor, position_ids: torch.Tensor,
                         seq_ids: torch.Tensor, scale: float, is_prefill: bool,
                         sliding_window: int | None = None):
    """Causal GQA attention that also writes this step's K/V into the slot's cache.

    q: (B, Hq, L, D); k, v: (B, Hkv, L, D); caches: (slots, Hkv, S, D).
    Prefill attends within the prompt (positions 0..L-1, padded keys masked) and
    writes cache[:, :, :L]; decode writes position_ids[b] and attends to 0..pos.
    Returns out (B, Hq, L, D), new k_cache, new v_cache.
    """
    B, Hq, L, D = q.shape
    k_rows, v_rows = read_slots(k_cache, seq_ids), read_slots(v_cache, seq_ids)  # (B, Hkv, S, D)
    S = k_rows.shape[2]
    if is_prefill:
        k_rows = torch.cat([k.to(k_rows.dtype), k_rows[:, :, L:]], 2)
        v_rows = torch.cat([v.to(v_rows.dtype), v_rows[:, :, L:]], 2)
        keys, values = k, v
        qpos = torch.arange(L)[None, :, None]  # (1, L, 1)
        kpos = torch.arange(L)[None, None, :]  # (1, 1, L)
        mask = (kpos <= qpos) & attention_mask.bool()[:, None, :]  # (B, L, L)
    else:
        pos = position_ids.long()[:, :1]  # (B, 1)
        onehot = (torch.arange(S)[None, :] == pos)[:, None, :, None]  # (B, 1, S, 1)
        k_rows = torch.where(onehot, k.to(k_rows.dtype), k_rows)
        v_rows = torch.where(onehot, v.to(v_rows.dtype), v_rows)
        keys, values = k_rows, v_rows
        qpos = pos[:, :, None]  # (B, 1, 1)
        kpos = torch.arange(S)[None, None, :]  # (1, 1, S)
        mask = kpos <= qpos  # (B, 1, S)
    if sliding_window:
        mask = mask & (qpos - kpos < sliding_window)
    rep = Hq // keys.shape[1]
    keys = keys.repeat_interleave(rep, 1).to(q.dtype)  # (B, Hq, Lk, D)
    values = values.repeat_interleave(rep, 1).to(q.dtype)
    scores = (q @ keys.transpose(-1, -2)).float() * scale  # (B, Hq, L, Lk)
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0).to(q.dtype)  # fully padded rows -> 0
    out = probs @ values  # (B, Hq, L, D)
    return out, write_slots(k_cache, seq_ids, k_rows), write_slots(v_cache, seq_ids, v_rows)
