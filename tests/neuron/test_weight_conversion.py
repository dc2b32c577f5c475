"""convert_hf_to_neuron_state_dict, key by key: nothing missing, nothing unused, nothing duplicated."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from neuron_helpers import app_cls
from vllm_hybrid_neuron.neuron.cpu_runner import CpuRunner

FAMILIES = ["granite", "qwen3_5", "gemma4"]


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_keys_and_shapes_match_the_port(checkpoint, family):
    r = CpuRunner(app_cls(family), checkpoint(family))
    expected = {k: v.shape for k, v in r.model.state_dict().items() if not k.startswith("past_key_values.")}
    assert set(r.state_dict) == set(expected)  # no missing, no unused keys
    assert r.missing == [] and r.unexpected == []
    for key, shape in expected.items():
        assert r.state_dict[key].shape == shape, key


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hf_value_lands_exactly_once(checkpoint, family):
    """Give every HF tensor element a distinct value; after conversion the multiset of values
    must be exactly the HF one (so no tensor is dropped, duplicated or partly used)."""
    path = checkpoint(family)
    app = app_cls(family)
    config = CpuRunner(app, path).config
    hf = load_file(f"{path}/model.safetensors")
    tagged, offset = {}, 0
    for key, value in sorted(hf.items()):
        tagged[key] = (torch.arange(value.numel(), dtype=torch.float64) + offset).view(value.shape)
        offset += value.numel()
    stripped = {k.removeprefix("model."): v for k, v in tagged.items()}
    converted = app.convert_hf_to_neuron_state_dict(stripped, config)
    got = torch.cat([v.flatten() for v in converted.values()]).sort().values
    assert torch.equal(got, torch.arange(offset, dtype=torch.float64))
