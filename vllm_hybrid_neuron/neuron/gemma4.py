"""NxDI port of Gemma 4 (text): sliding + global attention, dense MLP beside a routed MoE block.

Per layer type:
  sliding layers: head_dim ``head_dim``, ``num_key_value_heads`` KV heads, full RoPE (theta 1e4),
                  keys within ``sliding_window`` positions only
  global layers:  head_dim ``global_head_dim``, ``num_global_key_value_heads`` KV heads,
                  proportional partial RoPE, and with ``attention_k_eq_v`` no v_proj: V is the
                  raw k_proj output (K gets k_norm + RoPE, V the scale-free norm)
Attention scaling is 1.0 (softmax(q.k), no 1/sqrt(d)): the queries are RMS-normalised, so a
scale folded into q_proj would be cancelled by q_norm. ``attention_with_cache`` takes the
scale directly, so nothing is folded here; a kernel that hard-codes 1/sqrt(d) would need
q_norm.weight * sqrt(d) instead.

State per slot, aliased like a KV cache: k_cache, v_cache (slots, Hkv_layer, S, hd_layer) per
layer; sliding layers keep the full S positions and mask to the window.
"""

from __future__ import annotations

from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F

from vllm_hybrid_neuron.neuron import base
from vllm_hybrid_neuron.neuron.common import RMSNorm, apply_partial_rope, attention_with_cache
from vllm_hybrid_neuron.neuron.hybrid import (
    HybridInferenceConfig, HybridModelMixin, PortForCausalLM, check_hybrid_neuron_config, flatten_text_config,
)
from vllm_hybrid_neuron.neuron.layers import ColumnParallelLinear, ParallelEmbedding, RowParallelLinear
from vllm_hybrid_neuron.neuron.mixer import Mixer, Step, kv_cache_shapes
from vllm_hybrid_neuron.neuron.moe import RoutedExperts, from_fused_hf, top_k_affinities
from vllm_hybrid_neuron.neuron.tp import heads_per_rank, per_rank, shard_heads, tp_degree

# Parts of a Gemma4ForConditionalGeneration checkpoint ("model." already stripped) that are not text.
_NON_TEXT_PREFIXES = ("vision_tower.", "audio_tower.", "embed_vision.", "embed_audio.")


def _as_dict(x) -> dict:
    return x if isinstance(x, dict) else vars(x)


def _reading_per_layer_attributes(load_config):
    """Wrap a load_config hook so it can read a heterogeneous (per-layer) transformers config.

    NxDI's ``load_pretrained_config`` does ``getattr(hf_config, key)`` for every ``to_dict()``
    key; transformers 5 raises ``AmbiguousGlobalPerLayerAttributeError`` on Gemma 4's per-layer
    keys (head_dim, num_key_value_heads) unless ``allow_global_per_layer_attribute_access`` is
    set. The global values are what ``to_dict()`` holds anyway; the per-layer ones come from
    ``per_layer_config`` (read in add_derived_config). Only the model-path form is handled;
    an ``hf_config`` passed in must have the flag set by the caller.
    """
    from transformers import AutoConfig

    original = AutoConfig.from_pretrained

    def from_pretrained(*args, **kwargs):
        config = original(*args, **kwargs)
        if getattr(config, "is_heterogeneous", False):
            config.allow_global_per_layer_attribute_access = True
        return config

    def wrapped(config) -> None:
        with mock.patch.object(AutoConfig, "from_pretrained", from_pretrained):
            load_config(config)

    return wrapped


