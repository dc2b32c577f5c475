"""vLLM's Qwen3.5 Gated DeltaNet layer with its conv + recurrence on the plugin's CPU ops.

The projections, gated norm, weights and state shapes stay vLLM's; the core runs
behind vLLM's ``torch.ops.vllm.qwen_gdn_attention_core`` op (so both compile modes
reach it), which calls ``_forward_core`` on the layer. What it fixes on CPU against
vLLM 0.32's own path: fp32 as well as bf16; speculative decoding in batches that mix
speculative and plain rows (state after every draft token written to its column);
prefix caching (the mid-prefill state checkpoint is written, so repeated prefixes hit).

State layout: recurrent state (blocks, HV, V, K) fp32/bf16; conv state viewed as
(blocks, dim, width-1+num_spec).
"""

from __future__ import annotations

import logging

import torch
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import (
    QwenGatedDeltaNetAttention,
)
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.utils.torch_utils import _encode_layer_name

from vllm_hybrid_neuron import envs
from vllm_hybrid_neuron.cpu.layers import op_stats
from vllm_hybrid_neuron.cpu.layers.prefill_checkpoint import store_prefill_checkpoint
from vllm_hybrid_neuron.ops import (
    causal_conv1d_fn,
    causal_conv1d_update,
    chunk_gated_delta_rule,
    fused_sigmoid_gating_delta_rule_update,
    sigmoid_gating,
)


logger = logging.getLogger("vllm.hybrid_neuron")


def vllm_bf16_prefill_kernel():
    """vLLM's own bf16 chunked gated-delta-rule CPU kernel when it is to be used for bf16
    prefills (see ``envs.gdn_prefill_kernel``), else None. Measured (benchmarks/bench_ops.py,
    Qwen3.5-35B-A3B shapes, 2048 tokens) it is ~2x faster than the plugin's fp32-GEMM kernel,
    which stays the fp32 path and the reference-tested fallback."""
    choice = envs.gdn_prefill_kernel()
    available = hasattr(torch.ops._C, "chunk_gated_delta_rule_cpu")
    if choice == "plugin" or (choice == "auto" and not available):
        return None
    if not available:
        raise RuntimeError(f"{envs.GDN_PREFILL_ENV}=vllm: this vLLM build has no "
                           "chunk_gated_delta_rule_cpu kernel")
    return torch.ops._C.chunk_gated_delta_rule_cpu


