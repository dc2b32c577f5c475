"""Helpers for the Neuron-port tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import importlib

import torch

# family -> (port module, NxDI application class name)
PORTS = {
    "granite": ("vllm_hybrid_neuron.neuron.granite", "NeuronGraniteMoeHybridForCausalLM"),
    "qwen3_5": ("vllm_hybrid_neuron.neuron.qwen3_5_moe", "NeuronQwen3_5MoeForCausalLM"),
    "gemma4": ("vllm_hybrid_neuron.neuron.gemma4", "NeuronGemma4ForCausalLM"),
}


def app_cls(family: str):
    module, name = PORTS[family]
    return getattr(importlib.import_module(module), name)


def prompt(n: int, seed: int = 0, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def assert_close_to_scale(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """``got`` within ``tol`` of ``ref`` in units of ref's largest magnitude (at least 1): fp32
    rounding grows with the values, and the test models' logits reach ~13 (final-norm gain 8)."""
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale)
