"""What the three hybrid ports share: state tensors beside the KV cache, and the traced forward.

NxDI traces ``NeuronBaseModel.forward`` once for prefill (CTE) and once for decode
(TKG). Its outputs are ``[logits or tokens, *new_states]``; with ``kv_mgr`` set to
None, NxDI's DecoderModelInstance aliases ``self.past_key_values[i]`` to output
``1 + i``, so recurrent states are carried between calls in device memory exactly
like a KV cache. On CPU the runner (``cpu_runner.py``) copies them back instead.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_hybrid_neuron.neuron import base
from vllm_hybrid_neuron.neuron.common import last_valid_index
from vllm_hybrid_neuron.neuron.mixer import StateSpec, Step
from vllm_hybrid_neuron.neuron.tp import require_nxd_for_tp


def check_hybrid_neuron_config(config) -> None:
    """Reject NxDI features the hybrid ports do not implement (instead of computing garbage)."""
    nc = config.neuron_config
    require_nxd_for_tp(nc.tp_degree, type(config).__name__)
    unsupported = {
        "speculation (recurrent state cannot roll back rejected tokens)":
            nc.speculation_length > 0 or nc.enable_fused_speculation,
        "block KV layout / prefix caching / chunked prefill":
            nc.is_block_kv_layout or nc.is_prefix_caching or nc.is_chunked_prefill,
        "left padding": nc.padding_side != "right",
        "sequence parallel": nc.sequence_parallel_enabled,
        # outputs NxDI would expect between the logits and the states (alias offsets the ports do not emit)
        "tensor capture (tensor_capture_config)": getattr(nc, "tensor_capture_config", None) is not None,
        "LoRA (lora_config)": getattr(nc, "lora_config", None) is not None,
        "output_logits without on-device sampling (logits are already the first output)":
            bool(getattr(nc, "output_logits", False)) and nc.on_device_sampling_config is None,
    }
    bad = [what for what, on in unsupported.items() if on]
    if bad:
        raise ValueError(f"{type(config).__name__}: not supported by the hybrid ports: {'; '.join(bad)}")
    # NxDI pads a partial batch with the slots *not* in it (model_wrapper._forward_with_pad);
    # without the mask those rows would run a step on, and overwrite, live sequences' states.
    # With it they carry seq_id -1, which the ports send to the spare state row.
    nc.apply_seq_ids_mask = True


class HybridInferenceConfig(base.InferenceConfig):
    """What the three ports' InferenceConfigs share: the MoE neuron config (NxDI builds it from a
    saved config with this class; the application class hands out the same one)."""

    @classmethod
    def get_neuron_config_cls(cls):
        return base.MoENeuronConfig


def flatten_text_config(config) -> None:
    """ConditionalGeneration checkpoints nest the text model under text_config: lift it up."""
    text = getattr(config, "text_config", None)
    if text is None:
        return
    items = vars(text) if not isinstance(text, dict) else text
    for key, value in items.items():
        if key not in ("neuron_config", "architectures"):
            setattr(config, key, value)


class HybridModelMixin(nn.Module):
    """Mixed into a NeuronBaseModel subclass that defines embed(), layers, logits(); each layer is
    called as ``layer(h, step, states)`` (``mixer.py``)."""

    def setup_attr_for_model(self, config) -> None:
        nc = config.neuron_config
        self.on_device_sampling = nc.on_device_sampling_config is not None
        self.output_logits = bool(getattr(nc, "output_logits", False))
        self.tp_degree = nc.tp_degree
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.max_batch_size = nc.max_batch_size
        self.buckets = [nc.seq_len]

    def init_states(self, per_layer: list[list[StateSpec]], dtype: torch.dtype) -> None:
        """Allocate every layer's state tensors, zeroed, as non-trainable parameters.

        per_layer[i]: layer i's ``mixer.state_shapes(slots, seq_len)``: (shape, dtype or None for
        the model dtype, kind) per state tensor; kind is "k"/"v" for KV caches (slots, Hkv, S, D),
        else a recurrent state's name.
        Each tensor gets one spare row after the slots: padded batch rows write there
        (``common.slot_rows``), so they never change a real sequence's state.
        """
        tensors, self.state_slices, self.state_kinds, self.pinned_state_dtypes = [], [], [], []
        for shapes in per_layer:
            start = len(tensors)
            for shape, sdtype, kind in shapes:
                shape = (shape[0] + 1, *shape[1:])  # slots + the spare row
                tensors.append(nn.Parameter(torch.zeros(shape, dtype=sdtype or dtype), requires_grad=False))
                self.state_kinds.append(kind)
                self.pinned_state_dtypes.append(sdtype)
            self.state_slices.append((start, len(tensors)))
        self.past_key_values = nn.ParameterList(tensors)

    def _apply(self, fn, recurse=True):
        """States declared with their own dtype (the fp32 SSM / GDN recurrent states) keep it through
        NxDI's whole-model cast: ``DecoderModelInstance.load_module`` (``cast_type="config"``) and
        ``to_cpu`` (``.bfloat16()``) both go through ``_apply``, which would otherwise round them to bf16
        (a recurrent state accumulates that rounding every step; docs/neuron.md has the measurement).
        Device moves still apply; only the dtype is put back."""
        super()._apply(fn, recurse)
        for param, pinned in zip(getattr(self, "past_key_values", ()), getattr(self, "pinned_state_dtypes", ())):
            if pinned is not None and param.dtype != pinned:
                param.data = param.data.to(pinned)
        return self

    def init_inference_optimization(self, config) -> None:
        # The hybrid state replaces NxDI's KVCacheManager. kv_mgr only exposes past_key_values (KV
        # caches and recurrent states alike): DecoderModelInstance aliases kv_mgr.past_key_values, and
        # NxDI's CPU path (ModelWrapper.forward) writes the new states back through it.
        self.kv_mgr = _HybridStateView(self)
        self.sampler = base.create_sampler(config.neuron_config) if self.on_device_sampling else None

    def run_layers(self, input_ids, attention_mask, position_ids, seq_ids):
        """Embedding and every layer: (h (B, L, D) at every position, the step, new states)."""
        is_prefill = input_ids.shape[1] > 1
        valid = attention_mask[:, :input_ids.shape[1]] if is_prefill else torch.ones_like(input_ids)
        # A row without a valid token (a padded prefill line) belongs to no sequence: slot -1.
        seq_ids = torch.where(valid.sum(-1) > 0, seq_ids, torch.full_like(seq_ids, -1))
        step = Step(valid, position_ids, seq_ids, is_prefill)
        states = list(self.past_key_values)
        new_states: list[torch.Tensor] = []
        h = self.embed(input_ids)  # (B, L, D)
        for layer, (a, b) in zip(self.layers, self.state_slices):
            h, layer_states = layer(h, step, states[a:b])
            new_states += layer_states
        return h, step, new_states

    def forward(self, input_ids, attention_mask, position_ids, seq_ids, sampling_params, *unused):
        """input_ids: (B, L); attention_mask: (B, L) prefill validity; position_ids: (B, L);
        seq_ids: (B,) state slots. Returns [logits (B, 1, V) or tokens, *new states]."""
        h, step, new_states = self.run_layers(input_ids, attention_mask, position_ids, seq_ids)
        if step.is_prefill:  # only the last real token's logits are needed
            idx = last_valid_index(step.valid)[:, None, None].expand(-1, 1, h.shape[-1])
            h = torch.gather(h, 1, idx)  # (B, 1, D)
        logits = self.logits(h)  # (B, 1, V) fp32
        if self.sampler is None:
            return [logits, *new_states]
        tokens = self.sampler(logits[:, -1, :], sampling_params).to(torch.int32)
        # NxDI's output order: [tokens, logits if output_logits, *states]; DecoderModelInstance.get
        # aliases past_key_values[i] to output (1 or 2) + i to match.
        return [tokens, *([logits] if self.output_logits else []), *new_states]


class PortForCausalLM(base.NeuronBaseForCausalLM):
    """What the three ports' application classes share: the neuron config class (their
    InferenceConfig's), HF loading, tied embeddings. Each port adds ``_model_cls``,
    ``get_config_cls`` (a ``HybridInferenceConfig``) and ``convert_hf_to_neuron_state_dict``."""

    @classmethod
    def get_neuron_config_cls(cls):
        return cls.get_config_cls().get_neuron_config_cls()

    @staticmethod
    def load_hf_model(model_path):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_path)

    @staticmethod
    def update_state_dict_for_tied_weights(state_dict: dict) -> None:
        state_dict["lm_head.weight"] = state_dict["embed_tokens.weight"].clone()


class _HybridStateView:
    """What NxDI reads of a KV-cache manager: ``past_key_values``, here the model's own state list."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    @property
    def past_key_values(self) -> nn.ParameterList:
        return self._model.past_key_values
