"""The Neuron tests' fixtures: tiny checkpoints and transformers models by family (the same ones
the CPU-backend tests use), a ConditionalGeneration Gemma 4 checkpoint, the NxDI skip."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def checkpoint(tiny_model_dir):
    """``checkpoint(family)``: the session's tiny checkpoint (tests/conftest.py's
    ``tiny_model_dir``, shared with the CPU-backend tests)."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir):
    """``hf_model(family)``: transformers fp32 on that checkpoint (tests/helpers.py, cached)."""
    from helpers import hf_model as load

    return lambda family: load(tiny_model_dir(family))


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