class PluginGatedDeltaNet(QwenGatedDeltaNetAttention):
    """``QwenGatedDeltaNetAttention`` whose core runs on ``vllm_hybrid_neuron.ops``."""

    def forward_cpu(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mixed_qkvz, _ = self.in_proj_qkvz(hidden_states)
        ba, _ = self.in_proj_ba(hidden_states)
        num_tokens = hidden_states.size(0)
        mixed_qkv, z, b, a = self.prepare_gdn_attention_core_inputs(mixed_qkvz, ba, num_tokens)
        core_attn_out = torch.zeros(  # (tokens, HV, V)
            (num_tokens, self.num_v_heads // self.tp_size, self.head_v_dim),
            dtype=hidden_states.dtype, device=hidden_states.device)
        torch.ops.vllm.qwen_gdn_attention_core(
            mixed_qkv, b, a, core_attn_out, _encode_layer_name(self.prefix))
        return self._output_projection(core_attn_out, z)

    # -- the core: conv + gated delta rule, decodes first, then prefills ---------
    def _forward_core(self, mixed_qkv, b, a, core_attn_out):
        attn_metadata = get_forward_context().attn_metadata
        meta = attn_metadata.get(self.prefix) if isinstance(attn_metadata, dict) else None
        if meta is None or meta.num_actual_tokens == 0:
            return  # profile run: the output buffer's shape is all that matters
        n = meta.num_actual_tokens
        mixed_qkv, b, a = mixed_qkv[:n], b[:n], a[:n]
        conv_state = self.kv_cache[0]  # (blocks, dim, width-1+spec) as the ops want it
        if not is_conv_state_dim_first():
            conv_state = conv_state.transpose(-1, -2)
        ssm_state = self.kv_cache[1]  # (blocks, HV, V, K)
        has_spec = meta.spec_sequence_masks is not None
        if has_spec and meta.num_prefills == 0 and meta.num_decodes == 0:
            spec_idx = non_spec_idx = None  # every token belongs to a speculative row
        elif has_spec:
            spec_idx, non_spec_idx = meta.spec_token_indx, meta.non_spec_token_indx
        else:
            spec_idx = non_spec_idx = None

        if has_spec:
            take = (lambda t: t) if spec_idx is None else (lambda t: t.index_select(0, spec_idx))
            out_s = self._spec_decode(meta, take(mixed_qkv), take(b), take(a), conv_state,
                                      ssm_state)
            if spec_idx is None:
                core_attn_out[:n] = out_s
                return
            core_attn_out.index_copy_(0, spec_idx, out_s)
            mixed_qkv, b, a = (t.index_select(0, non_spec_idx) for t in (mixed_qkv, b, a))
        out = self._non_spec(meta, mixed_qkv, b, a, conv_state, ssm_state)
        if non_spec_idx is not None:
            core_attn_out.index_copy_(0, non_spec_idx, out)
        else:
            core_attn_out[:n] = out

    def _bf16_prefill_kernel(self):
        if not hasattr(self, "_vhn_bf16_prefill"):
            self._vhn_bf16_prefill = vllm_bf16_prefill_kernel()
            if not getattr(PluginGatedDeltaNet, "_vhn_logged", False):
                PluginGatedDeltaNet._vhn_logged = True
                logger.info("GDN bf16 chunked prefill kernel: %s",
                            "vLLM's chunk_gated_delta_rule_cpu" if self._vhn_bf16_prefill
                            is not None else "vllm_hybrid_neuron::gdn_chunk")
        return self._vhn_bf16_prefill

    def _conv_weight(self) -> torch.Tensor:
        # vLLM packs bf16 width-4 conv weights for its own kernel and keeps the plain
        # (dim, width) copy beside them.
        unpacked = getattr(self.conv1d, "_cpu_unpacked_conv_weight", None)
        w = self.conv1d.weight
        return unpacked if unpacked is not None else w.view(w.size(0), w.size(-1))

    def _gdn_decode(self, qkv, b, a, ssm_state, cu_seqlens, slots, num_accepted=None):
        q, k, v = self.rearrange_mixed_qkv(qkv)  # (1, T, H, K), (1, T, H, K), (1, T, HV, V)
        out, _ = fused_sigmoid_gating_delta_rule_update(
            A_log=self.A_log, a=a, b=b, dt_bias=self.dt_bias, q=q, k=k, v=v,
            initial_state=ssm_state, inplace_final_state=True, cu_seqlens=cu_seqlens,
            ssm_state_indices=slots, num_accepted_tokens=num_accepted,
            use_qk_l2norm_in_kernel=True)
        return out[0]  # (T, HV, V)

    def _spec_decode(self, meta, qkv, b, a, conv_state, ssm_state):
        slots = meta.spec_state_indices_tensor  # (spec rows, 1 + num_spec)
        rows = meta.num_spec_decodes
        qkv = causal_conv1d_update(
            qkv, conv_state, self._conv_weight(), self.conv1d.bias, self.activation,
            conv_state_indices=slots[:rows, 0], num_accepted_tokens=meta.num_accepted_tokens,
            query_start_loc=meta.spec_query_start_loc, max_query_len=slots.size(-1))
        op_stats.count("gdn_spec_decode")
        return self._gdn_decode(qkv, b, a, ssm_state, meta.spec_query_start_loc[:rows + 1],
                                slots, meta.num_accepted_tokens)

    def _non_spec(self, meta, qkv, b, a, conv_state, ssm_state):
        """Non-speculative rows: decodes (one token each) first, then prefills."""
        nd, ndt = meta.num_decodes, meta.num_decode_tokens
        cu = meta.non_spec_query_start_loc  # (rows + 1,)
        slots = meta.non_spec_state_indices_tensor  # (rows,)
        out = torch.empty(qkv.shape[0], self.num_v_heads // self.tp_size, self.head_v_dim,
                          dtype=qkv.dtype, device=qkv.device)  # (T, HV, V)
        if nd > 0:
            x = causal_conv1d_update(qkv[:ndt], conv_state, self._conv_weight(),
                                     self.conv1d.bias, self.activation,
                                     conv_state_indices=slots[:nd])
            out[:ndt] = self._gdn_decode(x, b[:ndt], a[:ndt], ssm_state, cu[:nd + 1],
                                         slots[:nd])
            op_stats.count("gdn_decode")
        if meta.num_prefills > 0:
            checkpoint = meta.checkpoint
            offsets = None
            if checkpoint is not None:
                offsets = checkpoint.checkpoint_offsets[nd:]
            self._prefill(qkv[ndt:], b[ndt:], a[ndt:], out[ndt:], conv_state, ssm_state,
                          cu[nd:] - ndt, slots[nd:], meta.has_initial_state[nd:],
                          checkpoint, offsets, nd)
            op_stats.count("gdn_prefill")
        return out

    def _prefill(self, qkv, b, a, out, conv_state, ssm_state, cu, slots, has_init,
                 checkpoint, offsets, first_row):
        x_t = qkv.transpose(0, 1)  # (dim, T)
        conv = causal_conv1d_fn(
            x_t, self._conv_weight(), self.conv1d.bias, conv_states=conv_state,
            query_start_loc=cu, cache_indices=slots, has_initial_state=has_init,
            activation=self.activation).transpose(0, 1)  # (T, dim)
        q, k, v = self.rearrange_mixed_qkv(conv)  # (1, T, H|HV, K|V)
        g, beta = sigmoid_gating(self.A_log, a, b, self.dt_bias)  # (T, HV) each, fp32
        ssm_state[slots[~has_init]] = 0  # rows without a cached prefix start from zero
        segments = [(cu[:-1], cu[1:], slots)]
        ckpt_rows = None
        if offsets is not None and bool((offsets > 0).any()):
            # Run each checkpointed row in two pieces: up to its checkpoint (state kept
            # in the checkpoint block), then the rest (resumed from that block).
            ckpt_rows = torch.nonzero(offsets > 0).flatten()
            ckpt_slots = checkpoint.state_indices[first_row:][ckpt_rows]
            mid = cu[:-1].clone()
            mid[ckpt_rows] += offsets[ckpt_rows].to(mid.dtype)
            first_slots = slots.clone()
            first_slots[ckpt_rows] = ckpt_slots
            ssm_state[ckpt_slots] = ssm_state[slots[ckpt_rows]]
            segments = [(cu[:-1], torch.where(offsets > 0, mid, cu[1:]), first_slots),
                        (mid[ckpt_rows], cu[1:][ckpt_rows], slots[ckpt_rows])]
        for i, (starts, ends, seg_slots) in enumerate(segments):
            if i == 1:
                ssm_state[seg_slots] = ssm_state[ckpt_slots]
            self._chunk(q, k, v, g[None], beta[None], out, ssm_state, starts, ends, seg_slots)
        if ckpt_rows is not None:  # the conv history up to each checkpoint
            store_prefill_checkpoint(offsets, checkpoint.state_indices[first_row:], None, x_t,
                                     conv_state, ssm_state, cu,
                                     state_len=self.conv_kernel_size - 1)

    def _chunk(self, q, k, v, g, beta, out, ssm_state, starts, ends, slots) -> None:
        """One chunked gated-delta-rule call over token ranges [starts, ends)."""
        lengths = (ends - starts).to(torch.long)
        contiguous = bool((starts[1:] == ends[:-1]).all()) and int(starts[0]) == 0 \
            and int(ends[-1]) == q.shape[1]
        if contiguous:
            idx = None
            cu = torch.cat([starts[:1], ends]).to(torch.int32)
        else:
            idx = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends)])
            cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(lengths, 0)
        pick = (lambda t: t) if idx is None else (lambda t: t[:, idx])
        vllm_kernel = self._bf16_prefill_kernel() if q.dtype == torch.bfloat16 else None
        if vllm_kernel is not None:
            # vLLM's kernel reads and writes state rows as (HV, K, V), the transpose of the
            # cache's (HV, V, K) that every other op here uses: run it on transposed copies.
            rows = slots.long()
            pool = ssm_state[rows].transpose(-1, -2).contiguous()  # (N, HV, K, V)
            o, _ = vllm_kernel(pick(q), pick(k), pick(v), pick(g), pick(beta).to(q.dtype),
                               pool, False, cu, False, True,
                               torch.arange(rows.numel(), dtype=torch.int32), 1e-6)
            ssm_state[rows] = pool.transpose(-1, -2).to(ssm_state.dtype)
            op_stats.count("gdn_prefill_vllm_bf16_kernel")
        else:
            o, _ = chunk_gated_delta_rule(
                pick(q), pick(k), pick(v), pick(g), pick(beta), initial_state=ssm_state,
                output_final_state=False, cu_seqlens=cu, use_qk_l2norm_in_kernel=True,
                initial_state_indices=slots)
        if idx is None:
            out.copy_(o[0])
        else:
            out[idx] = o[0]
