"""Gemma 4 on prompts of several sliding windows and longer than one scheduler step.

A review reported vLLM's Gemma 4 departing from transformers in fp32 on a 691-token prompt
(sliding window 64, random norm weights) while prompts up to 314 tokens were exact. On this
project's machines it does not reproduce (eager or compiled, batched or not); this test keeps
the case: a tiny Gemma 4 with window 64, random norm weights and router scales and sharpened
logits (final norm x8: top-2 gaps of whole logits), prompts of 1 token and 1, 2.5, 5 and ~11
windows, the longest split over three scheduler steps (max_num_batched_tokens 256), served in
vLLM's default compiled mode with prefix caching on. Every generated token's log-probability
must be within 1e-3 of transformers' fp32 teacher-forced one, and be its argmax.
"""

from __future__ import annotations

import pytest
import torch

from helpers import hf_logprobs, hf_model, run_vllm

pytestmark = pytest.mark.slow

WINDOW = 64
LENGTHS = [1, WINDOW, int(2.5 * WINDOW), 5 * WINDOW, 700]
STEP_TOKENS = 256


@pytest.fixture(scope="module")
def sharp_gemma4(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    from vllm_hybrid_neuron.tools.tiny import build

    out = build("gemma4", tmp_path_factory.mktemp("gemma4-window64"),
                overrides={"sliding_window": WINDOW})
    path = f"{out}/model.safetensors"
    sd = load_file(path)
    g = torch.Generator().manual_seed(4)
    sd["model.norm.weight"] = sd["model.norm.weight"] * 8  # sharper logits
    for key in [k for k in sd if k.endswith(("router.scale", "router.per_expert_scale"))]:
        sd[key] = 0.5 + torch.rand(sd[key].shape, generator=g)
    save_file(sd, path, metadata={"format": "pt"})
    return str(out)


def test_long_prompts_match_transformers_logprobs(sharp_gemma4):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 500, (n,), generator=g).tolist() for n in LENGTHS]
    result = run_vllm({"model": sharp_gemma4, "dtype": "float32", "prompts": prompts,
                       "max_tokens": 8, "logprobs": True,
                       "llm_kwargs": {"enforce_eager": False,
                                      "max_num_batched_tokens": STEP_TOKENS}})
    model = hf_model(sharp_gemma4)
    round0 = result["rounds"][0]
    worst = 0.0
    for prompt, tokens, logprobs in zip(prompts, round0["outputs"], round0["logprobs"]):
        ref, argmax = hf_logprobs(model, prompt, tokens)
        diff = max(abs(a - b) for a, b in zip(logprobs, ref))
        worst = max(worst, diff)
        print(f"gemma4 prompt {len(prompt)}: max |logprob diff| {diff:.2e}")
        assert diff <= 1e-3, f"prompt of {len(prompt)} tokens: logprobs off by {diff:.4f}"
        assert tokens == argmax, f"prompt of {len(prompt)} tokens: not transformers' argmax"
    assert max(-min(r) for r in round0["logprobs"]) > 0.05  # not a degenerate model
