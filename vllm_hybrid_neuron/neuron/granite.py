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
    RMSNorm, apply_partial_rope, attention_with_cache, read_slots,
    rms_norm_gated, rope_cos_sin, routed_experts, write_slots,
)
from vllm_hybrid_neuron.neuron.hybrid import HybridModelMixin, PortForCausalLM, check_hybrid_neuron_config
from vllm_hybrid_neuron.neuron.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from vllm_hybrid_neuron.neuron.ssd import causal_conv, next_conv_state, ssd_chunked, ssd_step


class GraniteMoeHybridInferenceConfig(base.InferenceConfig):
    def add_derived_config(self) -> None:
        super().add_derived_config()
        self.layer_types = list(getattr(self, "layer_types", None) or self.layers_block_type)
        check_hybrid_neuron_config(self)

    def get_required_attributes(self) -> list[str]:
        return ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "rms_norm_eps", "layer_types", "mamba_n_heads", "mamba_d_head",
                "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand",
                "num_local_experts", "num_experts_per_tok", "intermediate_size",
                "shared_intermediate_size", "embedding_multiplier", "logits_scaling",
                "residual_multiplier", "attention_multiplier"]

    @classmethod
    def get_neuron_config_cls(cls):
        return base.MoENeuronConfig


class Mamba2Mixer(nn.Module):
    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D = config.hidden_size
        self.H, self.P = config.mamba_n_heads, config.mamba_d_head
        self.G, self.N, self.K = config.mamba_n_groups, config.mamba_d_state, config.mamba_d_conv
        self.I = int(config.mamba_expand * D)
        self.conv_dim = self.I + 2 * self.G * self.N
        self.eps = config.rms_norm_eps
        # SSD chunk: prompts up to this length use one L x L log-space scan; longer ones are
        # chunked so the compiled L x L intermediates stay small (set ssd_chunk_size to override).
        self.chunk = int(getattr(config, "ssd_chunk_size", None) or min(config.mamba_chunk_size, 128))
        lo, hi = (float(v) for v in getattr(config, "time_step_limit", (0.0, float("inf"))))
        self.dt_limit = (lo, hi)
        self.in_proj = ColumnParallelLinear(D, self.I + self.conv_dim + self.H, bias=config.mamba_proj_bias,
                                            gather_output=True, dtype=dtype)
        self.conv_weight = nn.Parameter(torch.zeros(self.conv_dim, self.K, dtype=dtype))  # (C, K)
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim, dtype=dtype)) if config.mamba_conv_bias else None
        self.dt_bias = nn.Parameter(torch.zeros(self.H, dtype=dtype))
        self.A_log = nn.Parameter(torch.zeros(self.H, dtype=dtype))
        self.D = nn.Parameter(torch.zeros(self.H, dtype=dtype))
        self.norm_weight = nn.Parameter(torch.ones(self.I, dtype=dtype))
        self.out_proj = RowParallelLinear(self.I, D, bias=config.mamba_proj_bias, input_is_parallel=False,
                                          dtype=dtype)

    def state_shapes(self, slots: int):
        return [((slots, self.conv_dim, self.K - 1), None, "conv"), ((slots, self.H, self.P, self.N), torch.float32, "ssm")]

    def forward(self, x, valid, seq_ids, states, is_prefill):
        """x: (B, L, D); valid: (B, L) 1 on real tokens; states: [conv (slots,C,K-1), ssm (slots,H,P,N)]."""
        conv_all, ssm_all = states
        Bsz, L, _ = x.shape
        z, xBC, dt = self.in_proj(x).split([self.I, self.conv_dim, self.H], -1)
        conv_state = read_slots(conv_all, seq_ids)  # (B, C, K-1)
        if is_prefill:
            conv_state = torch.zeros_like(conv_state)  # a prefill starts a fresh sequence
        xBC_conv = F.silu(causal_conv(xBC, conv_state, self.conv_weight, self.conv_bias))  # (B, L, C)
        new_conv = next_conv_state(xBC, conv_state, valid.long().sum(-1))  # (B, C, K-1)

        xs, Bm, Cm = xBC_conv.split([self.I, self.G * self.N, self.G * self.N], -1)
        xs = xs.reshape(Bsz, L, self.H, self.P)
        Bm = Bm.reshape(Bsz, L, self.G, self.N).repeat_interleave(self.H // self.G, 2)  # (B, L, H, N)
        Cm = Cm.reshape(Bsz, L, self.G, self.N).repeat_interleave(self.H // self.G, 2)
        dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, L, H)
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        dt = dt * valid[..., None].float()  # padding: no decay, no input
        A = -torch.exp(self.A_log.float())  # (H,)

        if is_prefill:
            y, ssm = ssd_chunked(xs, dt, A, Bm, Cm, self.chunk)  # (B, L, H, P), (B, H, P, N)
        else:
            y, ssm = ssd_step(read_slots(ssm_all, seq_ids), xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0])
            y = y[:, None]  # (B, 1, H, P)
        y = y + self.D.float()[:, None] * xs.float()
        y = rms_norm_gated(y.reshape(Bsz, L, self.I).to(x.dtype), z, self.norm_weight, self.eps)
        return self.out_proj(y), [write_slots(conv_all, seq_ids, new_conv), write_slots(ssm_all, seq_ids, ssm)]


