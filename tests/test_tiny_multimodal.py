"""``tiny.build(..., multimodal=True)`` writes the family's ``*ForConditionalGeneration``
checkpoint (nested text_config, random vision / audio towers) around the very text model of the
causal checkpoint: transformers gives both the same logits on a text-only prompt."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vllm_hybrid_neuron.families import FAMILIES

# Tensor-name prefixes of the towers each family's multimodal checkpoint must hold.
TOWERS = {
    "qwen3_5": ("model.visual.",),
    "gemma4": ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.",
               "model.embed_audio."),
}
ARCHITECTURE = {"qwen3_5": FAMILIES["qwen3_5"].multimodal, "gemma4": FAMILIES["gemma4"].multimodal}


def _tensor_names(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    names = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            names += list(f.keys())
    return names


def _prompt(vocab_size: int, exclude: set[int], n: int = 40) -> list[int]:
    """<|bos|> and random text ids (no multimodal placeholder: transformers' Gemma 4 would embed
    those as padding)."""
    import torch

    allowed = torch.tensor([i for i in range(vocab_size) if i not in exclude])
    pick = torch.randint(0, len(allowed), (n - 1,), generator=torch.Generator().manual_seed(7))
    return [1] + allowed[pick].tolist()


@pytest.mark.parametrize("family", ["qwen3_5", "gemma4"])
def test_multimodal_checkpoint_serves_the_causal_text_model(tmp_path, family):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from vllm_hybrid_neuron.tools.tiny import build

    causal_dir = build(family, tmp_path / "causal", seed=3)
    mm_dir = build(family, tmp_path / "multimodal", seed=3, multimodal=True)

    config = json.loads((mm_dir / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE[family]]
    text_config = config["text_config"]
    assert isinstance(text_config, dict) and text_config["num_hidden_layers"] == 4
    assert "vision_config" in config and (family != "gemma4" or "audio_config" in config)
    vocab_size = text_config["vocab_size"]
    token_ids = {k: v for k, v in config.items() if k.endswith(("_token_id", "_token_index"))}
    assert token_ids and all(0 <= i < vocab_size for i in token_ids.values()), token_ids
    assert json.loads((mm_dir / "tiny_model.json").read_text())["multimodal"] is True

    names = _tensor_names(mm_dir)
    for prefix in TOWERS[family]:
        assert any(n.startswith(prefix) for n in names), (prefix, Counter(
            ".".join(n.split(".")[:2]) for n in names))
    causal_names = _tensor_names(causal_dir)
    assert sorted(n for n in names if n.startswith(("model.language_model.", "lm_head."))) == \
        sorted(n.replace("model.", "model.language_model.", 1) for n in causal_names)

    # The tokenizer is the causal checkpoint's, and no text encodes to a multimodal token.
    tok = AutoTokenizer.from_pretrained(mm_dir)
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(causal_dir).get_vocab()
    assert len(tok) == vocab_size and max(tok.all_special_ids) < vocab_size
    text = "Hello, my name is Ada. ÿõ À Á é € 😀 <|image_pad|> <image>"
    assert not set(tok(text)["input_ids"]) & set(token_ids.values())

    prompt = torch.tensor([_prompt(vocab_size, set(token_ids.values()))])
    causal, _ = AutoModelForCausalLM.from_pretrained(
        causal_dir, dtype=torch.float32, output_loading_info=True)
    mm, info = AutoModelForImageTextToText.from_pretrained(
        mm_dir, dtype=torch.float32, output_loading_info=True)
    assert type(mm).__name__ == ARCHITECTURE[family]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    causal.eval()
    mm.eval()
    with torch.no_grad():
        expected = causal(input_ids=prompt).logits
        got = mm(input_ids=prompt).logits
    assert got.shape == expected.shape == (1, prompt.shape[1], vocab_size)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"max |logit diff| {diff}"
    assert expected.std().item() > 1.0  # the sharpened model, not a degenerate one


def test_multimodal_is_refused_for_granite(tmp_path):
    from vllm_hybrid_neuron.tools.tiny import build

    with pytest.raises(ValueError, match="multimodal"):
        build("granite", tmp_path, multimodal=True)
