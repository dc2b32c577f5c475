"""The tiny checkpoints' tokenizers, as transformers loads them for each family, only use ids
inside the model's embedding (transformers' Qwen3.5 tokenizer class adds <|endoftext|> when the
vocabulary lacks it)."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("family", ["granite", "qwen3_5", "gemma4"])
def test_every_token_id_is_below_vocab_size(tiny_model_dir, family):
    from transformers import AutoConfig, AutoTokenizer

    model_dir = tiny_model_dir(family)
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
    too_big = {t: i for t, i in tok.get_vocab().items() if i >= vocab_size}
    assert too_big == {}
    assert len(tok) == vocab_size
    assert max(tok.all_special_ids) < vocab_size
