"""Build random-weight checkpoints of the three hybrid families, offline and deterministic.

    python -m vllm_hybrid_neuron.tools.tiny --family granite --out /tmp/tiny-granite
    python -m vllm_hybrid_neuron.tools.tiny --family qwen3_5 --preset qwen3.5-35b-a3b \\
        --set num_hidden_layers=4 --out /tmp/qwen-wide
    python -m vllm_hybrid_neuron.tools.tiny --family gemma4 --multimodal --out /tmp/tiny-gemma4-mm

Each checkpoint is a transformers model created from its config with a fixed seed,
saved as safetensors beside an offline byte-level BPE tokenizer with a chat template.
The "tiny" presets exercise the hard parts of each family; the named presets use real
layer widths (override the layer count with --set for benchmarks).

``--multimodal`` (qwen3_5, gemma4) writes the same text model as the family's
``*ForConditionalGeneration`` checkpoint users have: nested ``text_config``, the text weights
under ``model.language_model.``, and tiny random vision (and, for Gemma 4, audio) towers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vllm_hybrid_neuron.families import FAMILIES as _FAMILIES

FAMILIES = tuple(_FAMILIES)
ARCHITECTURE = {name: f.causal for name, f in _FAMILIES.items()}

# Each preset: config keyword arguments for the family's transformers config class.
# vLLM's CPU attention takes head dims 32, 64, 80, ..., 256, 512 only.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "granite": {
        # Mamba2 + attention layers, n_groups 2, MoE top-2 of 8 + shared expert, NoPE.
        "tiny": dict(
            vocab_size=512, hidden_size=128, num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention",
                         "linear_attention"],
            num_attention_heads=4, num_key_value_heads=2,
            mamba_n_heads=8, mamba_d_head=32, mamba_n_groups=2, mamba_d_state=16,
            mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=64,
            intermediate_size=32, shared_intermediate_size=64,
            num_local_experts=8, num_experts_per_tok=2,
            embedding_multiplier=12.0, logits_scaling=2.0, residual_multiplier=0.5,
            attention_multiplier=0.03125, position_embedding_type="nope",
            max_position_embeddings=4096, initializer_range=0.05,
        ),
        # granite-4.0-h-tiny widths: 40 layers (4 attention), 64 experts top-6.
        "granite-4.0-h-tiny": dict(
            vocab_size=100352, hidden_size=1536, num_hidden_layers=40,
            num_attention_heads=12, num_key_value_heads=4,
            mamba_n_heads=48, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
            mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
            intermediate_size=512, shared_intermediate_size=1024,
            num_local_experts=64, num_experts_per_tok=6,
            embedding_multiplier=12.0, logits_scaling=6.0, residual_multiplier=0.22,
            attention_multiplier=0.0078125, position_embedding_type="nope",
            max_position_embeddings=131072, initializer_range=0.02,
        ),
    },
    "qwen3_5": {
        # 3 Gated DeltaNet + 1 gated full-attention layer; 4 value heads over 2 key heads;
        # MoE top-2 of 8 + sigmoid-gated shared expert; partial RoPE.
        "tiny": dict(
            vocab_size=512, hidden_size=64, num_hidden_layers=4,
            layer_types=["linear_attention", "linear_attention", "linear_attention",
                         "full_attention"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=64, linear_value_head_dim=64, linear_conv_kernel_dim=4,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            # 0.02: at 0.05+ the random GDN stack is chaotic enough that bf16 rounding
            # flips greedy tokens against fp32 transformers.
            max_position_embeddings=4096, initializer_range=0.02,
        ),
        # Qwen3.5-35B-A3B widths: 16 key / 32 value heads of 128, 256 experts top-8.
        "qwen3.5-35b-a3b": dict(
            vocab_size=248320, hidden_size=2048, num_hidden_layers=40,
            num_attention_heads=16, num_key_value_heads=2, head_dim=256,
            linear_num_key_heads=16, linear_num_value_heads=32,
            linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4,
            num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
            shared_expert_intermediate_size=512,
            max_position_embeddings=32768, initializer_range=0.02,
        ),
    },
    "gemma4": {
        # Sliding (head_dim 32) and global (head_dim 64, k_eq_v, 1 KV head) layers,
        # MoE block, softcapping; sliding window 32 so long prompts slide.
        "tiny": dict(
            vocab_size=512, hidden_size=64, num_hidden_layers=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention",
                         "full_attention"],
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            global_head_dim=64, num_global_key_value_heads=1, attention_k_eq_v=True,
            sliding_window=32, intermediate_size=64, hidden_size_per_layer_input=0,
            enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
            final_logit_softcapping=30.0,
            max_position_embeddings=4096, initializer_range=0.05,
        ),
    },
}


# --multimodal: the family's ConditionalGeneration architecture and its tiny random towers
# (whatever the preset; serving text-only loads and skips them). Vision head dim 32 as in the
# text presets; patch / merge / pooling sizes are transformers' defaults, so the image processors'
# patching stays valid.
MULTIMODAL_ARCHITECTURE = {name: f.multimodal for name, f in _FAMILIES.items() if f.multimodal}
VISION_CONFIG: dict[str, dict[str, Any]] = {
    # + out_hidden_size = the text hidden size
    "qwen3_5": dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3,
                    patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                    num_position_embeddings=2304, initializer_range=0.02),
    "gemma4": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=32, patch_size=16,
                   pooling_kernel_size=3, position_embedding_size=1024, initializer_range=0.02),
}
AUDIO_CONFIG: dict[str, dict[str, Any]] = {
    # + output_proj_dims = the text hidden size. subsampling_conv_channels[0] stays 128: the
    # subsampler's input projection assumes it equals the feature extractor's 128 mel bins.
    "gemma4": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                   subsampling_conv_channels=[128, 32], conv_kernel_size=5,
                   attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
                   initializer_range=0.02),
}
# The multimodal config's special-token ids. The tokenizer has no image/video/audio tokens (and
# stays identical to the causal checkpoint's), so they take the byte-level tokens of bytes that
# UTF-8 never contains (0xF5..0xFF, then 0xC0, 0xC1): ids below vocab_size that no text encodes to
# (the BPE merges come from an ASCII corpus), so a text-only prompt never holds one.
MULTIMODAL_TOKEN_FIELDS = {
    "qwen3_5": ("image_token_id", "video_token_id", "vision_start_token_id",
                "vision_end_token_id"),
    "gemma4": ("image_token_id", "video_token_id", "audio_token_id", "boi_token_id",
               "eoi_token_id", "boa_token_id", "eoa_token_index"),
}
_NEVER_ENCODED_BYTES = (*range(0xF5, 0x100), 0xC0, 0xC1)


# Final-norm gain of the test models (see _sharpen); the named presets keep transformers' init.
LOGIT_GAIN: dict[tuple[str, str], float] = {
    ("granite", "tiny"): 8.0, ("qwen3_5", "tiny"): 8.0, ("gemma4", "tiny"): 8.0,
}


def _config(family: str, overrides: dict[str, Any]):
    from transformers import Gemma4TextConfig, GraniteMoeHybridConfig, Qwen3_5MoeTextConfig

    cls = {"granite": GraniteMoeHybridConfig, "qwen3_5": Qwen3_5MoeTextConfig,
           "gemma4": Gemma4TextConfig}[family]
    kwargs = dict(overrides)
    n_layers = kwargs.get("num_hidden_layers")
    if "layer_types" in kwargs and n_layers and len(kwargs["layer_types"]) != n_layers:
        kwargs["layer_types"] = _stretch_layer_types(kwargs["layer_types"], n_layers)
    config = cls(**kwargs)
    config.architectures = [ARCHITECTURE[family]]
    return config


def _stretch_layer_types(pattern: list[str], n_layers: int) -> list[str]:
    """Repeat a layer pattern to n_layers, keeping the last layer's type last."""
    types = [pattern[i % len(pattern)] for i in range(n_layers)]
    types[-1] = pattern[-1]
    return types


