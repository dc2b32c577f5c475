"""Register the hybrid ports on the neuron backend, for vllm-neuron 0.2 (see docs/neuron.md).

Three registries, all filled in place (vLLM loads general plugins in every process, before the
model config is built and before vllm-neuron's loader looks a model up):

- NxDI's ``MODEL_TYPES``: vllm-neuron resolves an HF architecture with
  ``MODEL_TYPES[model][task]`` (``api_surface.json``: "GraniteMoeHybridForCausalLM" ->
  ("granitemoehybrid", "causal-lm"); "...ForConditionalGeneration" -> task "causal-lm"). There is
  no registration hook, so the dict is updated in place; each entry imports its port on first
  lookup, so the plugin hook stays light in processes that never load a model.
- transformers' ``AutoConfig``: config classes for the model types the pinned transformers lacks
  (``hf_configs.py``).
- vLLM's ``ModelRegistry`` and ``MODELS_CONFIG_MAP``: a placeholder class per architecture and
  a hook refusing what the ports cannot do (``vllm_side.py``).
"""

from __future__ import annotations

import importlib
import re

# MODEL_TYPES key -> "module:Class" of the port.
PORTS: dict[str, str] = {
    "granitemoehybrid": "vllm_hybrid_neuron.neuron.granite:NeuronGraniteMoeHybridForCausalLM",
    "qwen3_5moe": "vllm_hybrid_neuron.neuron.qwen3_5_moe:NeuronQwen3_5MoeForCausalLM",
    "gemma4": "vllm_hybrid_neuron.neuron.gemma4:NeuronGemma4ForCausalLM",
}
TASK = "causal-lm"


def model_types_key(architecture: str) -> tuple[str, str]:
    """The (model, task) pair vllm-neuron looks up for an HF architecture name."""
    model, _, task = architecture.partition("For")
    if task == "ConditionalGeneration":
        task = "CausalLM"
    task = re.sub(r"([a-z0-9])([A-Z])", r"\1-\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1-\2", task)).lower()
    return model.lower(), task


def load_port(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


class LazyPortTasks(dict):
    """``{task: port class}`` whose values are "module:Class" strings until first looked up."""

    def __getitem__(self, task: str):
        value = super().__getitem__(task)
        if isinstance(value, str):
            value = load_port(value)
            self[task] = value
        return value

    def get(self, task, default=None):
        return self[task] if task in self else default


def insert_ports(model_types: dict) -> dict:
    """Insert every port into ``model_types`` (NxDI's MODEL_TYPES or a test's dict); returns it.
    A model key NxDI already has keeps its other tasks."""
    for key, target in PORTS.items():
        tasks = LazyPortTasks(model_types.get(key, {}))
        tasks[TASK] = target
        model_types[key] = tasks
    return model_types


def register_neuron_models(architectures=()) -> dict:
    """The neuron backend's registration (see the module docstring). Returns NxDI's MODEL_TYPES."""
    from vllm_hybrid_neuron.neuron.base import _nxdi

    model_types = _nxdi("utils.constants", "MODEL_TYPES")
    if model_types is None:
        raise ImportError("backend=neuron needs neuronx-distributed-inference (AWS Neuron SDK): "
                          "neuronx_distributed_inference.utils.constants is not importable")
    insert_ports(model_types)
    from vllm_hybrid_neuron.neuron import hf_configs, vllm_side

    hf_configs.register_missing_config_types()
    vllm_side.register_architectures(architectures)
    return model_types


def hybrid_state_layout(config) -> dict:
    """What a port keeps per sequence, for the scheduler side (vllm-neuron has no hybrid spec).

    Each sequence owns one state slot (``seq_ids``), for every layer; slots = batch_size
    (vLLM's max_num_seqs), plus one spare row per tensor for padded batch lines; speculative
    width 0 (the ports reject speculation).
    """
    import torch

    app = load_port(PORTS[model_types_key(config.architectures[0])[0]])
    with torch.device("meta"):  # shapes only, no memory
        model = app._model_cls(config)
    per_slot = sum(p[0].numel() * p.element_size() for p in model.past_key_values)
    return {"slots": config.neuron_config.batch_size, "slots_per_sequence": 1,
            "speculative_width": 0, "state_bytes_per_slot": per_slot,
            "kinds": sorted(set(model.state_kinds))}
