"""Mid-prefill state checkpoints for vLLM's prefix-caching "align" mode, in torch.

With prefix caching on, vLLM 0.32 asks a hybrid layer to store, for each prefill row
that has one, its conv and SSM state at a block-aligned position inside the prompt
(``MambaPrefillCheckpointMetadata``), so a later request sharing that prefix can
resume from it. vLLM's own writer (``ops/ssd_checkpoint.py``) is a Triton kernel,
which has no CPU backend; this is the same contract written with torch indexing.
"""

from __future__ import annotations

import torch


def store_prefill_checkpoint(
    checkpoint_offsets: torch.Tensor,
    state_indices: torch.Tensor,
    row_states: torch.Tensor | None,
    x: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_len: int,
) -> int:
    """Write each checkpointed row's conv history and SSM state into its block.

    checkpoint_offsets: (rows,) - offset of the checkpoint inside each row's query,
        0 = none (``MambaPrefillCheckpointMetadata.checkpoint_offsets``)
    state_indices: (rows,) - destination block per row (``.state_indices``)
    row_states: (rows, *ssm_state.shape[1:]) - each row's state at its checkpoint, or
        None when the caller already computed the states into their blocks
    x: (dim, prefill_tokens) - the pre-conv activations of all prefill rows
    conv_state: (blocks, dim, >= state_len) - paged conv state (a view is fine)
    ssm_state: (blocks, ...) - paged SSM / recurrent state
    query_start_loc: (rows + 1,) - row starts inside ``x``
    state_len: conv kernel width - 1
    Returns the number of rows written.
    """
    offsets = checkpoint_offsets.to(torch.long)  # (rows,)
    rows = torch.nonzero(offsets > 0).flatten()
    if rows.numel() == 0:
        return 0
    dst = state_indices.to(torch.long)[rows]  # (n,)
    ends = query_start_loc.to(torch.long)[rows] + offsets[rows]  # (n,) exclusive
    history = ends[:, None] - state_len + torch.arange(state_len)  # (n, state_len)
    # The newest state_len inputs before the checkpoint, oldest first.
    conv_state[dst, :, :state_len] = x[:, history].permute(1, 0, 2).to(conv_state.dtype)
    if row_states is not None:
        ssm_state[dst] = row_states[rows].to(ssm_state.dtype)
    return int(rows.numel())
