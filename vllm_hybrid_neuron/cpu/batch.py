"""The plugin's own description of one step's batch, as the recurrent mixers consume it.

vLLM describes a hybrid layer's batch with its attention metadata (``Mamba2AttentionMetadata``,
``GDNAttentionMetadata``: ~30 fields, two conventions). ``vllm_seam`` converts those into a
``RecurrentBatch``; the mixers (``cpu/layers/mamba2_mixer.py``, ``cpu/layers/gated_deltanet.py``)
read nothing else. This module imports nothing from vLLM.

A step's tokens split into up to three groups of rows, each owning a set of token positions
(``tokens``: a slice, or an index tensor when the groups interleave):
- ``decode``:  rows with one new token and no drafts;
- ``spec``:    speculative rows: 1 + drafts tokens each, state after every token kept;
- ``prefill``: rows with a prompt (or a piece of one), possibly resuming a cached prefix.
"State slots" index the layer's state cache (block ids); ids <= 0 are the null block or
padding and are skipped by the ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tokens = slice | torch.Tensor  # positions in the step's token dimension


@dataclass(frozen=True)
class DecodeRows:
    """Rows decoding one token each."""

    tokens: Tokens
    slots: torch.Tensor             # (rows,) state slot of each row, read and written in place
    cu_seqlens: torch.Tensor | None  # (rows + 1,) = 0, 1, ..., rows (None where unused)


@dataclass(frozen=True)
class SpecRows:
    """Speculative rows: each verifies 1 + drafts tokens.

    The state entering row n is in ``slots[n, num_accepted[n] - 1]`` (the last token accepted
    last step); the state after its token t is written to ``slots[n, t]``.
    """

    tokens: Tokens
    slots: torch.Tensor         # (rows, 1 + num_spec)
    cu_seqlens: torch.Tensor    # (rows + 1,) token offsets of the rows within ``tokens``
    num_accepted: torch.Tensor  # (rows,) tokens accepted in the previous step, >= 1


@dataclass(frozen=True)
class SsdChunks:
    """Mamba2 SSD chunking of the prefill tokens (a chunk never spans two rows)."""

    size: int
    cu_chunk_seqlens: torch.Tensor    # (chunks + 1,)
    seq_idx: torch.Tensor             # (chunks,) row of each chunk
    last_chunk_indices: torch.Tensor  # (rows,) each row's last chunk


@dataclass(frozen=True)
class Checkpoints:
    """Prefix caching ("align" mode): states to store at block boundaries inside prompts."""

    offsets: torch.Tensor  # (rows,) tokens into each prefill row's query; 0 = no checkpoint
    slots: torch.Tensor    # (rows,) slot receiving each row's checkpoint
    chunk_index: torch.Tensor | None = None  # (rows,) Mamba2: the SSD chunk ending there


@dataclass(frozen=True)
class PrefillRows:
    """Rows with prompt tokens."""

    tokens: Tokens
    cu_seqlens: torch.Tensor         # (rows + 1,) relative to the first prefill token
    slots: torch.Tensor              # (rows,)
    has_initial_state: torch.Tensor  # (rows,) bool: resumes a cached state (prefix hit / chunk)
    any_initial_state: bool          # has_initial_state.any(), known without a sync
    checkpoints: Checkpoints | None = None
    chunks: SsdChunks | None = None  # Mamba2 only


@dataclass(frozen=True)
class RecurrentBatch:
    num_tokens: int
    decode: DecodeRows | None = None
    spec: SpecRows | None = None
    prefill: PrefillRows | None = None


def take(t: torch.Tensor, tokens: Tokens) -> torch.Tensor:
    """The rows of ``t`` (tokens first) at ``tokens``: a view for a slice, a copy otherwise."""
    return t[tokens] if isinstance(tokens, slice) else t.index_select(0, tokens)


def put(out: torch.Tensor, tokens: Tokens, value: torch.Tensor) -> None:
    """Write ``value`` into the rows of ``out`` at ``tokens``."""
    if isinstance(tokens, slice):
        out[tokens] = value
    else:
        out.index_copy_(0, tokens, value)