class GraniteAttention(nn.Module):
    """GQA attention; NoPE for Granite 4.0-H (RoPE when position_embedding_type == "rope")."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D = config.hidden_size
        self.Hq, self.Hkv = config.num_attention_heads, config.num_key_value_heads
        self.hd = D // self.Hq
        self.scale = config.attention_multiplier
        self.rope_theta = (float(getattr(config, "rope_theta", None) or 10000.0)
                           if getattr(config, "position_embedding_type", "nope") == "rope" else None)
        bias = config.attention_bias
        self.q_proj = ColumnParallelLinear(D, self.Hq * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.k_proj = ColumnParallelLinear(D, self.Hkv * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.v_proj = ColumnParallelLinear(D, self.Hkv * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.o_proj = RowParallelLinear(self.Hq * self.hd, D, bias=bias, input_is_parallel=True, dtype=dtype)

    def state_shapes(self, slots: int, seq_len: int):
        shape = (slots, self.Hkv, seq_len, self.hd)
        return [(shape, None, "k"), (shape, None, "v")]

    def forward(self, x, valid, position_ids, seq_ids, states, is_prefill):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.Hq, self.hd).transpose(1, 2)  # (B, Hq, L, hd)
        k = self.k_proj(x).view(B, L, self.Hkv, self.hd).transpose(1, 2)  # (B, Hkv, L, hd)
        v = self.v_proj(x).view(B, L, self.Hkv, self.hd).transpose(1, 2)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(position_ids, self.hd, self.rope_theta, q.dtype)
            q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        out, k_cache, v_cache = attention_with_cache(q, k, v, *states, valid, position_ids, seq_ids,
                                                     self.scale, is_prefill)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), [k_cache, v_cache]


class GraniteMoE(nn.Module):
    """Top-k routed experts (softmax over the chosen k) plus an always-on shared MLP."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, E, I = config.hidden_size, config.num_local_experts, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.router = nn.Parameter(torch.zeros(E, D, dtype=dtype))  # (E, D)
        self.gate_up = nn.Parameter(torch.zeros(E, 2 * I, D, dtype=dtype))  # (E, 2I, D)
        self.down = nn.Parameter(torch.zeros(E, D, I, dtype=dtype))  # (E, D, I)
        Is = config.shared_intermediate_size
        self.shared_gate_up = ColumnParallelLinear(D, 2 * Is, bias=False, gather_output=True, dtype=dtype)
        self.shared_down = RowParallelLinear(Is, D, bias=False, input_is_parallel=False, dtype=dtype)

    def forward(self, x):
        B, L, D = x.shape
        t = x.reshape(-1, D)  # (T, D)
        routed = routed_experts(t, F.linear(t, self.router), self.gate_up, self.down, self.top_k,
                                normalize=True)
        g, u = self.shared_gate_up(t).chunk(2, -1)
        shared = self.shared_down(F.silu(g) * u)
        return (routed + shared).view(B, L, D)


class GraniteDecoderLayer(nn.Module):
    def __init__(self, config, layer_type: str, dtype: torch.dtype) -> None:
        super().__init__()
        self.is_mamba = layer_type != "full_attention"
        self.mixer = Mamba2Mixer(config, dtype) if self.is_mamba else GraniteAttention(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.moe = GraniteMoE(config, dtype)
        self.residual_multiplier = config.residual_multiplier

    def forward(self, h, valid, position_ids, seq_ids, states, is_prefill):
        x = self.input_layernorm(h)
        if self.is_mamba:
            x, states = self.mixer(x, valid, seq_ids, states, is_prefill)
        else:
            x, states = self.mixer(x, valid, position_ids, seq_ids, states, is_prefill)
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
        self.init_states([
            layer.mixer.state_shapes(slots) if layer.is_mamba else layer.mixer.state_shapes(slots, S)
            for layer in self.layers], dtype)

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
        """HF Granite checkpoint keys (``model.`` prefix already stripped) -> this port's keys."""
        out = {}
        renames = {
            "mamba.in_proj.": "mixer.in_proj.", "mamba.out_proj.": "mixer.out_proj.",
            "mamba.dt_bias": "mixer.dt_bias", "mamba.A_log": "mixer.A_log", "mamba.D": "mixer.D",
            "mamba.norm.weight": "mixer.norm_weight", "mamba.conv1d.bias": "mixer.conv_bias",
            "self_attn.": "mixer.",
            "block_sparse_moe.router.layer.weight": "moe.router",
            "block_sparse_moe.input_linear.weight": "moe.gate_up",
            "block_sparse_moe.output_linear.weight": "moe.down",
            "shared_mlp.input_linear.": "moe.shared_gate_up.",
            "shared_mlp.output_linear.": "moe.shared_down.",
        }
        for key, value in state_dict.items():
            new = key
            if key.endswith("mamba.conv1d.weight"):
                new, value = key.replace("mamba.conv1d.weight", "mixer.conv_weight"), value[:, 0]  # (C, K)
            else:
                for old, rep in renames.items():
                    if old in key:
                        new = key.replace(old, rep)
                        break
            out[new] = value
        return out
