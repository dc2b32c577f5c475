"""An offline byte-level BPE tokenizer with a chat template, built from text in this file.

No model hub is reachable, so every tiny checkpoint ships this tokenizer: byte-level
(any string encodes, nothing is <unk>), trained deterministically to exactly the
model's vocabulary size so that every id the model can emit decodes.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>")
# Tokens a family's transformers tokenizer class adds when the vocabulary lacks them, which would
# give them ids past the model's embedding: Qwen3.5's adds "<|endoftext|>".
FAMILY_SPECIAL_TOKENS = {"qwen3_5": ("<|endoftext|>",)}
PAD, BOS, EOS = SPECIAL_TOKENS[:3]

# ChatML-style; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A state space model keeps a hidden state
that it updates with every token, while attention looks back over the whole context.
Hybrid models mix both: most layers are recurrent, a few are attention layers.
Mamba layers use a selective scan; gated delta networks use a delta rule with a gate.
Serving a language model means batching requests, caching keys and values, and
streaming tokens back to each client as soon as they are ready. Hello, my name is
Ada. The capital of France is Paris. One two three four five six seven eight nine ten.
def main(): print("hello world") return 0 for i in range(10): x = x + i * 2
{"role": "user", "content": "What is the weather like today?"} The answer is 42.
"""


def build_tokenizer(vocab_size: int, extra_special: tuple[str, ...] = ()):
    """A ``PreTrainedTokenizerFast`` with exactly ``vocab_size`` ids (>= 262), ``extra_special``
    tokens among them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = list(SPECIAL_TOKENS) + list(extra_special)
    minimum = len(alphabet) + len(specials) + 1
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below the byte-level minimum {minimum}")
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        min_frequency=1,
        show_progress=False,
    )
    # Repeat the corpus with numbered lines so there are always enough merges.
    lines = [f"{i} {line}" for i in range(64) for line in _CORPUS.splitlines()]
    core.train_from_iterator(lines, trainer=trainer)
    # Large vocabularies (realistic-width presets) outgrow the corpus's merges: fill
    # the rest with reserved tokens so every id the model can emit still decodes.
    missing = vocab_size - core.get_vocab_size()
    if missing > 0:
        core.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    if core.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"tokenizer has {core.get_vocab_size()} ids, expected {vocab_size}"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def special_ids(tokenizer) -> dict[str, int]:
    return {
        "pad_token_id": tokenizer.convert_tokens_to_ids(PAD),
        "bos_token_id": tokenizer.convert_tokens_to_ids(BOS),
        "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
    }


def save_tokenizer(vocab_size: int, out_dir: Path, family: str = "") -> dict[str, int]:
    tokenizer = build_tokenizer(vocab_size, FAMILY_SPECIAL_TOKENS.get(family, ()))
    tokenizer.save_pretrained(str(out_dir))
    return special_ids(tokenizer)