def _randomize_constants(model, generator) -> None:
    """Every persistent tensor transformers initialises to one constant (norm weights, dt_bias,
    D, conv biases, layer scalars, router scales) becomes random, and Mamba2's A_log (the same
    per-head ramp in every layer) gets per-layer noise, so that a wrong formula, a dropped term
    or wrong per-head indexing cannot hide behind an all-ones or all-zeros tensor."""
    import torch

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            first = tensor.flatten()[0]
            if name.endswith("A_log"):
                tensor.add_(0.5 * torch.randn(tensor.shape, generator=generator))
            elif bool((tensor == first).all()):
                if float(first) == 0.0:  # zero biases; Qwen3.5's (1 + weight) norms
                    tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
                else:  # unit norm weights, dt_bias, D, layer scalars, router scales
                    tensor.mul_(0.5 + torch.rand(tensor.shape, generator=generator))


def _sharpen(model, family: str, gain: float) -> None:
    """Multiply the final norm's effective scale by ``gain``: logits grow by about ``gain``, so
    top-2 gaps are wide enough that a wrong formula moves greedy tokens (tests/README.md shows
    the gap distributions)."""
    import torch

    with torch.no_grad():
        weight = model.model.norm.weight
        if family == "qwen3_5":  # Qwen3.5's RMSNorm scales by (1 + weight)
            weight.copy_((1 + weight) * gain - 1)
        else:
            weight.mul_(gain)


