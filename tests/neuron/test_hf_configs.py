"""The plugin's config classes for a transformers without qwen3_5_moe / gemma4 (NxDI pins 4.57).

transformers 5 here has both types, so each test first hides them from ``AutoConfig`` (as 4.57
lacks them), registers the plugin's classes, and loads checkpoints the way vLLM and NxDI do.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig
from transformers.models.auto import configuration_auto

from neuron_helpers import prompt
from vllm_hybrid_neuron.neuron import hf_configs, registration
from vllm_hybrid_neuron.neuron.cpu_runner import CpuRunner

HIDDEN = ("qwen3_5_moe", "qwen3_5_moe_text", "gemma4", "gemma4_text")


@pytest.fixture
def transformers_4_57(monkeypatch):
    """AutoConfig as transformers 4.57 has it: none of the four model types; restored after."""
    mapping = configuration_auto.CONFIG_MAPPING
    monkeypatch.setattr(mapping, "_mapping", {k: v for k, v in mapping._mapping.items() if k not in HIDDEN})
    monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))
    assert not any(t in mapping for t in HIDDEN)
    return mapping


@pytest.fixture(scope="module")
def qwen_conditional_config_dir(tiny_model_dir, tmp_path_factory):
    """config.json of a Qwen3_5MoeForConditionalGeneration checkpoint (nested text_config)."""
    from transformers import Qwen3_5MoeConfig

    src = tiny_model_dir("qwen3_5")
    out = tmp_path_factory.mktemp("qwen-cg-config")
    config = Qwen3_5MoeConfig(text_config=AutoConfig.from_pretrained(src).to_dict())
    config.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    config.save_pretrained(str(out))
    return str(out)


def vllm_neuron_fields(config) -> tuple[str, int, int]:
    """vllm-neuron 0.2's _get_model_configs rule (api_surface.json), read from the top level."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.architectures[0], int(config.num_key_value_heads), int(head_dim)


def test_registers_only_the_missing_types(transformers_4_57):
    assert sorted(hf_configs.register_missing_config_types()) == sorted(HIDDEN)
    assert hf_configs.register_missing_config_types() == []  # idempotent


def test_installed_transformers_needs_none():
    assert hf_configs.register_missing_config_types() == []


def test_conditional_generation_config_exposes_text_fields(transformers_4_57, qwen_conditional_config_dir):
    hf_configs.register_missing_config_types()
    config = AutoConfig.from_pretrained(qwen_conditional_config_dir)
    assert type(config) is hf_configs.Qwen3_5MoeConfig
    text = json.load(open(f"{qwen_conditional_config_dir}/config.json"))["text_config"]
    assert vllm_neuron_fields(config) == ("Qwen3_5MoeForConditionalGeneration",
                                          text["num_key_value_heads"], text["head_dim"])
    assert config.get_text_config().model_type == "qwen3_5_moe_text"
    assert config.to_dict()["text_config"]["linear_num_value_heads"] == text["linear_num_value_heads"]


def test_without_the_classes_the_stack_cannot_read_the_checkpoint(transformers_4_57, qwen_conditional_config_dir):
    with pytest.raises((ValueError, KeyError)):
        AutoConfig.from_pretrained(qwen_conditional_config_dir)


def test_gemma4_port_loads_through_the_plugin_config(transformers_4_57, gemma4_conditional_checkpoint, hf_model):
    hf_configs.register_missing_config_types()
    assert type(AutoConfig.from_pretrained(gemma4_conditional_checkpoint)) is hf_configs.Gemma4Config
    r = CpuRunner(registration.insert_ports({})["gemma4"]["causal-lm"], gemma4_conditional_checkpoint)
    assert r.missing == [] and r.unexpected == []
    ids = prompt(45, seed=1)
    got = r.prefill([ids], [0])[0]
    with torch.no_grad():
        ref = hf_model("gemma4")(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
