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


@pytest.fixture(scope="session")
def gemma4_conditional_checkpoint(checkpoint, tmp_path_factory):
    """The tiny Gemma 4 text model saved as a Gemma4ForConditionalGeneration checkpoint (text_config
    nested, weights under model.language_model.), plus a stray vision-tower tensor to be dropped."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, Gemma4Config, Gemma4ForConditionalGeneration

    src = checkpoint("gemma4")
    out = tmp_path_factory.mktemp("tiny-gemma4-cg")
    config = Gemma4Config(text_config=AutoConfig.from_pretrained(src).to_dict(), vision_config=None,
                          audio_config=None)
    config.architectures = ["Gemma4ForConditionalGeneration"]
    model = Gemma4ForConditionalGeneration(config)
    text = {k.removeprefix("model."): v for k, v in load_file(f"{src}/model.safetensors").items()}
    missing = model.model.language_model.load_state_dict(text, strict=False).missing_keys
    assert missing == []
    model.save_pretrained(str(out))
    sd = load_file(f"{out}/model.safetensors")
    sd["model.vision_tower.encoder.fake.weight"] = torch.ones(3, 3)
    save_file(sd, f"{out}/model.safetensors", metadata={"format": "pt"})
    return str(out)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``neuron`` need the Neuron compiler and devices: skip them where NxDI is absent."""
    from vllm_hybrid_neuron.neuron.base import HAS_NXDI

    if HAS_NXDI:
        return
    skip = pytest.mark.skip(reason="needs AWS Neuron hardware and the Neuron SDK (NxDI not importable)")
    for item in items:
        if "neuron" in item.keywords and item.get_closest_marker("neuron"):
            item.add_marker(skip)
