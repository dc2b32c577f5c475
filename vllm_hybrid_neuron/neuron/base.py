"""NxDI base classes, or plain-torch stand-ins with the same names when NxDI is absent.

The ports subclass whatever this module exports, so one forward serves both:
on a Neuron host these are NxDI's own classes (compiled, TP-sharded by NxDI);
elsewhere they are the small stand-ins below (CPU, TP=1) used by the tests.
Every NxDI name used here is listed in ``api_surface.json``.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn


def _nxdi(module: str, name: str):
    """``neuronx_distributed_inference.<module>.<name>`` or None when NxDI is not installed."""
    try:
        return getattr(importlib.import_module(f"neuronx_distributed_inference.{module}"), name)
    except ImportError:  # the PyPI placeholder raises ImportError too
        return None


# --- CPU stand-ins (only what the ports use) -------------------------------------------------


class _NeuronConfig:
    """Subset of NxDI's NeuronConfig: the fields the ports and the CPU runner read."""

    def __init__(self, **kwargs: Any) -> None:
        self.batch_size = kwargs.pop("batch_size", 1)
        self.padding_side = kwargs.pop("padding_side", "right")
        self.seq_len = kwargs.pop("seq_len", 128)
        self.n_active_tokens = kwargs.pop("n_active_tokens", self.seq_len)
        self.n_positions = kwargs.pop("n_positions", self.seq_len)
        self.max_context_length = kwargs.pop("max_context_length", self.seq_len)
        self.max_length = kwargs.pop("max_length", self.seq_len)
        self.output_logits = kwargs.pop("output_logits", False)
        dtype = kwargs.pop("torch_dtype", torch.float32)
        self.torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.tp_degree = kwargs.pop("tp_degree", 1)
        self.speculation_length = kwargs.pop("speculation_length", 0)
        self.on_device_sampling_config = kwargs.pop("on_device_sampling_config", None)
        self.is_continuous_batching = kwargs.pop("is_continuous_batching", self.batch_size > 1)
        self.is_block_kv_layout = kwargs.pop("is_block_kv_layout", False)
        self.is_prefix_caching = kwargs.pop("is_prefix_caching", False)
        self.is_chunked_prefill = kwargs.pop("is_chunked_prefill", False)
        self.enable_fused_speculation = kwargs.pop("enable_fused_speculation", False)
        self.sequence_parallel_enabled = kwargs.pop("sequence_parallel_enabled", False)
        self.max_batch_size = kwargs.pop("max_batch_size", self.batch_size)
        self.__dict__.update(kwargs)


class _MoENeuronConfig(_NeuronConfig):
    pass


class _InferenceConfig:
    """NxDI's InferenceConfig life cycle: load_config, kwargs, add_derived_config, validate."""

    def __init__(self, neuron_config, fused_spec_config=None, load_config=None,
                 metadata=None, **kwargs: Any) -> None:
        self.neuron_config = neuron_config
        self.fused_spec_config = fused_spec_config
        if load_config is not None:
            load_config(self)
        else:
            self.load_config()
        self.metadata = metadata
        for key, value in kwargs.items():
            setattr(self, key, value)
        self.add_derived_config()
        self.validate_config()

    def add_derived_config(self) -> None:
        self.num_cores_per_group = 1

    def load_config(self) -> None:
        pass

    def get_required_attributes(self) -> list[str]:
        return []

    def validate_config(self) -> None:
        missing = [a for a in self.get_required_attributes() if not hasattr(self, a)]
        assert not missing, f"Config must define {missing}"

    def get_text_config(self):
        return self


class _NeuronBaseModel(nn.Module):
    """NeuronBaseModel's constructor protocol: setup_attr_for_model, init_model, init_inference_optimization."""

    def __init__(self, config, optimize_inference: bool = True) -> None:
        super().__init__()
        self.config = config
        self.sampler = None
        self.kv_mgr = None
        self.neuron_config = config.neuron_config
        self.batch_size = config.neuron_config.batch_size
        self.n_positions = config.neuron_config.n_positions
        self.vocab_size = config.vocab_size
        self.speculation_length = config.neuron_config.speculation_length
        self.padding_side = config.neuron_config.padding_side
        self.setup_attr_for_model(config)
        self.init_model(config)
        if optimize_inference:
            self.init_inference_optimization(config)

    def setup_attr_for_model(self, config) -> None:
        raise NotImplementedError

    def init_model(self, config) -> None:
        raise NotImplementedError

    def init_inference_optimization(self, config) -> None:
        pass


class _NeuronBaseForCausalLM:
    """Class-level surface of NeuronBaseForCausalLM that the CPU runner uses."""

    _model_cls = None
    _STATE_DICT_MODEL_PREFIX = "model."
    _NEW_STATE_DICT_MODEL_PREFIX = ""

    @staticmethod
    def convert_hf_to_neuron_state_dict(state_dict: dict, config) -> dict:
        return state_dict

    @staticmethod
    def update_state_dict_for_tied_weights(state_dict: dict) -> None:
        raise NotImplementedError

    @classmethod
    def get_state_dict(cls, model_name_or_path: str, config) -> dict:
        """HF checkpoint -> the port's keys: strip the "model." prefix, convert, tie."""
        from safetensors.torch import load_file
        from pathlib import Path

        sd: dict[str, torch.Tensor] = {}
        for f in sorted(Path(model_name_or_path).glob("*.safetensors")):
            sd.update(load_file(str(f)))
        sd = {(k.replace(cls._STATE_DICT_MODEL_PREFIX, cls._NEW_STATE_DICT_MODEL_PREFIX, 1)
               if k.startswith(cls._STATE_DICT_MODEL_PREFIX) else k): v for k, v in sd.items()}
        sd = cls.convert_hf_to_neuron_state_dict(sd, config)
        if getattr(config, "tie_word_embeddings", False):
            cls.update_state_dict_for_tied_weights(sd)
        return sd

    def get_model_wrapper_cls(self):
        return None

    def get_compiler_args(self) -> str | None:
        return None


def _load_pretrained_config(model_path_or_name=None, hf_config=None):
    """Stand-in for NxDI's hf_adapter.load_pretrained_config: HF config dict -> attributes."""

    def load_config(self) -> None:
        from transformers import AutoConfig, PretrainedConfig

        config = hf_config or AutoConfig.from_pretrained(model_path_or_name)
        items = config.to_dict()
        items.pop("dtype", None)
        items.pop("torch_dtype", None)
        for k, v in items.items():
            if isinstance(getattr(config, k, None), PretrainedConfig):
                items[k] = SimpleNamespace(**v)
        self.__dict__.update(items)

    return load_config


def _greedy_sampler(neuron_config, lm_head_tp_degree=None, do_sample=None):
    return None


HAS_NXDI = _nxdi("models.config", "InferenceConfig") is not None

InferenceConfig = _nxdi("models.config", "InferenceConfig") or _InferenceConfig
NeuronConfig = _nxdi("models.config", "NeuronConfig") or _NeuronConfig
MoENeuronConfig = _nxdi("models.config", "MoENeuronConfig") or _MoENeuronConfig
NeuronBaseModel = _nxdi("models.model_base", "NeuronBaseModel") or _NeuronBaseModel
NeuronBaseForCausalLM = _nxdi("models.model_base", "NeuronBaseForCausalLM") or _NeuronBaseForCausalLM
load_pretrained_config = (_nxdi("utils.hf_adapter", "load_pretrained_config")
                          or _load_pretrained_config)
create_sampler = _nxdi("modules.generation.sampling", "create_sampler") or _greedy_sampler
