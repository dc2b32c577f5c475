"""Where the CPU backend meets vLLM 0.32's internals: the one place it reads or sets them.

Everything the CPU layers take from vLLM beyond the public classes they subclass (and their
documented methods) goes through here:
- the step's attention metadata (``Mamba2AttentionMetadata`` / ``GDNAttentionMetadata``, found
  in the forward context under the layer's prefix), turned into the plugin's ``RecurrentBatch``;
- the layer's state cache views (``kv_cache``: conv state, recurrent state);
- the plain (dim, width) conv weight vLLM keeps beside its packed bf16 copy;
- vLLM's ``qwen_gdn_attention_core`` custom op (how both compile modes reach the GDN core) and
  its bf16 chunked GDN CPU kernel;
- the private attributes the layer swaps set or read (``_forward_method``, ``_use_zentorch``,
  ``_supports_onednn``, ``_output_projection``).
The names and fields used here are recorded in ``cpu/vllm_surface.json`` and checked against the
installed vLLM by ``tests/test_vllm_surface.py``; other vLLM internals the plugin relies on
(the config hook, the block-size patch in ``compat/``) are listed there too.
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.utils.torch_utils import _encode_layer_name

from vllm_hybrid_neuron.cpu.batch import (
    Checkpoints,
    DecodeRows,
    PrefillRows,
    RecurrentBatch,
    SpecRows,
    SsdChunks,
)


def layer_metadata(prefix: str):
    """The step's metadata for the layer named ``prefix``; None in vLLM's profile run."""
    attn_metadata = get_forward_context().attn_metadata
    return attn_metadata.get(prefix) if isinstance(attn_metadata, dict) else None


# ----------------------------------------------------------------------------- Mamba2
def mamba2_batch(meta) -> RecurrentBatch:
    """``Mamba2AttentionMetadata`` -> the batch. vLLM orders decodes (speculative or not) first,
    then prefills; speculative decoding is on when ``num_accepted_tokens`` is set."""
    n_d, n_p = meta.num_decode_tokens, meta.num_prefill_tokens
    decode = spec = prefill = None
    if meta.num_decodes > 0:
        slots = meta.state_indices_tensor_d  # (decodes,) or (decodes, 1 + num_spec)
        if meta.num_accepted_tokens is None:
            decode = DecodeRows(slice(0, n_d), slots if slots.dim() == 1 else slots[:, 0],
                                meta.query_start_loc_d)
        else:
            spec = SpecRows(slice(0, n_d), slots, meta.query_start_loc_d,
                            meta.num_accepted_tokens)
    if meta.num_prefills > 0:
        has_init = meta.has_initial_states_p  # (prefills,)
        checkpoints = None
        if meta.checkpoint_chunk_idx is not None:
            ckpt = meta.checkpoint_meta
            checkpoints = Checkpoints(ckpt.checkpoint_offsets, ckpt.state_indices,
                                      meta.checkpoint_chunk_idx)
        prefill = PrefillRows(
            tokens=slice(n_d, n_d + n_p), cu_seqlens=meta.query_start_loc_p,
            slots=meta.state_indices_tensor_p, has_initial_state=has_init,
            any_initial_state=has_init is not None and bool(meta.prep_initial_states),
            checkpoints=checkpoints,
            chunks=SsdChunks(meta.chunk_size, meta.cu_chunk_seqlen_p, meta.seq_idx_p,
                             meta.last_chunk_indices_p))
    return RecurrentBatch(n_d + n_p, decode, spec, prefill)


# ----------------------------------------------------------------------------- Gated DeltaNet
def gdn_batch(meta) -> RecurrentBatch | None:
    """``GDNAttentionMetadata`` -> the batch (None when the step has no tokens).

    vLLM separates speculative rows from the others by token index (``spec_token_indx``,
    ``non_spec_token_indx``) when both are present; the non-speculative rows are decodes first,
    then prefills, and their per-row fields (state indices, ``has_initial_state``, checkpoints)
    count those rows only.
    """
    n = meta.num_actual_tokens
    if n == 0:
        return None
    rows_d, tokens_d = meta.num_decodes, meta.num_decode_tokens
    has_spec = meta.spec_sequence_masks is not None
    mixed = has_spec and (meta.num_prefills > 0 or rows_d > 0)
    spec = decode = prefill = None
    if has_spec:
        rows = meta.num_spec_decodes
        spec = SpecRows(meta.spec_token_indx if mixed else slice(0, n),
                        meta.spec_state_indices_tensor[:rows],
                        meta.spec_query_start_loc[:rows + 1], meta.num_accepted_tokens[:rows])
    if not has_spec or mixed:
        non_spec = meta.non_spec_token_indx if mixed else None
        cu = meta.non_spec_query_start_loc  # (rows + 1,)
        slots = meta.non_spec_state_indices_tensor  # (rows,)
        if rows_d > 0:
            decode = DecodeRows(non_spec[:tokens_d] if mixed else slice(0, tokens_d),
                                slots[:rows_d], cu[:rows_d + 1])
        if meta.num_prefills > 0:
            ckpt, checkpoints = meta.checkpoint, None
            if ckpt is not None:
                checkpoints = Checkpoints(ckpt.checkpoint_offsets[rows_d:],
                                          ckpt.state_indices[rows_d:])
            has_init = meta.has_initial_state[rows_d:]
            prefill = PrefillRows(
                tokens=non_spec[tokens_d:] if mixed else slice(tokens_d, n),
                cu_seqlens=cu[rows_d:] - tokens_d, slots=slots[rows_d:],
                has_initial_state=has_init, any_initial_state=True, checkpoints=checkpoints)
    return RecurrentBatch(n, decode, spec, prefill)


def gdn_attention_core(mixed_qkv, b, a, core_attn_out, prefix: str) -> None:
    """vLLM's custom op that calls the layer's ``_forward_core`` (opaque to torch.compile)."""
    torch.ops.vllm.qwen_gdn_attention_core(mixed_qkv, b, a, core_attn_out,
                                           _encode_layer_name(prefix))


def vllm_chunk_gated_delta_rule_cpu():
    """vLLM's bf16 chunked gated-delta-rule CPU kernel, or None in a build without it."""
    return getattr(torch.ops._C, "chunk_gated_delta_rule_cpu", None)