class Gemma4InferenceConfig(HybridInferenceConfig):
    def __init__(self, neuron_config, fused_spec_config=None, load_config=None, metadata=None,
                 **kwargs) -> None:
        if load_config is not None:
            load_config = _reading_per_layer_attributes(load_config)
        super().__init__(neuron_config, fused_spec_config, load_config, metadata, **kwargs)

    def add_derived_config(self) -> None:
        super().add_derived_config()
        flatten_text_config(self)  # Gemma4ForConditionalGeneration nests the text model
        # Per-layer head dim / KV heads: transformers serialises them as per_layer_config
        # {"<layer>": {"head_dim": ..., "num_key_value_heads": ...}}; older configs carry
        # global_head_dim / num_global_key_value_heads instead.
        overrides = {int(i): _as_dict(v) for i, v in _as_dict(getattr(self, "per_layer_config", None) or {}).items()}
        k_eq_v = bool(getattr(self, "attention_k_eq_v", False))
        legacy = {"head_dim": getattr(self, "global_head_dim", None),
                  "num_key_value_heads": getattr(self, "num_global_key_value_heads", None) if k_eq_v else None}
        self.layer_head_dims, self.layer_kv_heads = [], []
        for i, kind in enumerate(self.layer_types):
            o = overrides.get(i) or ({k: v for k, v in legacy.items() if v} if kind == "full_attention" else {})
            self.layer_head_dims.append(int(o.get("head_dim", self.head_dim)))
            self.layer_kv_heads.append(int(o.get("num_key_value_heads", self.num_key_value_heads)))
        self._check_gemma4_features()
        check_hybrid_neuron_config(self)

    def _check_gemma4_features(self) -> None:
        """Reject Gemma 4 variants this port does not implement (instead of computing garbage)."""
        rope = _as_dict(self.rope_parameters)
        unsupported = {
            "per-layer input embeddings (hidden_size_per_layer_input > 0)":
                bool(getattr(self, "hidden_size_per_layer_input", 0)),
            "KV-shared layers (num_kv_shared_layers > 0)": bool(getattr(self, "num_kv_shared_layers", 0)),
            "bidirectional attention": getattr(self, "use_bidirectional_attention", None) == "all",
            "layer types other than sliding_attention / full_attention":
                not set(self.layer_types) <= {"sliding_attention", "full_attention"},
            "RoPE types other than default / proportional":
                any(_as_dict(rope[t]).get("rope_type", "default") not in ("default", "proportional")
                    for t in set(self.layer_types)),
        }
        bad = [what for what, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"{type(self).__name__}: not supported by the Gemma 4 port: {'; '.join(bad)}")

    def get_required_attributes(self) -> list[str]:
        return ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rms_norm_eps", "layer_types", "sliding_window", "rope_parameters",
                "intermediate_size", "hidden_activation", "final_logit_softcapping", "enable_moe_block",
                "layer_head_dims", "layer_kv_heads"]


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in fp32, no weight (Gemma 4's V norm and router norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies; "proportional": only the first partial*head_dim/2
    pairs rotate, with exponents over the *whole* head_dim, the rest get frequency 0.

    Pairs are (i, i + head_dim/2) (rotate-half over the full head), so a global layer with
    partial 0.25 rotates channels [0, hd/8) and [hd/2, hd/2 + hd/8), not the first quarter.
    """
    theta = float(rope["rope_theta"])
    if rope.get("rope_type", "default") == "default":
        return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = int(float(rope.get("partial_rotary_factor", 1.0)) * head_dim // 2)
    inv = 1.0 / theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.float32) / head_dim)  # (angles,)
    return F.pad(inv, (0, head_dim // 2 - angles)) / float(rope.get("factor", 1.0))


class Gemma4Attention(Mixer):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        D, kind, tp = config.hidden_size, config.layer_types[layer_idx], tp_degree(config)
        self.Hq = per_rank(config.num_attention_heads, tp, "num_attention_heads")  # this rank's heads
        self.Hkv = heads_per_rank(config.layer_kv_heads[layer_idx], tp, f"KV heads of layer {layer_idx} ({kind})")
        self.hd = config.layer_head_dims[layer_idx]
        self.window = config.sliding_window if kind == "sliding_attention" else None
        self.k_eq_v = bool(getattr(config, "attention_k_eq_v", False)) and kind != "sliding_attention"
        self.eps = config.rms_norm_eps
        bias = getattr(config, "attention_bias", False)
        self.q_proj = ColumnParallelLinear(D, tp * self.Hq * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.k_proj = ColumnParallelLinear(D, tp * self.Hkv * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.v_proj = None if self.k_eq_v else \
            ColumnParallelLinear(D, tp * self.Hkv * self.hd, bias=bias, gather_output=False, dtype=dtype)
        self.o_proj = RowParallelLinear(tp * self.Hq * self.hd, D, bias=bias, input_is_parallel=True, dtype=dtype)
        self.q_norm = RMSNorm(self.hd, self.eps)
        self.k_norm = RMSNorm(self.hd, self.eps)
        rope = _as_dict(_as_dict(config.rope_parameters)[kind])
        self.register_buffer("inv_freq", rope_inv_freq(self.hd, rope), persistent=False)  # (hd/2,)

    def state_shapes(self, slots: int, seq_len: int):
        return kv_cache_shapes(slots, self.Hkv, seq_len, self.hd)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids: (B, L) -> cos, sin: (B, 1, L, hd)."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # (B, L, hd/2)
        emb = torch.cat([freqs, freqs], -1)[:, None]  # (B, 1, L, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, x, step: Step, states):
        """x: (B, L, D); states: [k_cache, v_cache] (slots, Hkv, S, hd)."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.Hq, self.hd)).transpose(1, 2)  # (B, Hq, L, hd)
        k_raw = self.k_proj(x).view(B, L, self.Hkv, self.hd)  # (B, L, Hkv, hd)
        v_raw = k_raw if self.k_eq_v else self.v_proj(x).view(B, L, self.Hkv, self.hd)
        k = self.k_norm(k_raw).transpose(1, 2)  # (B, Hkv, L, hd)
        v = rms_normalize(v_raw, self.eps).transpose(1, 2)  # scale-free V norm
        cos, sin = self.rope(step.position_ids, q.dtype)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        out, k_cache, v_cache = attention_with_cache(q, k, v, *states, step.valid, step.position_ids, step.seq_ids,
                                                     1.0, step.is_prefill, sliding_window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1)), [k_cache, v_cache]


