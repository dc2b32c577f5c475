"""The one interface every token mixer of the Neuron ports has (Mamba2, Gated DeltaNet, and each
family's attention), so a decoder layer calls its mixer the same way whatever it is, and the
model collects state shapes without asking which kind a layer holds.

A mixer is an ``nn.Module`` with

    state_shapes(slots, seq_len) -> [StateSpec, ...]
        the per-slot state tensors this layer keeps between calls (``HybridModelMixin.init_states``
        allocates them, plus one spare row): KV caches use seq_len, recurrent mixers ignore it
    forward(x, step, states) -> (out, new_states)
        x: (B, L, D) normed hidden states; step: the ``Step`` of this traced call (the same for
        every layer); states: this layer's tensors, in ``state_shapes`` order (slots + 1 rows);
        out: (B, L, D); new_states: the updated tensors, same order (NxDI aliases them back)

Adding a family: copy a port file (``granite.py`` for a recurrent + attention hybrid, ``gemma4.py``
for attention only), subclass ``Mixer`` for each new mixer, and register it in ``registration.PORTS``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Step(NamedTuple):
    """What one traced call (prefill or decode) tells every layer."""

    valid: torch.Tensor  # (B, L): 1 on real tokens (right padding 0); all ones in decode
    position_ids: torch.Tensor  # (B, L)
    seq_ids: torch.Tensor  # (B,): state slot of each row, -1 for a padded row (the spare slot)
    is_prefill: bool  # a prefill starts its sequences afresh; decode has L == 1


class StateSpec(NamedTuple):
    """One per-slot state tensor: shape with slots first; dtype None = the model dtype
    (fp32 for recurrent states: they accumulate rounding); kind "k"/"v" or a recurrent name."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    kind: str


class Mixer(nn.Module):
    """Base class of the ports' token mixers (see the module docstring for the contract)."""

    def state_shapes(self, slots: int, seq_len: int) -> list[StateSpec]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, step: Step,
                states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError


def kv_cache_shapes(slots: int, kv_heads: int, seq_len: int, head_dim: int) -> list[StateSpec]:
    """An attention mixer's state: K and V caches (slots, Hkv, S, hd) in the model dtype."""
    shape = (slots, kv_heads, seq_len, head_dim)
    return [StateSpec(shape, None, "k"), StateSpec(shape, None, "v")]
