"""Shared fixtures: tiny checkpoints built once per session, engine environment."""

from __future__ import annotations

import os

import pytest

# Small KV cache on a 24 GiB machine; tests never depend on the rest of the env.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Count the plugin's layer calls in every engine the tests start (tools/op_probe.py), so they
# can assert which ops served.
os.environ["VLLM_HYBRID_NEURON_COUNT_OPS"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family)`` -> path of that family's default tiny checkpoint;
    ``multimodal=True``: the same text model as a ``*ForConditionalGeneration`` checkpoint."""
    from vllm_hybrid_neuron.tools.tiny import build

    built: dict[tuple[str, bool], str] = {}

    def get(family: str, multimodal: bool = False) -> str:
        key = (family, multimodal)
        if key not in built:
            name = f"tiny-{family}" + ("-multimodal" if multimodal else "")
            built[key] = str(build(family, tmp_path_factory.mktemp(name), multimodal=multimodal))
        return built[key]

    return get