def _act(name: str):
    return {"gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh"), "gelu": F.gelu,
            "silu": F.silu}[name]


class Gemma4MLP(nn.Module):
    """down(act(gate x) * up x)."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, I = config.hidden_size, config.intermediate_size
        per_rank(I, tp_degree(config), "intermediate_size")
        self.act = _act(config.hidden_activation)
        self.gate_proj = ColumnParallelLinear(D, I, bias=False, gather_output=False, dtype=dtype)
        self.up_proj = ColumnParallelLinear(D, I, bias=False, gather_output=False, dtype=dtype)
        self.down_proj = RowParallelLinear(I, D, bias=False, input_is_parallel=True, dtype=dtype)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Gemma4MoE(nn.Module):
    """Routed experts. The router reads the block's *input* h (norm, * scale / sqrt(D)); the experts
    read their own pre-norm of h. Top-k of softmax, renormalised, times a per-expert scale."""

    def __init__(self, config, dtype: torch.dtype) -> None:
        super().__init__()
        D, E, I = config.hidden_size, config.num_experts, config.moe_intermediate_size
        self.top_k, self.eps = config.top_k_experts, config.rms_norm_eps
        self.router = nn.Parameter(torch.zeros(E, D, dtype=dtype))  # (E, D), replicated
        # HF router.scale / router.per_expert_scale. Not named "*scale": NxDI's load_module puts every
        # parameter whose name ends in "scale" back to fp32 after its bf16 cast (for quantisation
        # scales), and this one would then meet bf16 weights in the router's F.linear.
        self.router_gain = nn.Parameter(torch.ones(D, dtype=dtype))  # (D,)
        self.expert_gain = nn.Parameter(torch.ones(E, dtype=dtype))  # (E,)
        self.experts = RoutedExperts(config, E, D, I, self.top_k, config.hidden_activation, dtype)

    def forward(self, h, x):
        """h: (B, L, D) block input (routing); x: (B, L, D) normed expert input."""
        B, L, D = h.shape
        r = rms_normalize(h.reshape(-1, D), self.eps) * self.router_gain * D ** -0.5  # (T, D)
        affinities, index = top_k_affinities(F.linear(r, self.router), self.top_k, self.expert_gain)
        return self.experts(x.reshape(-1, D), affinities, index, L).view(B, L, D)


class Gemma4DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Gemma4Attention(config, layer_idx, dtype)
        self.mlp = Gemma4MLP(config, dtype)
        self.moe = Gemma4MoE(config, dtype) if config.enable_moe_block else None
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
        if self.moe is not None:
            norms += ["post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"]
        for name in norms:
            setattr(self, name, RMSNorm(D, eps))
        self.layer_scalar = nn.Parameter(torch.ones(1, dtype=dtype))

    def forward(self, h, step: Step, states):
        a, states = self.self_attn(self.input_layernorm(h), step, states)
        h = h + self.post_attention_layernorm(a)
        f = self.mlp(self.pre_feedforward_layernorm(h))
        if self.moe is not None:  # dense MLP and routed experts side by side, each post-normed
            e = self.moe(h, self.pre_feedforward_layernorm_2(h))
            f = self.post_feedforward_layernorm_1(f) + self.post_feedforward_layernorm_2(e)
        h = h + self.post_feedforward_layernorm(f)
        return h * self.layer_scalar, states


class NeuronGemma4Model(HybridModelMixin, base.NeuronBaseModel):
    def init_model(self, config) -> None:
        dtype = config.neuron_config.torch_dtype
        self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size,
                                              getattr(config, "pad_token_id", None), dtype=dtype)
        self.layers = nn.ModuleList(Gemma4DecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                            gather_output=not self.on_device_sampling, dtype=dtype)
        self.embed_scale = config.hidden_size ** 0.5
        self.softcap = config.final_logit_softcapping
        slots, S = self.max_batch_size, config.neuron_config.seq_len
        self.init_states([layer.self_attn.state_shapes(slots, S) for layer in self.layers], dtype)

    def embed(self, input_ids):
        h = self.embed_tokens(input_ids)  # (B, L, D)
        return h * torch.tensor(self.embed_scale, dtype=h.dtype)  # sqrt(D), rounded to the model dtype

    def logits(self, h):
        logits = self.lm_head(self.norm(h)).float()  # (B, L, V)
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits


class NeuronGemma4ForCausalLM(PortForCausalLM):
    _model_cls = NeuronGemma4Model

    @classmethod
    def get_config_cls(cls):
        return Gemma4InferenceConfig

    @staticmethod
    def convert_hf_to_neuron_state_dict(state_dict: dict, config) -> dict:
        """HF keys ("model." stripped; ConditionalGeneration's "language_model." too, vision and
        audio towers dropped) -> port keys. Norms, o_proj and the dense MLP keep their HF names;
        q/k/v are laid out per rank for ``tp_degree`` (KV heads replicated when fewer than ranks)."""
        tp = tp_degree(config)
        sd = {k.replace("language_model.", "", 1): v for k, v in state_dict.items()
              if not k.startswith(_NON_TEXT_PREFIXES)}
        out = {}
        for i in range(config.num_hidden_layers):
            p, hd, hkv = f"layers.{i}.", config.layer_head_dims[i], config.layer_kv_heads[i]
            for proj, n in (("q_proj", config.num_attention_heads), ("k_proj", hkv), ("v_proj", hkv)):
                for b in ("weight", "bias"):
                    key = p + f"self_attn.{proj}.{b}"
                    if key in sd:
                        out[key] = shard_heads(sd.pop(key), n, hd, tp, f"{proj} heads of layer {i}")
            if p + "router.proj.weight" in sd:
                out[p + "moe.router"] = sd.pop(p + "router.proj.weight")
                out[p + "moe.router_gain"] = sd.pop(p + "router.scale")
                out[p + "moe.expert_gain"] = sd.pop(p + "router.per_expert_scale")
                gate_up, down = from_fused_hf(sd.pop(p + "experts.gate_up_proj"), sd.pop(p + "experts.down_proj"))
                out[p + "moe.experts.experts.mlp_op.gate_up_proj.weight"] = gate_up  # (E, D, 2I)
                out[p + "moe.experts.experts.mlp_op.down_proj.weight"] = down  # (E, I, D)
        out.update(sd)
        return out
