"""Make vllm-neuron find the hybrid ports: insert them into NxDI's MODEL_TYPES.

vllm-neuron resolves an HF architecture with ``MODEL_TYPES[model][task]`` (see
``api_surface.json``: "GraniteMoeHybridForCausalLM" -> ("granitemoehybrid", "causal-lm"),
"...ForConditionalGeneration" -> task "causal-lm"). There is no registration hook, so the
dict is updated in place before the model loads. Only called when the backend is "neuron".
"""

from __future__ import annotations

import importlib
import logging
import re

logger = logging.getLogger("vllm_hybrid_neuron")

# MODEL_TYPES key -> "module:Class" of the port (None: no port yet, left unregistered).
PORTS: dict[str, str | None] = {
    "granitemoehybrid": "vllm_hybrid_neuron.neuron.granite:NeuronGraniteMoeHybridForCausalLM",
    "qwen3_5moe": "vllm_hybrid_neuron.neuron.qwen3_5_moe:NeuronQwen3_5MoeForCausalLM",
    "gemma4": "vllm_hybrid_neuron.neuron.gemma4:NeuronGemma4ForCausalLM",
}


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


def register_neuron_models(model_types: dict | None = None) -> dict:
    """Insert every built port into ``model_types`` (default: NxDI's MODEL_TYPES); returns it."""
    if model_types is None:
        from vllm_hybrid_neuron.neuron.base import _nxdi

        model_types = _nxdi("utils.constants", "MODEL_TYPES")
        if model_types is None:
            raise ImportError("backend=neuron needs neuronx-distributed-inference (AWS Neuron SDK)")
    for key, target in PORTS.items():
        if target is None:
            logger.warning("vllm-hybrid-neuron: no Neuron port for %r yet; it stays unsupported", key)
            continue
        model_types.setdefault(key, {})["causal-lm"] = load_port(target)
    return model_types


def hybrid_state_layout(config) -> dict:
    """What a port keeps per sequence, for the scheduler side (vllm-neuron has no hybrid spec).

    Each sequence owns one state slot (``seq_ids``), for every layer; slots = batch_size
    (vLLM's max_num_seqs); speculative width 0 (the ports reject speculation).
    """
    import torch

    app = load_port(PORTS[model_types_key(config.architectures[0])[0]])
    with torch.device("meta"):  # shapes only, no memory
        model = app._model_cls(config)
    per_slot = sum(p[0].numel() * p.element_size() for p in model.past_key_values)
    return {"slots": config.neuron_config.batch_size, "slots_per_sequence": 1,
            "speculative_width": 0, "state_bytes_per_slot": per_slot,
            "kinds": sorted(set(model.state_kinds))}
