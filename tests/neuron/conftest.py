"""Tiny random-weight checkpoints and their transformers reference models, built once per session."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    from vllm_hybrid_neuron.tools.tiny import build

    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = str(build(family, tmp_path_factory.mktemp(f"tiny-{family}")))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def hf_model(checkpoint):
    from transformers import AutoModelForCausalLM

    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = AutoModelForCausalLM.from_pretrained(
                checkpoint(family), dtype=torch.float32).eval()
        return cache[family]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked ``neuron`` need the Neuron compiler and devices: skip them where NxDI is absent."""
    from vllm_hybrid_neuron.neuron.base import HAS_NXDI

    if HAS_NXDI:
        return
    skip = pytest.mark.skip(reason="needs AWS Neuron hardware and the Neuron SDK (NxDI not importable)")
    for item in items:
        if "neuron" in item.keywords and item.get_closest_marker("neuron"):
            item.add_marker(skip)