def _multimodal_token_ids(family: str, out: Path, vocab_size: int) -> dict[str, int]:
    """The ids of never-encoded byte tokens (see MULTIMODAL_TOKEN_FIELDS) in ``out``'s
    tokenizer, one per multimodal token field of ``family``'s config."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    # ByteLevel writes bytes 0xAE..0xFF as the character of the same code point.
    chars = [chr(b) for b in _NEVER_ENCODED_BYTES]
    merged = [t for t in tokenizer.get_vocab() if len(t) > 1 and any(c in t for c in chars)]
    if merged:
        raise RuntimeError(f"tokenizer merges hold never-encoded bytes: {merged[:5]}")
    fields = MULTIMODAL_TOKEN_FIELDS[family]
    ids = {field: tokenizer.token_to_id(char) for field, char in zip(fields, chars)}
    if any(i is None or not 0 <= i < vocab_size for i in ids.values()):
        raise RuntimeError(f"multimodal token ids {ids}: not all tokens below {vocab_size}")
    return ids


def _multimodal_config(family: str, text_config, token_ids: dict[str, int]):
    """``family``'s ConditionalGeneration config around a copy of ``text_config``."""
    import copy

    from transformers import (Gemma4AudioConfig, Gemma4Config, Gemma4VisionConfig,
                              Qwen3_5MoeConfig, Qwen3_5MoeVisionConfig)

    text_config = copy.deepcopy(text_config)
    text_config.architectures = None
    hidden = text_config.hidden_size
    if family == "qwen3_5":
        # Qwen3.5 checkpoints rotate with interleaved M-RoPE ([11, 11, 10] of 32 rotary pairs):
        # the same split of this model's pairs. Text-only positions are equal on all three
        # axes, so this is the causal model's 1-D RoPE.
        rope = dict(text_config.rope_parameters)
        head_dim = text_config.head_dim or hidden // text_config.num_attention_heads
        pairs = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
        h, w = round(pairs * 11 / 32), round(pairs * 10 / 32)
        rope.update(mrope_section=[pairs - h - w, h, w], mrope_interleaved=True)
        text_config.rope_parameters = rope
        config = Qwen3_5MoeConfig(
            text_config=text_config,
            vision_config=Qwen3_5MoeVisionConfig(**VISION_CONFIG[family], out_hidden_size=hidden),
            tie_word_embeddings=text_config.tie_word_embeddings, **token_ids)
    else:
        config = Gemma4Config(
            text_config=text_config,
            vision_config=Gemma4VisionConfig(**VISION_CONFIG[family]),
            audio_config=Gemma4AudioConfig(**AUDIO_CONFIG[family], output_proj_dims=hidden),
            tie_word_embeddings=text_config.tie_word_embeddings, **token_ids)
    config.architectures = [MULTIMODAL_ARCHITECTURE[family]]
    return config


