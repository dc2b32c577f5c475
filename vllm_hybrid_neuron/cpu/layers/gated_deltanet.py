"""vLLM's Qwen3.5 Gated DeltaNet layer with its conv + recurrence on the plugin's CPU ops.

The projections, gated norm, weights and state shapes stay vLLM's; the core runs
behind vLLM's ``torch.ops.vllm.qwen_gdn_attention_core`` op (so both compile modes
reach it), which calls ``_forward_core`` on the layer. What it fixes on CPU against
vLLM 0.32's own path: fp32 as well as bf16; speculative decoding in batches that mix
speculative and plain rows (state after every draft token written to its column);
prefix caching (the mid-prefill state checkpoint is written, so repeated prefixes hit).

State layout: recurrent state (blocks, HV, V, K) fp32/bf16; conv state viewed as
(blocks, dim, width-1+num_spec). vLLM's metadata is read only through ``cpu/vllm_seam.py``,
as a ``cpu.batch.RecurrentBatch``.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import (
    QwenGatedDeltaNetAttention,
)

from vllm_hybrid_neuron import envs
from vllm_hybrid_neuron.cpu import vllm_seam
from vllm_hybrid_neuron.cpu.cpu_features import has_amx, has_avx512_bf16
from vllm_hybrid_neuron.cpu.batch import DecodeRows, PrefillRows, SpecRows, put, take
from vllm_hybrid_neuron.cpu.layers.prefill_checkpoint import store_prefill_checkpoint
from vllm_hybrid_neuron.ops import (
    causal_conv1d_fn,
    chunk_gated_delta_rule,
    gdn_decode,
    gdn_spec_decode,
    sigmoid_gating,
)


logger = logging.getLogger("vllm.hybrid_neuron")


def vllm_bf16_prefill_kernel():
    """vLLM's own bf16 chunked gated-delta-rule CPU kernel when it is to be used for bf16
    prefills (see ``envs.gdn_prefill_kernel``), else None.

    "auto" takes it on CPUs with AMX tiles or AVX512-BF16. Measured (benchmarks/bench_ops.py,
    Qwen3.5-35B-A3B shapes, bf16, 2 threads): on an Intel Xeon with AMX 42 ms against the
    plugin's 319 ms for 2048 tokens; on an AMD Zen 4 (AVX512-BF16, no AMX) 26 ms against the
    plugin's 71 ms for 1024 tokens (2026-12-07); on an AVX2 Zen 3 (no AVX-512) 1658 ms against
    the plugin's 106 ms for 1024 tokens - there vLLM's kernel made a 1024-token Qwen3.5
    prefill twice as slow. The plugin's kernel stays the fp32 path and the reference-tested
    fallback."""
    choice = envs.gdn_prefill_kernel()
    kernel = vllm_seam.vllm_chunk_gated_delta_rule_cpu()
    if choice == "plugin" or (choice == "auto" and (kernel is None or not _fast_vllm_kernel())):
        return None
    if kernel is None:
        raise RuntimeError(f"{envs.GDN_PREFILL_ENV}=vllm: this vLLM build has no "
                           "chunk_gated_delta_rule_cpu kernel")
    return kernel


def _fast_vllm_kernel() -> bool:
    """Whether vLLM's bf16 kernel outruns the plugin's on this CPU (AMX or AVX512-BF16)."""
    return has_amx() or has_avx512_bf16()


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
        vllm_seam.gdn_attention_core(mixed_qkv, b, a, core_attn_out, self.prefix)
        return vllm_seam.gdn_output_projection(self, core_attn_out, z)

    # -- the core: conv + gated delta rule over each group of rows ----------------
    def _forward_core(self, mixed_qkv, b, a, core_attn_out):
        meta = vllm_seam.layer_metadata(self.prefix)
        batch = vllm_seam.gdn_batch(meta) if meta is not None else None
        if batch is None:
            return  # profile run: the output buffer's shape is all that matters
        conv_state = vllm_seam.conv_state_view(self)  # (blocks, dim, width-1+spec)
        ssm_state = vllm_seam.recurrent_state(self)  # (blocks, HV, V, K)
        for rows, run in ((batch.spec, self._spec_decode), (batch.decode, self._decode),
                          (batch.prefill, self._prefill)):
            if rows is not None:
                out = run(rows, take(mixed_qkv, rows.tokens), take(b, rows.tokens),
                          take(a, rows.tokens), conv_state, ssm_state)  # (tokens, HV, V)
                put(core_attn_out, rows.tokens, out)

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
        return vllm_seam.plain_conv_weight(self.conv1d)  # (dim, width)

    def _spec_decode(self, rows: SpecRows, qkv, b, a, conv_state, ssm_state):
        """1 + drafts tokens per row, the state after each to its own slot (``gdn_spec_decode``:
        bit for bit what one ``_decode`` per token computes)."""
        out = torch.empty(qkv.shape[0], self.num_v_heads // self.tp_size, self.head_v_dim,
                          dtype=qkv.dtype, device=qkv.device)  # (T, HV, V)
        return gdn_spec_decode(qkv, a, b, conv_state, self._conv_weight(), self.conv1d.bias,
                               ssm_state, self.A_log, self.dt_bias, rows.slots, rows.num_accepted,
                               rows.cu_seqlens, self.num_k_heads // self.tp_size,
                               self.head_k_dim, out, activation=self.activation)

    def _decode(self, rows: DecodeRows, qkv, b, a, conv_state, ssm_state):
        """One token per row: conv update, gates and recurrence in one op (``gdn_decode``)."""
        out = torch.empty(qkv.shape[0], self.num_v_heads // self.tp_size, self.head_v_dim,
                          dtype=qkv.dtype, device=qkv.device)  # (T, HV, V)
        return gdn_decode(qkv, a, b, conv_state, self._conv_weight(), self.conv1d.bias,
                          ssm_state, self.A_log, self.dt_bias, rows.slots,
                          self.num_k_heads // self.tp_size, self.head_k_dim, out,
                          activation=self.activation)

    def _prefill(self, rows: PrefillRows, qkv, b, a, conv_state, ssm_state):
        cu, slots, has_init, marks = rows.cu_seqlens, rows.slots, rows.has_initial_state, \
            rows.checkpoints
        out = torch.empty(qkv.shape[0], self.num_v_heads // self.tp_size, self.head_v_dim,
                          dtype=qkv.dtype, device=qkv.device)  # (T, HV, V)
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
        offsets = marks.offsets if marks is not None else None
        if offsets is not None and bool((offsets > 0).any()):
            # Run each checkpointed row in two pieces: up to its checkpoint (state kept
            # in the checkpoint block), then the rest (resumed from that block).
            ckpt_rows = torch.nonzero(offsets > 0).flatten()
            ckpt_slots = marks.slots[ckpt_rows]
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
            store_prefill_checkpoint(offsets, marks.slots, None, x_t, conv_state, ssm_state, cu,
                                     state_len=self.conv_kernel_size - 1)
        return out

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
            o = self._chunk_on_vllm_kernel(vllm_kernel, pick(q), pick(k), pick(v), pick(g),
                                           pick(beta).to(q.dtype), ssm_state, cu, slots)
        else:
            o, _ = chunk_gated_delta_rule(
                pick(q), pick(k), pick(v), pick(g), pick(beta), initial_state=ssm_state,
                output_final_state=False, cu_seqlens=cu, use_qk_l2norm_in_kernel=True,
                initial_state_indices=slots)
        if idx is None:
            out.copy_(o[0])
        else:
            out[idx] = o[0]

    @staticmethod
    def _chunk_on_vllm_kernel(kernel, q, k, v, g, beta, ssm_state, cu, slots):
        """vLLM's bf16 kernel reads and writes states as (HV, K, V), the transpose of the
        cache's (HV, V, K) that every other op here uses: run it on transposed copies."""
        rows = slots.long()
        states_kv = ssm_state[rows].transpose(-1, -2).contiguous()  # (N, HV, K, V)
        o = vllm_seam.run_vllm_chunk_gated_delta_rule(kernel, q, k, v, g, beta, states_kv, cu)
        ssm_state[rows] = states_kv.transpose(-1, -2).to(ssm_state.dtype)
        return o