def run_vllm_chunk_gated_delta_rule(kernel, q, k, v, g, beta, states_kv, cu_seqlens):
    """Run vLLM's kernel over rows whose states are ``states_kv`` (rows, HV, K, V), updated in
    place (its layout is the transpose of the cache's (HV, V, K)). q, k: (1, T, H, K);
    v: (1, T, HV, V); g, beta: (1, T, HV). Returns o (1, T, HV, V)."""
    o, _ = kernel(q, k, v, g, beta, states_kv, output_final_state=False, cu_seqlens=cu_seqlens,
                  head_first=False, use_qk_l2norm_in_kernel=True,
                  initial_state_indices=torch.arange(states_kv.shape[0], dtype=torch.int32),
                  eps=1e-6)
    return o


# ----------------------------------------------------------------------------- layer state
def conv_state_view(layer) -> torch.Tensor:
    """The layer's conv state as the ops take it: (blocks, dim, width - 1 + num_spec)."""
    conv_state = layer.kv_cache[0]
    return conv_state if is_conv_state_dim_first() else conv_state.transpose(-1, -2)


def recurrent_state(layer) -> torch.Tensor:
    """The layer's SSM / delta-rule state: Mamba2 (blocks, heads, head_dim, d_state),
    GDN (blocks, HV, V, K)."""
    return layer.kv_cache[1]


def plain_conv_weight(conv1d) -> torch.Tensor:
    """(dim, width): vLLM packs bf16 width-4 conv weights for its own kernel and keeps the plain
    copy beside them as ``_cpu_unpacked_conv_weight``."""
    unpacked = getattr(conv1d, "_cpu_unpacked_conv_weight", None)
    w = conv1d.weight
    return unpacked if unpacked is not None else w.view(w.size(0), w.size(-1))


# ----------------------------------------------------------------------------- private attributes
def rebind_forward(layer) -> None:
    """vLLM's ``CustomOp`` binds its dispatch target (``_forward_method``) at ``__init__``; after
    a class swap it must point at the plugin class's ``forward_cpu``."""
    layer._forward_method = layer.forward_cpu


def keep_off_zentorch(experts) -> None:
    """``CPUUnquantizedExperts`` may route to zentorch (``_use_zentorch``): the plugin's op
    computes the experts instead."""
    experts._use_zentorch = False


def skips_gemm_dispatch(layer) -> bool:
    """Layers vLLM's linear method leaves on plain ``F.linear`` (MLA's kv_b_proj:
    ``_cpu_skip_gemm_dispatch``)."""
    return bool(getattr(layer, "_cpu_skip_gemm_dispatch", False))


def onednn_supported() -> bool:
    """Whether this vLLM build has oneDNN matmuls (``vllm._custom_ops._supports_onednn``)."""
    from vllm import _custom_ops

    return bool(getattr(_custom_ops, "_supports_onednn", False))


def gdn_output_projection(layer, core_attn_out, z):
    """``QwenGatedDeltaNetAttention._output_projection``: gated norm + out projection."""
    return layer._output_projection(core_attn_out, z)