def _to_multimodal(family: str, model, config, seed: int):
    """A ConditionalGeneration model holding exactly ``model``'s text weights; its towers (and
    multimodal embedders) keep transformers' random init, drawn from ``seed``."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    multimodal = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    cls = type(multimodal)
    if cls.__name__ != MULTIMODAL_ARCHITECTURE[family]:
        raise RuntimeError(f"{family}: transformers built {cls.__name__}")
    text_state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model."):
            text_state["model.language_model." + name[len("model."):]] = tensor
        elif name.startswith("lm_head."):
            text_state[name] = tensor
        else:
            raise RuntimeError(f"causal model tensor {name!r} has no place in {cls.__name__}")
    text_keys = {k for k in multimodal.state_dict()
                 if k.startswith(("model.language_model.", "lm_head."))}
    missing, unexpected = multimodal.load_state_dict(text_state, strict=False)
    not_copied = text_keys - set(text_state)
    if unexpected or not_copied or set(missing) & text_keys:
        raise RuntimeError(f"text weights copy into {cls.__name__}: unexpected {unexpected}, "
                           f"not copied {sorted(not_copied)}")
    return multimodal


# Granite 4.0-H's config.json files on the hub spell layer types as transformers 4 did;
# transformers 5 renames them on load (as vLLM loads configs, the CPU backend sees its names).
HUB_GRANITE_LAYER_TYPES = {"linear_attention": "mamba", "full_attention": "attention"}


def _hub_layer_types(config_path: Path) -> None:
    """Rewrite a Granite config.json's layer types in the hub's spelling."""
    config = json.loads(config_path.read_text())
    config["layer_types"] = [HUB_GRANITE_LAYER_TYPES[t] for t in config["layer_types"]]
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def build(family: str, out: str | Path, preset: str = "tiny", seed: int = 0,
          overrides: dict[str, Any] | None = None, dtype: str = "float32",
          logit_gain: float | None = None, multimodal: bool = False) -> Path:
    """Write config, safetensors weights (in ``dtype``) and tokenizer for ``family``.

    ``multimodal`` (qwen3_5, gemma4): the same text model (same weights for the same arguments)
    saved as the family's ``*ForConditionalGeneration`` checkpoint with tiny random towers."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_hybrid_neuron.tools.tokenizer import save_tokenizer

    if family not in PRESETS:
        raise ValueError(f"family={family!r}: choose one of {', '.join(FAMILIES)}")
    if preset not in PRESETS[family]:
        raise ValueError(
            f"preset={preset!r} for {family}: choose one of {', '.join(PRESETS[family])}")
    if multimodal and family not in MULTIMODAL_ARCHITECTURE:
        raise ValueError(f"multimodal=True: only for {', '.join(MULTIMODAL_ARCHITECTURE)} "
                         f"(family={family!r} has no ConditionalGeneration checkpoint)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {**PRESETS[family][preset], **(overrides or {})}

    ids = save_tokenizer(kwargs["vocab_size"], out, family)
    config = _config(family, {**kwargs, **ids})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_constants(model, torch.Generator().manual_seed(seed + 1))
    _sharpen(model, family, logit_gain if logit_gain is not None
             else LOGIT_GAIN.get((family, preset), 1.0))
    if multimodal:
        mm_ids = _multimodal_token_ids(family, out, kwargs["vocab_size"])
        model = _to_multimodal(family, model, _multimodal_config(family, config, mm_ids),
                               seed + 2)
    model = model.to(getattr(torch, dtype))  # drawn in fp32 whatever the saved dtype
    model.generation_config.update(**ids)
    model.save_pretrained(str(out), safe_serialization=True)
    if family == "granite":
        _hub_layer_types(out / "config.json")
    (out / "tiny_model.json").write_text(json.dumps(
        {"family": family, "preset": preset, "seed": seed, "dtype": dtype,
         "overrides": overrides or {}, "logit_gain": logit_gain, "multimodal": multimodal},
        indent=2) + "\n")
    return out


def _parse_set(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (JSON value), repeatable")
    parser.add_argument("--multimodal", action="store_true",
                        help="write the *ForConditionalGeneration checkpoint (qwen3_5, gemma4)")
    args = parser.parse_args(argv)
    path = build(args.family, args.out, args.preset, args.seed, _parse_set(args.set),
                 args.dtype, multimodal=args.multimodal)
    print(path)


if __name__ == "__main__":
    main()
