"""NxDI port of IBM Granite 4.0-H (GraniteMoeHybrid): Mamba2 + attention (NoPE) + MoE + shared MLP.

Per-slot recurrent state lives next to the KV caches in ``past_key_values`` and is
aliased input->output by NxDI exactly like a KV cache:
  Mamba2 layer:    conv_state (slots, conv_dim, K-1), ssm_state (slots, H, P, N) fp32
  attention layer: k_cache, v_cache (slots, Hkv, S, D)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from vllm_hybrid_neuron.neuron import base
from vllm_hybrid_neuron.neuron.common import (
    RMSNorm, apply_partial_rope, attention_with_cache, read_slots, rms_norm_gated, rope_cos_sin, write_slots,
)
from vllm_hybrid_neuron.neuron.hybrid import (
    HybridInferenceConfig, HybridModelMixin, PortForCausalLM, check_hybrid_neuron_config,
)
from vllm_hybrid_neuron.neuron.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from vllm_hybrid_neuron.neuron.mixer import Mixer, StateSpec, Step, kv_cache_shapes
from vllm_hybrid_neuron.neuron.moe import GluMLP, RoutedExperts, from_fused_hf, shard_glu, top_k_affinities
from vllm_hybrid_neuron.neuron.tp import (
    ShardedWeight, heads_per_rank, per_rank, reduce_sum, shard_fused, shard_heads, tp_degree,
)
from vllm_hybrid_neuron.recurrences import causal_conv, next_conv_state, ssd_chunked, ssd_step


class GraniteMoeHybridInferenceConfig(HybridInferenceConfig):
    def add_derived_config(self) -> None:
        super().add_derived_config()
        # The hub's config.json files spell them "mamba" / "attention" (layers_block_type in older
        # ones); transformers 5 renames them on load, transformers 4.57 (NxDI's pin) does not.
        raw = list(getattr(self, "layer_types", None) or self.layers_block_type)
        spellings = {"mamba": "linear_attention", "linear_attention": "linear_attention",
                     "attention": "full_attention", "full_attention": "full_attention"}
        unknown = sorted({t for t in raw if t not in spellings})
        if unknown:
            raise ValueError(f"{type(self).__name__}: layer_types has {unknown}; expected mamba / attention "
                             "(or linear_attention / full_attention)")
        self.layer_types = [spellings[t] for t in raw]
        check_hybrid_neuron_config(self)

    def get_required_attributes(self) -> list[str]:
        return ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "layer_types", "mamba_n_heads", "mamba_d_head",
                "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                "num_local_experts", "num_experts_per_tok", "intermediate_size",
                "shared_intermediate_size", "embedding_multiplier", "logits_scaling",
                "residual_multiplier", "attention_multiplier"]


class Mamba2Mixer(Mixer):
    """Mamba2 mixer; at TP > 1 each rank holds H/tp heads (their z, x, dt channels and their
    group's B, C) and the gated norm's mean square is summed over the ranks."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, tp = config.hidden_size, tp_degree(config)
        self.tp = tp
        self.H, self.P = config.mamba_n_heads, config.mamba_d_head
        self.G, self.N, self.K = config.mamba_n_groups, config.mamba_d_state, config.mamba_d_conv
        self.I = int(config.mamba_expand * D)
        self.Hl = per_rank(self.H, tp, "mamba_n_heads")  # this rank's heads
        self.Gl = heads_per_rank(self.G, tp, "mamba_n_groups")  # this rank's groups (replicated if G < tp)
        self.Il = self.Hl * self.P
        self.conv_dim = self.Il + 2 * self.Gl * self.N  # this rank's conv channels [x, B, C]
        self.eps = config.rms_norm_eps
        # SSD chunk: prompts up to this length use one L x L log-space scan; longer ones are
        # chunked so the compiled L x L intermediates stay small (set ssd_chunk_size to override).
        self.chunk = int(getattr(config, "ssd_chunk_size", None) or min(config.mamba_chunk_size, 128))
        lo, hi = (float(v) for v in getattr(config, "time_step_limit", (0.0, float("inf"))))
        self.dt_limit = (lo, hi)
        # in_proj rank-major: rank r's piece is [z_r, x_r, B_r, C_r, dt_r] (weight conversion lays it out)
        self.in_proj = ColumnParallelLinear(D, tp * (self.Il + self.conv_dim + self.Hl), bias=config.mamba_proj_bias,
                                            gather_output=False, dtype=dtype)
        self.conv_weight = ShardedWeight((tp * self.conv_dim, self.K), tp, dtype)  # (C, K) rank-major
        self.conv_bias = ShardedWeight((tp * self.conv_dim,), tp, dtype) if config.mamba_conv_bias else None
        self.dt_bias = ShardedWeight((self.H,), tp, dtype)
        self.A_log = ShardedWeight((self.H,), tp, dtype)
        self.D = ShardedWeight((self.H,), tp, dtype)
        self.norm_weight = ShardedWeight((self.I,), tp, dtype, fill=1.0)
        self.out_proj = RowParallelLinear(self.I, D, bias=config.mamba_proj_bias, input_is_parallel=True,
                                          dtype=dtype)

    def state_shapes(self, slots: int, seq_len: int):
        return [StateSpec((slots, self.conv_dim, self.K - 1), None, "conv"),
                StateSpec((slots, self.Hl, self.P, self.N), torch.float32, "ssm")]

    def gated_norm(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """w * norm(y * silu(z)) over all I channels (transformers' norm_before_gate=False, one group):
        at TP > 1 each rank holds I/tp of them, so the sum of squares is reduced over the ranks."""
        if self.tp == 1:
            return rms_norm_gated(y, z, self.norm_weight.weight, self.eps)
        h = y.float() * F.silu(z.float())  # (B, L, Il)
        mean_sq = reduce_sum(h.pow(2).sum(-1, keepdim=True), self.tp) / self.I
        return (self.norm_weight.weight.float() * h * torch.rsqrt(mean_sq + self.eps)).type_as(y)

    def forward(self, x, step: Step, states):
        """x: (B, L, D); states: [conv (slots,C,K-1), ssm (slots,Hl,P,N)]."""
        valid, seq_ids, is_prefill = step.valid, step.seq_ids, step.is_prefill
        conv_all, ssm_all = states
        Bsz, L, _ = x.shape
        z, xBC, dt = self.in_proj(x).split([self.Il, self.conv_dim, self.Hl], -1)
        conv_state = read_slots(conv_all, seq_ids)  # (B, C, K-1)
        if is_prefill:
            conv_state = torch.zeros_like(conv_state)  # a prefill starts a fresh sequence
        conv_bias = None if self.conv_bias is None else self.conv_bias.weight
        xBC_conv = F.silu(causal_conv(xBC, conv_state, self.conv_weight.weight, conv_bias))  # (B, L, C)
        new_conv = next_conv_state(xBC, conv_state, valid.long().sum(-1))  # (B, C, K-1)

        xs, Bm, Cm = xBC_conv.split([self.Il, self.Gl * self.N, self.Gl * self.N], -1)
        xs = xs.reshape(Bsz, L, self.Hl, self.P)
        Bm = Bm.reshape(Bsz, L, self.Gl, self.N).repeat_interleave(self.Hl // self.Gl, 2)  # (B, L, Hl, N)
        Cm = Cm.reshape(Bsz, L, self.Gl, self.N).repeat_interleave(self.Hl // self.Gl, 2)
        dt = F.softplus(dt.float() + self.dt_bias.weight.float())  # (B, L, Hl)
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        dt = dt * valid[..., None].float()  # padding: no decay, no input
        A = -torch.exp(self.A_log.weight.float())  # (Hl,)

        if is_prefill:
            y, ssm = ssd_chunked(xs, dt, A, Bm, Cm, self.chunk)  # (B, L, H, P), (B, H, P, N)
        else:
            y, ssm = ssd_step(read_slots(ssm_all, seq_ids), xs[:, 0], dt[:, 0, :, None], A[:, None, None],
                              Bm[:, 0], Cm[:, 0])  # per-head dt and A
            y = y[:, None]  # (B, 1, H, P)
        y = y + self.D.weight.float()[:, None] * xs.float()
        y = self.gated_norm(y.reshape(Bsz, L, self.Il).to(x.dtype), z)
        return self.out_proj(y), [write_slots(conv_all, seq_ids, new_conv), write_slots(ssm_all, seq_ids, ssm)]


class GraniteAttention(Mixer):
    """GQA attention; NoPE for Granite 4.0-H (RoPE when position_embedding_type == "rope")."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, tp = config.hidden_size, tp_degree(config)
        self.hd = D // config.num_attention_heads
        self.Hq = per_rank(config.num_attention_heads, tp, "num_attention_heads")  # this rank's heads
        self.Hkv = heads_per_rank(config.num_key_value_heads, tp, "num_key_value_heads")
        self.scale = config.attention_multiplier
        self.rope_theta = (float(getattr(config, "rope_theta", None) or 10000.0)
                           if getattr(config, "position_embedding_type", "nope") == "rope" else None)
        bias = config.attention_bias
        self.q_proj = ColumnParallelLinear(D, tp * self.Hq * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.k_proj = ColumnParallelLinear(D, tp * self.Hkv * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.v_proj = ColumnParallelLinear(D, tp * self.Hkv * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.o_proj = RowParallelLinear(tp * self.Hq * self.hd, D, bias=bias, input_is_parallel=True, dtype=dtype)

    def state_shapes(self, slots: int, seq_len: int):
        return kv_cache_shapes(slots, self.Hkv, seq_len, self.hd)

    def forward(self, x, step: Step, states):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.Hq, self.hd).transpose(1, 2)  # (B, Hq, L, hd)
        k = self.k_proj(x).view(B, L, self.Hkv, self.hd).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(x).view(B, L, self.Hkv, self.hd).transpose(1, 2)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(step.position_ids, self.hd, self.rope_theta, q.dtype)
            q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        out, k_cache, v_cache = attention_with_cache(q, k, v, *states, step.valid, step.position_ids,
                                                     step.seq_ids, self.scale, step.is_prefill)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), [k_cache, v_cache]


class GraniteMoE(nn.Module):
    """Top-k routed experts (softmax over the chosen k) plus an always-on shared SwiGLU MLP."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, E, I = config.hidden_size, config.num_local_experts, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.router = nn.Parameter(torch.zeros(E, D, dtype=dtype))  # (E, D), replicated
        self.experts = RoutedExperts(config, E, D, I, self.top_k, "silu", dtype)
        self.shared = GluMLP(config, D, config.shared_intermediate_size, "silu", dtype)

    def forward(self, x):
        B, L, D = x.shape
        t = x.reshape(-1, D)  # (T, D)
        affinities, index = top_k_affinities(F.linear(t, self.router), self.top_k)  # (T, E), (T, k)
        return (self.experts(t, affinities, index, L) + self.shared(t)).view(B, L, D)


class GraniteDecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.mixer = Mamba2Mixer(config, dtype) if layer_type != "full_attention" else GraniteAttention(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = GraniteMoE(config, dtype)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, h, step: Step, states):
        x, states = self.mixer(self.input_layernorm(h), step, states)
        h = h + self.residual_multiplier * x
        h = h + self.residual_multiplier * self.moe(self.post_attention_layernorm(h))
        return h, states


class NeuronGraniteMoeHybridModel(HybridModelMixin, base.NeuronBaseModel):
    def init_model(self, config) -> None:
        dtype = config.neuron_config.torch_dtype
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size,
                                              getattr(config, "pad_token_id", None), dtype=dtype)
        self.layers = nn.ModuleList(GraniteDecoderLayer(config, t, dtype) for t in config.layer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                            gather_output=not self.on_device_sampling, dtype=dtype)
        self.embedding_multiplier = config.embedding_multiplier
        self.logits_scaling = config.logits_scaling
        slots, S = self.max_batch_size, config.neuron_config.seq_len
        self.init_states([layer.mixer.state_shapes(slots, S) for layer in self.layers], dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids) * self.embedding_multiplier

    def logits(self, h):
        return self.lm_head(self.norm(h)).float() / self.logits_scaling


class NeuronGraniteMoeHybridForCausalLM(PortForCausalLM):
    _model_cls = NeuronGraniteMoeHybridModel

    @classmethod
    def get_config_cls(cls):
        return GraniteMoeHybridInferenceConfig

    @staticmethod
    def convert_hf_to_neuron_state_dict(state_dict: dict, config) -> dict:
        """HF Granite checkpoint keys (``model.`` prefix already stripped) -> this port's keys, every
        tensor-parallel tensor laid out rank-major for ``tp_degree`` (see ``tp.py``)."""
        tp = tp_degree(config)
        H, P, G, N = config.mamba_n_heads, config.mamba_d_head, config.mamba_n_groups, config.mamba_d_state
        I = H * P
        hd = config.hidden_size // config.num_attention_heads
        sd, out = dict(state_dict), {}

        def mamba_channels(t, with_z_dt: bool):
            """Split [z?, x, B, C, dt?] rows and lay them out rank-major per head / group."""
            sizes = ([I] if with_z_dt else []) + [I, G * N, G * N] + ([H] if with_z_dt else [])
            parts = list(t.split(sizes, 0))
            heads = [(H, P, "mamba_n_heads")] * (1 if with_z_dt else 0) + [
                (H, P, "mamba_n_heads"), (G, N, "mamba_n_groups"), (G, N, "mamba_n_groups")] + \
                [(H, 1, "mamba_n_heads")] * (1 if with_z_dt else 0)
            return shard_fused([(w, n, d, name) for w, (n, d, name) in zip(parts, heads)], tp)

        for i, kind in enumerate(config.layer_types):
            p = f"layers.{i}."
            if kind != "full_attention":
                m, o = p + "mamba.", p + "mixer."
                for b in ("weight", "bias"):
                    if m + "in_proj." + b in sd:
                        out[o + "in_proj." + b] = mamba_channels(sd.pop(m + "in_proj." + b), True)
                out[o + "conv_weight.weight"] = mamba_channels(sd.pop(m + "conv1d.weight")[:, 0], False)  # (C, K)
                if m + "conv1d.bias" in sd:
                    out[o + "conv_bias.weight"] = mamba_channels(sd.pop(m + "conv1d.bias"), False)
                for name in ("dt_bias", "A_log", "D"):
                    out[o + name + ".weight"] = shard_heads(sd.pop(m + name), H, 1, tp, "mamba_n_heads")
                out[o + "norm_weight.weight"] = shard_heads(sd.pop(m + "norm.weight"), H, P, tp, "mamba_n_heads")
                for b in ("weight", "bias"):
                    if m + "out_proj." + b in sd:
                        out[o + "out_proj." + b] = sd.pop(m + "out_proj." + b)
            else:
                a, o = p + "self_attn.", p + "mixer."
                for proj, n, name in (("q_proj", config.num_attention_heads, "num_attention_heads"),
                                      ("k_proj", config.num_key_value_heads, "num_key_value_heads"),
                                      ("v_proj", config.num_key_value_heads, "num_key_value_heads")):
                    for b in ("weight", "bias"):
                        if a + f"{proj}.{b}" in sd:
                            out[o + f"{proj}.{b}"] = shard_heads(sd.pop(a + f"{proj}.{b}"), n, hd, tp, name)
                for b in ("weight", "bias"):
                    if a + "o_proj." + b in sd:
                        out[o + "o_proj." + b] = sd.pop(a + "o_proj." + b)
            moe = p + "block_sparse_moe."
            out[p + "moe.router"] = sd.pop(moe + "router.layer.weight")
            gate_up, down = from_fused_hf(sd.pop(moe + "input_linear.weight"), sd.pop(moe + "output_linear.weight"))
            out[p + "moe.experts.experts.mlp_op.gate_up_proj.weight"] = gate_up  # (E, D, 2I)
            out[p + "moe.experts.experts.mlp_op.down_proj.weight"] = down  # (E, I, D)
            g, u = sd.pop(p + "shared_mlp.input_linear.weight").chunk(2, 0)
            out[p + "moe.shared.gate_up.weight"] = shard_glu(g, u, tp)
            out[p + "moe.shared.down.weight"] = sd.pop(p + "shared_mlp.output_linear.weight")
        out.update(sd)  # norms, embeddings, lm_head
        return out
