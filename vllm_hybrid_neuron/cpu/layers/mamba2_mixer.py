"""vLLM's Mamba2 mixer with its conv + SSM core running on the plugin's CPU ops.

Only ``conv_ssm_forward`` changes: vLLM's in/out projections, gated norm, weight
loading, state shapes and metadata are kept. Both compile modes reach this method
(vLLM's ``torch.ops.vllm.mamba_mixer2`` op calls it on the layer). What it fixes on
CPU, against vLLM 0.32's own CPU ops:
- speculative decoding: the conv rolling buffer is read at ``num_accepted - 1`` and
  the SSM state after every draft token is written to its own block column;
- prefix caching ("align" mode): per-chunk states are returned, so the final state
  and the mid-prefill checkpoint are stored (vLLM's CPU scan crashed there);
- prefill is a chunked SSD (GEMMs), not a token-by-token scan.
vLLM's metadata is read only through ``cpu/vllm_seam.py``, as a ``cpu.batch.RecurrentBatch``.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2

from vllm_hybrid_neuron.cpu import vllm_seam
from vllm_hybrid_neuron.cpu.batch import DecodeRows, PrefillRows, SpecRows
from vllm_hybrid_neuron.cpu.layers.prefill_checkpoint import store_prefill_checkpoint
from vllm_hybrid_neuron.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    mamba2_decode,
    mamba_chunk_scan_combined_varlen,
    selective_state_update,
)


class PluginMambaMixer2(MambaMixer2):
    """``MambaMixer2`` whose conv + SSM run on ``vllm_hybrid_neuron.ops``."""

    def conv_ssm_forward(self, projected_states: torch.Tensor, output: torch.Tensor):
        meta = vllm_seam.layer_metadata(self.prefix)
        if meta is None:
            # Profile run (no metadata): vLLM's path only shapes the tensors.
            return super().conv_ssm_forward(projected_states, output)
        batch = vllm_seam.mamba2_batch(meta)
        xbc, dt = torch.split(projected_states[..., self.tped_intermediate_size:],
                              [self.tped_conv_size, self.tped_dt_size], dim=-1)
        conv_state = vllm_seam.conv_state_view(self)  # (blocks, dim, width-1+spec)
        ssm_state = vllm_seam.recurrent_state(self)  # (blocks, heads, head_dim, d_state)
        # Mamba2 batches are contiguous (decodes, then prefills): outputs are written in place.
        if batch.prefill is not None:
            rows = batch.prefill
            self._prefill(rows, xbc[rows.tokens], dt[rows.tokens], output[rows.tokens],
                          conv_state, ssm_state)
        if batch.decode is not None:
            rows = batch.decode
            self._decode(rows, xbc[rows.tokens], dt[rows.tokens], output[rows.tokens],
                         conv_state, ssm_state)
        if batch.spec is not None:
            rows = batch.spec
            self._spec_decode(rows, xbc[rows.tokens], dt[rows.tokens], output[rows.tokens],
                              conv_state, ssm_state)

    def _prefill(self, rows: PrefillRows, xbc, dt, out, conv_state, ssm_state) -> None:
        tokens = xbc.shape[0]
        heads, groups = self.num_heads // self.tp_size, self.n_groups // self.tp_size
        x_t = xbc.transpose(0, 1)  # (conv_dim, tokens)
        xbc = causal_conv1d_fn(
            x_t, self.conv_weights, self.conv1d.bias, conv_states=conv_state,
            query_start_loc=rows.cu_seqlens, cache_indices=rows.slots,
            has_initial_state=rows.has_initial_state, activation=self.activation,
        ).transpose(0, 1)  # (tokens, conv_dim)
        x, B, C = self.split_hidden_states_B_C_fn(xbc)
        initial_states = None
        if rows.any_initial_state:
            initial_states = torch.where(  # (prefills, heads, head_dim, d_state)
                rows.has_initial_state[:, None, None, None], ssm_state[rows.slots], 0)
        marks, chunks = rows.checkpoints, rows.chunks
        states = mamba_chunk_scan_combined_varlen(
            x.reshape(tokens, heads, self.head_dim), dt, self.A,
            B.reshape(tokens, groups, -1), C.reshape(tokens, groups, -1),
            chunk_size=chunks.size, cu_seqlens=rows.cu_seqlens,
            cu_chunk_seqlens=chunks.cu_chunk_seqlens,
            last_chunk_indices=chunks.last_chunk_indices, seq_idx=chunks.seq_idx,
            out=out.view(tokens, heads, self.head_dim), D=self.D, dt_bias=self.dt_bias,
            initial_states=initial_states, dt_softplus=True,
            return_intermediate_states=marks is not None, state_dtype=ssm_state.dtype,
        )  # (chunks or prefills, heads, head_dim, d_state)
        if marks is not None:
            store_prefill_checkpoint(
                marks.offsets, marks.slots, states[marks.chunk_index], x_t, conv_state,
                ssm_state, rows.cu_seqlens, state_len=self.conv_kernel_size - 1)
            states = states[chunks.last_chunk_indices]
        ssm_state[rows.slots] = states

    def _decode(self, rows: DecodeRows, xbc, dt, out, conv_state, ssm_state) -> None:
        """One token per row: conv update + SSM step in a single fused op."""
        tokens = xbc.shape[0]
        heads, groups = self.num_heads // self.tp_size, self.n_groups // self.tp_size
        mamba2_decode(
            xbc, dt, conv_state, self.conv_weights, self.conv1d.bias, ssm_state, self.A,
            self.D, self.dt_bias, rows.slots, groups, out.view(tokens, heads, self.head_dim),
            self.activation)

    def _spec_decode(self, rows: SpecRows, xbc, dt, out, conv_state, ssm_state) -> None:
        """1 + drafts tokens per row; the state after every token goes to its own slot."""
        tokens = xbc.shape[0]
        heads, groups = self.num_heads // self.tp_size, self.n_groups // self.tp_size
        slots = rows.slots  # (rows, 1 + num_spec)
        xbc = causal_conv1d_update(
            xbc, conv_state, self.conv_weights, self.conv1d.bias, self.activation,
            conv_state_indices=slots, num_accepted_tokens=rows.num_accepted,
            query_start_loc=rows.cu_seqlens, max_query_len=slots.size(-1),
        )  # (tokens, conv_dim)
        x, B, C = self.split_hidden_states_B_C_fn(xbc)
        # Per-head parameters broadcast over head_dim (and d_state for A) as stride-0
        # views, the layout vLLM's selective_state_update takes.
        A = self.A[:, None, None].expand(-1, self.head_dim, self.ssm_state_size).float()
        selective_state_update(
            ssm_state, x.reshape(tokens, heads, self.head_dim),
            dt[:, :, None].expand(-1, -1, self.head_dim), A,
            B.reshape(tokens, groups, -1), C.reshape(tokens, groups, -1),
            D=self.D[:, None].expand(-1, self.head_dim),
            dt_bias=self.dt_bias[:, None].expand(-1, self.head_dim), dt_softplus=True,
            state_batch_indices=slots, dst_state_batch_indices=slots,
            out=out.view(tokens, heads, self.head_dim),
            num_accepted_tokens=rows.num_accepted, cu_seqlens=rows.cu_seqlens,
        )
