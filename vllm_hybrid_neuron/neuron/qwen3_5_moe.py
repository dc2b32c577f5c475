"""NxDI port of Qwen3.5-MoE: Gated DeltaNet + gated full attention (partial RoPE) + MoE with a
sigmoid-gated shared expert. (1 + w) RMSNorms; the GDN output norm is plain w, norm-then-gate.

State per slot, aliased like a KV cache:
  GDN layer:       conv_state (slots, conv_dim, K-1), rec_state (slots, Hv, Dk, Dv) fp32
  attention layer: k_cache, v_cache (slots, Hkv, S, hd)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vllm_hybrid_neuron.neuron import base
from vllm_hybrid_neuron.neuron.common import (
    RMSNorm, apply_partial_rope, attention_with_cache, read_slots, rope_cos_sin, write_slots,
)
from vllm_hybrid_neuron.neuron.hybrid import (
    HybridInferenceConfig, HybridModelMixin, PortForCausalLM, check_hybrid_neuron_config, flatten_text_config,
)
from vllm_hybrid_neuron.neuron.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from vllm_hybrid_neuron.neuron.mixer import Mixer, StateSpec, Step, kv_cache_shapes
from vllm_hybrid_neuron.neuron.moe import GluMLP, RoutedExperts, shard_glu, stack_experts, top_k_affinities
from vllm_hybrid_neuron.neuron.tp import ShardedWeight, heads_per_rank, per_rank, shard_fused, shard_heads, tp_degree
from vllm_hybrid_neuron.recurrences import causal_conv, chunk_gated_delta_rule, gated_delta_rule, next_conv_state


class Qwen3_5MoeInferenceConfig(HybridInferenceConfig):
    def add_derived_config(self) -> None:
        super().add_derived_config()
        flatten_text_config(self)  # Qwen3_5MoeForConditionalGeneration nests the text model
        rope = getattr(self, "rope_parameters", None) or {}
        rope = rope if isinstance(rope, dict) else vars(rope)
        self.rope_theta = float(rope.get("rope_theta", getattr(self, "rope_theta", 10000.0)))
        self.partial_rotary_factor = float(rope.get("partial_rotary_factor", 1.0))
        check_hybrid_neuron_config(self)

    def get_required_attributes(self) -> list[str]:
        return ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rms_norm_eps", "layer_types", "linear_num_key_heads",
                "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                "linear_conv_kernel_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size"]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(Mixer):
    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, tp = config.hidden_size, tp_degree(config)
        # this rank's heads: Hv/tp value heads and the key heads they read (replicated if Hk < tp)
        self.Hk = heads_per_rank(config.linear_num_key_heads, tp, "linear_num_key_heads")
        self.Hv = per_rank(config.linear_num_value_heads, tp, "linear_num_value_heads")
        self.Dk, self.Dv = config.linear_key_head_dim, config.linear_value_head_dim
        self.K = config.linear_conv_kernel_dim
        self.key_dim, self.value_dim = self.Hk * self.Dk, self.Hv * self.Dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.eps = config.rms_norm_eps
        # Prefill runs the chunked WY form with this chunk (decode: one recurrence step).
        self.chunk = int(getattr(config, "gdn_chunk_size", None) or 64)
        # in_proj_qkv and the conv rank-major: rank r's piece is [q_r, k_r, v_r]
        self.in_proj_qkv = ColumnParallelLinear(D, tp * self.conv_dim, bias=False, gather_output=False, dtype=dtype)
        self.in_proj_z = ColumnParallelLinear(D, tp * self.value_dim, bias=False, gather_output=False, dtype=dtype)
        self.in_proj_b = ColumnParallelLinear(D, tp * self.Hv, bias=False, gather_output=False, dtype=dtype)
        self.in_proj_a = ColumnParallelLinear(D, tp * self.Hv, bias=False, gather_output=False, dtype=dtype)
        self.conv_weight = ShardedWeight((tp * self.conv_dim, self.K), tp, dtype)  # (C, K)
        self.dt_bias = ShardedWeight((tp * self.Hv,), tp, dtype)
        self.A_log = ShardedWeight((tp * self.Hv,), tp, dtype)
        self.norm_weight = nn.Parameter(torch.ones(self.Dv, dtype=dtype))  # per head dim: replicated
        self.out_proj = RowParallelLinear(tp * self.value_dim, D, bias=False, input_is_parallel=True, dtype=dtype)

    def state_shapes(self, slots: int, seq_len: int):
        return [StateSpec((slots, self.conv_dim, self.K - 1), None, "conv"),
                StateSpec((slots, self.Hv, self.Dk, self.Dv), torch.float32, "recurrent")]

    def forward(self, x, step: Step, states):
        """x: (B, L, D); states: [conv (slots, C, K-1), recurrent (slots, Hv, Dk, Dv)]."""
        valid, seq_ids, is_prefill = step.valid, step.seq_ids, step.is_prefill
        conv_all, rec_all = states
        B, L, _ = x.shape
        m = valid[..., None].to(x.dtype)  # (B, L, 1)
        qkv = self.in_proj_qkv(x) * m  # (B, L, C); padded inputs are zero
        conv_state = read_slots(conv_all, seq_ids)  # (B, C, K-1)
        rec = read_slots(rec_all, seq_ids).float()  # (B, Hv, Dk, Dv)
        if is_prefill:  # a prefill starts a fresh sequence
            conv_state, rec = torch.zeros_like(conv_state), torch.zeros_like(rec)
        new_conv = next_conv_state(qkv, conv_state, valid.long().sum(-1))  # last K-1 valid inputs
        qkv = F.silu(causal_conv(qkv, conv_state, self.conv_weight.weight, None))  # (B, L, C)

        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], -1)
        rep = self.Hv // self.Hk
        q = l2norm(q.float().view(B, L, self.Hk, self.Dk)).repeat_interleave(rep, 2) * self.Dk ** -0.5
        k = l2norm(k.float().view(B, L, self.Hk, self.Dk)).repeat_interleave(rep, 2)  # (B, L, Hv, Dk)
        v = v.float().view(B, L, self.Hv, self.Dv)
        k, v = k * m[..., None].float(), v * m[..., None].float()  # padding: no write (the conv leaks into it)
        beta = torch.sigmoid(self.in_proj_b(x).float()) * m.float()  # (B, L, Hv); 0 on padding
        g = -torch.exp(self.A_log.weight.float()) * F.softplus(self.in_proj_a(x).float() + self.dt_bias.weight.float())
        g = g * m.float()  # padding: no decay

        if is_prefill:
            o, rec = chunk_gated_delta_rule(q, k, v, g, beta, rec, self.chunk)  # (B, L, Hv, Dv)
        else:
            o, rec = gated_delta_rule(q, k, v, g, beta, rec)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm_weight.float()
        o = o * F.silu(self.in_proj_z(x).float().view(B, L, self.Hv, self.Dv))  # norm, then gate
        out = self.out_proj(o.reshape(B, L, self.value_dim).to(x.dtype))
        return out, [write_slots(conv_all, seq_ids, new_conv), write_slots(rec_all, seq_ids, rec)]


class GatedAttention(Mixer):
    """GQA with Q/K (1+w) RMSNorm, partial RoPE, and a sigmoid output gate from q_proj."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, tp = config.hidden_size, tp_degree(config)
        self.Hq = per_rank(config.num_attention_heads, tp, "num_attention_heads")  # this rank's heads
        self.Hkv = heads_per_rank(config.num_key_value_heads, tp, "num_key_value_heads")
        self.hd = config.head_dim
        self.rot_dim = int(self.hd * config.partial_rotary_factor)
        self.theta = config.rope_theta
        bias = getattr(config, "attention_bias", False)
        self.q_proj = ColumnParallelLinear(D, tp * 2 * self.Hq * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.k_proj = ColumnParallelLinear(D, tp * self.Hkv * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.v_proj = ColumnParallelLinear(D, tp * self.Hkv * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.o_proj = RowParallelLinear(tp * self.Hq * self.hd, D, bias=bias, input_is_parallel=True, dtype=dtype)
        self.q_norm = RMSNorm(self.hd, config.rms_norm_eps, offset=1.0)
        self.k_norm = RMSNorm(self.hd, config.rms_norm_eps, offset=1.0)

    def state_shapes(self, slots: int, seq_len: int):
        return kv_cache_shapes(slots, self.Hkv, seq_len, self.hd)

    def forward(self, x, step: Step, states):
        B, L, _ = x.shape
        q, gate = self.q_proj(x).view(B, L, self.Hq, 2 * self.hd).chunk(2, -1)  # (B, L, Hq, hd) each
        q = self.q_norm(q).transpose(1, 2)  # (B, Hq, L, hd)
        k = self.k_norm(self.k_proj(x).view(B, L, self.Hkv, self.hd)).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(x).view(B, L, self.Hkv, self.hd).transpose(1, 2)
        cos, sin = rope_cos_sin(step.position_ids, self.rot_dim, self.theta, q.dtype)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        out, k_cache, v_cache = attention_with_cache(q, k, v, *states, step.valid, step.position_ids,
                                                     step.seq_ids, self.hd ** -0.5, step.is_prefill)
        out = out.transpose(1, 2).reshape(B, L, -1) * torch.sigmoid(gate.reshape(B, L, -1))
        return self.o_proj(out), [k_cache, v_cache]


class Qwen3_5MoE(nn.Module):
    """Top-k of softmax(router) renormalised, plus sigmoid(w_g . x) * shared SwiGLU expert."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, E, I = config.hidden_size, config.num_experts, config.moe_intermediate_size
        self.top_k = config.num_experts_per_tok
        self.router = nn.Parameter(torch.zeros(E, D, dtype=dtype))  # (E, D), replicated
        self.experts = RoutedExperts(config, E, D, I, self.top_k, "silu", dtype)
        self.shared = GluMLP(config, D, config.shared_expert_intermediate_size, "silu", dtype)
        self.shared_expert_gate = nn.Parameter(torch.zeros(1, D, dtype=dtype))  # (1, D), replicated

    def forward(self, x):
        B, L, D = x.shape
        t = x.reshape(-1, D)  # (T, D)
        affinities, index = top_k_affinities(F.linear(t, self.router), self.top_k)  # (T, E), (T, k)
        shared = torch.sigmoid(F.linear(t, self.shared_expert_gate)) * self.shared(t)
        return (self.experts(t, affinities, index, L) + shared).view(B, L, D)


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.mixer = GatedDeltaNet(config, dtype) if layer_type == "linear_attention" else GatedAttention(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        self.moe = Qwen3_5MoE(config, dtype)

    def forward(self, h, step: Step, states):
        x, states = self.mixer(self.input_layernorm(h), step, states)
        h = h + x
        return h + self.moe(self.post_attention_layernorm(h)), states


class NeuronQwen3_5MoeModel(HybridModelMixin, base.NeuronBaseModel):
    def init_model(self, config) -> None:
        dtype = config.neuron_config.torch_dtype
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size,
                                              getattr(config, "pad_token_id", None), dtype=dtype)
        self.layers = nn.ModuleList(Qwen3_5DecoderLayer(config, t, dtype) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                            gather_output=not self.on_device_sampling, dtype=dtype)
        slots, S = self.max_batch_size, config.neuron_config.seq_len
        self.init_states([layer.mixer.state_shapes(slots, S) for layer in self.layers], dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def logits(self, h):
        return self.lm_head(self.norm(h)).float()


class NeuronQwen3_5MoeForCausalLM(PortForCausalLM):
    _model_cls = NeuronQwen3_5MoeModel

    @classmethod
    def get_config_cls(cls):
        return Qwen3_5MoeInferenceConfig

    @staticmethod
    def convert_hf_to_neuron_state_dict(state_dict: dict, config) -> dict:
        """HF keys ("model." stripped; ConditionalGeneration's "language_model." too) -> port keys,
        tensor-parallel tensors rank-major for ``tp_degree`` (see ``tp.py``). Per-expert gate/up/down
        are stacked into (E, D, 2I) [gate | up] and (E, I, D)."""
        tp = tp_degree(config)
        Hk, Hv = config.linear_num_key_heads, config.linear_num_value_heads
        Dk, Dv = config.linear_key_head_dim, config.linear_value_head_dim
        Hq, Hkv, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        sd = {k.replace("language_model.", "", 1): v for k, v in state_dict.items()
              if not k.startswith(("visual.", "model.visual.", "mtp."))}
        out = {}

        def qkv_channels(t):
            q, k, v = t.split([Hk * Dk, Hk * Dk, Hv * Dv], 0)
            return shard_fused([(q, Hk, Dk, "linear_num_key_heads"), (k, Hk, Dk, "linear_num_key_heads"),
                                (v, Hv, Dv, "linear_num_value_heads")], tp)

        for i in range(config.num_hidden_layers):
            p = f"layers.{i}."
            e = [f"{p}mlp.experts.{j}." for j in range(config.num_experts)]
            gate_up, down = stack_experts([sd.pop(x + "gate_proj.weight") for x in e],
                                          [sd.pop(x + "up_proj.weight") for x in e],
                                          [sd.pop(x + "down_proj.weight") for x in e])
            out[p + "moe.experts.experts.mlp_op.gate_up_proj.weight"] = gate_up  # (E, D, 2I)
            out[p + "moe.experts.experts.mlp_op.down_proj.weight"] = down  # (E, I, D)
            out[p + "moe.router"] = sd.pop(p + "mlp.gate.weight")
            out[p + "moe.shared.gate_up.weight"] = shard_glu(sd.pop(p + "mlp.shared_expert.gate_proj.weight"),
                                                             sd.pop(p + "mlp.shared_expert.up_proj.weight"), tp)
            out[p + "moe.shared.down.weight"] = sd.pop(p + "mlp.shared_expert.down_proj.weight")
            out[p + "moe.shared_expert_gate"] = sd.pop(p + "mlp.shared_expert_gate.weight")
            if config.layer_types[i] == "linear_attention":
                a, o = p + "linear_attn.", p + "mixer."
                out[o + "in_proj_qkv.weight"] = qkv_channels(sd.pop(a + "in_proj_qkv.weight"))
                out[o + "conv_weight.weight"] = qkv_channels(sd.pop(a + "conv1d.weight")[:, 0])  # (C, K)
                out[o + "in_proj_z.weight"] = shard_heads(sd.pop(a + "in_proj_z.weight"), Hv, Dv, tp,
                                                          "linear_num_value_heads")
                for name in ("in_proj_b.weight", "in_proj_a.weight"):
                    out[o + name] = shard_heads(sd.pop(a + name), Hv, 1, tp, "linear_num_value_heads")
                for name in ("dt_bias", "A_log"):
                    out[o + name + ".weight"] = shard_heads(sd.pop(a + name), Hv, 1, tp, "linear_num_value_heads")
                out[o + "norm_weight"] = sd.pop(a + "norm.weight")
                out[o + "out_proj.weight"] = sd.pop(a + "out_proj.weight")
            else:
                a, o = p + "self_attn.", p + "mixer."
                for proj, n, d, name in (("q_proj", Hq, 2 * hd, "num_attention_heads"),
                                         ("k_proj", Hkv, hd, "num_key_value_heads"),
                                         ("v_proj", Hkv, hd, "num_key_value_heads")):
                    for b in ("weight", "bias"):
                        if a + f"{proj}.{b}" in sd:
                            out[o + f"{proj}.{b}"] = shard_heads(sd.pop(a + f"{proj}.{b}"), n, d, tp, name)
                for key in [k for k in sd if k.startswith(a)]:  # o_proj, q_norm, k_norm
                    out[o + key[len(a):]] = sd.pop(key)
        out.update(sd)  # norms, embeddings, lm_head
        return out
