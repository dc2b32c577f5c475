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
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first

from vllm_hybrid_neuron.cpu.layers import op_stats
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
        attn_metadata = get_forward_context().attn_metadata
        meta = attn_metadata.get(self.prefix) if isinstance(attn_metadata, dict) else None
        if meta is None:
            # Profile run (no metadata): vLLM's path only shapes the tensors.
            return super().conv_ssm_forward(projected_states, output)

        xbc, dt = torch.split(projected_states[..., self.tped_intermediate_size:],
                              [self.tped_conv_size, self.tped_dt_size], dim=-1)
        conv_state = self.kv_cache[0]  # (blocks, dim, width-1+spec) as the ops want it
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)
        ssm_state = self.kv_cache[1]  # (blocks, heads, head_dim, d_state)
        n_d, n_p = meta.num_decode_tokens, meta.num_prefill_tokens
        xbc_d, xbc_p = torch.split(xbc[:n_d + n_p], [n_d, n_p], dim=0)
        dt_d, dt_p = torch.split(dt[:n_d + n_p], [n_d, n_p], dim=0)
        out_d, out_p = torch.split(output[:n_d + n_p], [n_d, n_p], dim=0)
        if meta.num_prefills > 0:
            self._prefill(meta, xbc_p, dt_p, out_p, conv_state, ssm_state)
            op_stats.count("mamba2_prefill")
        if meta.num_decodes > 0:
            self._decode(meta, xbc_d, dt_d, out_d, conv_state, ssm_state)
            op_stats.count("mamba2_decode")

    def _prefill(self, meta, xbc, dt, out, conv_state, ssm_state) -> None:
        tokens = xbc.shape[0]
        heads, groups = self.num_heads // self.tp_size, self.n_groups // self.tp_size
        x_t = xbc.transpose(0, 1)  # (conv_dim, tokens)
        xbc = causal_conv1d_fn(
            x_t, self.conv_weights, self.conv1d.bias, conv_states=conv_state,
            query_start_loc=meta.query_start_loc_p, cache_indices=meta.state_indices_tensor_p,
            has_initial_state=meta.has_initial_states_p, activation=self.activation,
        ).transpose(0, 1)  # (tokens, conv_dim)
        x, B, C = self.split_hidden_states_B_C_fn(xbc)
        slots = meta.state_indices_tensor_p  # (prefills,)
        initial_states = None
        if meta.has_initial_states_p is not None and meta.prep_initial_states:
            initial_states = torch.where(  # (prefills, heads, head_dim, d_state)
                meta.has_initial_states_p[:, None, None, None], ssm_state[slots], 0)
        has_checkpoints = meta.checkpoint_chunk_idx is not None
        states = mamba_chunk_scan_combined_varlen(
            x.reshape(tokens, heads, self.head_dim), dt, self.A,
            B.reshape(tokens, groups, -1), C.reshape(tokens, groups, -1),
            chunk_size=meta.chunk_size, cu_seqlens=meta.query_start_loc_p,
            cu_chunk_seqlens=meta.cu_chunk_seqlen_p,
            last_chunk_indices=meta.last_chunk_indices_p, seq_idx=meta.seq_idx_p,
            out=out.view(tokens, heads, self.head_dim), D=self.D, dt_bias=self.dt_bias,
            initial_states=initial_states, dt_softplus=True,
            return_intermediate_states=has_checkpoints, state_dtype=ssm_state.dtype,
        )  # (chunks or prefills, heads, head_dim, d_state)
        if has_checkpoints:
            ckpt = meta.checkpoint_meta
            store_prefill_checkpoint(
                ckpt.checkpoint_offsets, ckpt.state_indices, states[meta.checkpoint_chunk_idx],
                x_t, conv_state,
                ssm_state, meta.query_start_loc_p, state_len=self.conv_kernel_size - 1)
            states = states[meta.last_chunk_indices_p]
        ssm_state[slots] = states

    def _decode(self, meta, xbc, dt, out, conv_state, ssm_state) -> None:
        tokens = xbc.shape[0]
        heads, groups = self.num_heads // self.tp_size, self.n_groups // self.tp_size
        slots = meta.state_indices_tensor_d  # (decodes,) or (decodes, 1 + num_spec)
        if meta.num_accepted_tokens is None:  # one token per sequence: a single fused op
            mamba2_decode(
                xbc, dt, conv_state, self.conv_weights, self.conv1d.bias, ssm_state, self.A,
                self.D, self.dt_bias, slots if slots.dim() == 1 else slots[:, 0], groups,
                out.view(tokens, heads, self.head_dim), self.activation)
            return
        xbc = causal_conv1d_update(
            xbc, conv_state, self.conv_weights, self.conv1d.bias, self.activation,
            conv_state_indices=slots, num_accepted_tokens=meta.num_accepted_tokens,
            query_start_loc=meta.query_start_loc_d, max_query_len=slots.size(-1),
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
            num_accepted_tokens=meta.num_accepted_tokens, cu_seqlens=meta.query_start_loc_d,
        )
