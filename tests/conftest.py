"""Shared fixtures: tiny checkpoints built once per session, engine environment."""

from __future__ import annotations

import os

import pytest

# Small KV cache on a 24 GiB machine; tests never depend on the rest of the env.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family)`` -> path of that family's default tiny checkpoint."""
    from vllm_hybrid_neuron.tools.tiny import build

    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(build(family, tmp_path_factory.mktemp(f"tiny-{family}")))
        return built[family]

    return get
