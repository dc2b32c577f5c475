"""CPU backend: Granite's Mamba2 and Qwen3.5's Gated DeltaNet layers on the plugin's ops.

For each family and dtype, one baseline engine (no speculation, no prefix caching)
gives reference tokens; engines with ngram speculation (1 and 3 drafts), with prefix
caching (the default), with tensor parallelism and in vLLM's default compiled mode (ngram
speculation and prefix caching on, fp32) must reproduce them, and every run must agree with
transformers: greedy tokens and each generated token's log-probability (helpers.LogprobCheck).
Greedy, 48 tokens, 5 concurrent prompts of 5 to 700 tokens crossing several cache blocks.
"""

from __future__ import annotations

import functools

import pytest

from helpers import MARGIN, check_logprobs, hf_model, run_vllm, same_greedy_tokens

pytestmark = pytest.mark.slow

FAMILIES = ["granite", "qwen3_5"]
DTYPES = ["float32", "bfloat16"]
MAX_TOKENS = 48
EXPECTED_OPS = {"granite": {"mamba2_prefill", "mamba2_decode"},
                "qwen3_5": {"gdn_prefill", "gdn_decode"}}
NGRAM = {"method": "ngram", "prompt_lookup_max": 3, "prompt_lookup_min": 1}
# Hybrid cache block sizes vLLM picks for these models (attention pages padded to match
# the Mamba / GDN state page), for the block-aligned prefix-caching probes.
BLOCK_CANDIDATES = [128, 256, 384, 512, 640, 768, 896]


@functools.cache
def _prompts(model_dir: str) -> tuple[list[list[int]], list[int]]:
    """Six prompts - 5, 16, 64, 300 and 700 tokens, and an "echo" prompt that repeats
    the first one after transformers' own greedy continuation of it (so ngram drafts
    are proposed and some accepted) - and a seventh sharing the 700-token one's first
    650 tokens."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    story = ids(("Serving a language model means batching requests, caching keys and "
                 "values, and streaming tokens back to each client. ") * 40)
    hello = ids("Hello, my name is")[:5]
    continuation = hf_model(model_dir).generate(
        torch.tensor([hello]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0]
    echo = continuation.tolist() + hello
    prompts = [hello, ids("a b c d a b c d a b c d a b c d")[:16],
               ids("1 2 3 4 5 1 2 3 4 5 1 2 3 4 5 " * 4)[:64], story[:300], story[:700], echo]
    assert [len(p) for p in prompts] == [5, 16, 64, 300, 700, 34]
    shared = story[:650] + ids(" The capital of France is Paris.")
    return prompts, shared


def _block_size(log: str) -> int:
    """The hybrid cache block size vLLM chose (it depends on family and dtype)."""
    import re

    match = re.search(r"kv lcm block sizes (\d+)", log) or re.search(
        r"Setting attention block size to (\d+) tokens", log)
    assert match, "vLLM no longer logs the hybrid block size"
    return int(match.group(1))


@functools.cache
def _run(model_dir: str, dtype: str, mode: str) -> dict:
    prompts, shared = _prompts(model_dir)
    request = {"model": model_dir, "dtype": dtype, "prompts": prompts + [shared],
               "max_tokens": MAX_TOKENS, "max_model_len": 1024, "logprobs": True,
               "llm_kwargs": {"enable_prefix_caching": False}}
    env = None
    if mode in ("prefix_caching", "compiled"):
        # Cold batch, then the same batch again, then prompts sharing a long prefix.
        # vLLM keeps a reusable state only where its scheduler ends a prefill chunk on
        # a block boundary that decoding will not overwrite, so block-aligned probes
        # (one block plus a tail) are sent for each block size vLLM may choose.
        story = prompts[4] * 4
        request.update(
            prompts=prompts + [story[:b + 16] for b in BLOCK_CANDIDATES], rounds=2,
            later_rounds=[[shared], [story[:b + 8] + prompts[0] for b in BLOCK_CANDIDATES]],
            max_model_len=2048, llm_kwargs={})
        if mode == "compiled":  # vLLM's default mode. (Not with speculation: the plugin turns
            # prefix caching off under speculation, cpu/config_hooks.py; then vLLM sets the
            # hybrid block size to max_model_len and no probe can hit.)
            request["llm_kwargs"] = {"enforce_eager": False}
    elif mode.startswith("ngram"):
        request["llm_kwargs"]["speculative_config"] = {
            **NGRAM, "num_speculative_tokens": int(mode[len("ngram"):].removesuffix("-compiled"))}
        if mode.endswith("-compiled"):
            request["llm_kwargs"]["enforce_eager"] = False
    elif mode == "tp2":
        request["llm_kwargs"]["tensor_parallel_size"] = 2
        env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    result = run_vllm(request, env=env)
    result["request"] = request
    return result


@pytest.fixture(params=[(f, d) for f in FAMILIES for d in DTYPES],
                ids=[f"{f}-{d}" for f in FAMILIES for d in DTYPES])
def case(request, tiny_model_dir):
    family, dtype = request.param
    return family, dtype, tiny_model_dir(family)


def _baseline(model_dir, dtype):
    return _run(model_dir, dtype, "baseline")["rounds"][0]["outputs"]


def _assert_transformers_logprobs(model_dir, dtype, result, label):
    """Every round of ``result`` against transformers, teacher-forced on its own tokens."""
    prompts = [result["request"]["prompts"]] * result["request"].get("rounds", 1)
    prompts += result["request"].get("later_rounds", [])
    for i, (batch, rnd) in enumerate(zip(prompts, result["rounds"], strict=True)):
        check = check_logprobs(model_dir, dtype, batch, rnd["outputs"], rnd["logprobs"])
        print(f"{label} round {i}: {check}")
        assert not check.problems(), f"{label} round {i}: {check}"


def test_baseline_matches_transformers_on_plugin_ops(case):
    family, dtype, model_dir = case
    result = _run(model_dir, dtype, "baseline")
    counts = result["plugin_op_counts"][0]
    assert EXPECTED_OPS[family] <= {k for k, v in counts.items() if v > 0}, counts
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} {dtype} baseline")


@pytest.mark.parametrize("drafts", [1, 3])
def test_ngram_speculation_keeps_greedy_tokens(case, drafts):
    family, dtype, model_dir = case
    result = _run(model_dir, dtype, f"ngram{drafts}")
    assert result["rounds"][0]["outputs"] == _baseline(model_dir, dtype)
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} {dtype} ngram{drafts}")
    metrics = result["metrics"]
    proposed = metrics["vllm:spec_decode_num_draft_tokens"]
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"]
    assert 0 < accepted < proposed, metrics  # drafts both accepted and rejected
    counts = result["plugin_op_counts"][0]
    decode_op = "mamba2_decode" if family == "granite" else "gdn_spec_decode"
    assert counts.get(decode_op, 0) > 0, counts


def test_prefix_caching_keeps_greedy_tokens_and_hits(case):
    family, dtype, model_dir = case
    result = _run(model_dir, dtype, "prefix_caching")
    block = _block_size(result["log"])
    assert block in BLOCK_CANDIDATES, f"no probe for block size {block}"
    probe = 6 + BLOCK_CANDIDATES.index(block)
    baseline = _baseline(model_dir, dtype)
    cold, warm, shared, probes_shared = result["rounds"]
    # Cache hits change how steps are batched: the runs must agree, near-ties aside (a 16-token
    # prompt once parted at a candidate pair 0.0017 logits apart in fp32).
    model, margin = hf_model(model_dir), MARGIN[dtype]
    prompts = result["request"]["prompts"]
    assert not same_greedy_tokens(model, prompts[:6], cold["outputs"][:6], baseline[:6], margin)
    # the block-aligned probes too
    assert not same_greedy_tokens(model, prompts, warm["outputs"], cold["outputs"], margin)
    shared_prompts = result["request"]["later_rounds"][0]
    assert not same_greedy_tokens(model, shared_prompts, shared["outputs"], baseline[6:], margin)
    assert warm["cached_tokens"][probe] > 0  # the repeated probe hits
    # and so does a prompt sharing its prefix, whose tokens are still transformers'
    assert probes_shared["cached_tokens"][probe - 6] > 0
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} {dtype} prefix caching")


@pytest.mark.parametrize("dtype", ["float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_2_keeps_greedy_tokens(tiny_model_dir, family, dtype):
    model_dir = tiny_model_dir(family)
    result = _run(model_dir, dtype, "tp2")
    assert len(result["served_classes"]) == 2
    assert result["rounds"][0]["outputs"] == _baseline(model_dir, dtype)
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} {dtype} tp2")


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_mode_with_prefix_caching(tiny_model_dir, family):
    """vLLM's default (compiled) mode, as users get it, with prefix caching: same tokens as the
    eager baseline (near-ties aside), cache hits, transformers' log-probabilities, the plugin's
    ops in the path."""
    dtype, model_dir = "float32", tiny_model_dir(family)
    result = _run(model_dir, dtype, "compiled")
    counts = result["plugin_op_counts"][0]
    assert EXPECTED_OPS[family] <= {k for k, v in counts.items() if v > 0}, counts
    baseline = _baseline(model_dir, dtype)
    model, prompts = hf_model(model_dir), result["request"]["prompts"]
    cold, warm = result["rounds"][:2]
    assert not same_greedy_tokens(model, prompts[:6], cold["outputs"][:6], baseline[:6],
                                  MARGIN[dtype])
    assert not same_greedy_tokens(model, prompts, warm["outputs"], cold["outputs"], MARGIN[dtype])
    probe = 6 + BLOCK_CANDIDATES.index(_block_size(result["log"]))
    assert warm["cached_tokens"][probe] > 0
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} compiled")


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_mode_with_speculation(tiny_model_dir, family):
    """vLLM's default (compiled) mode with ngram speculation (3 drafts): the eager baseline's
    tokens (near-ties aside), drafts accepted, transformers' log-probabilities."""
    dtype, model_dir = "float32", tiny_model_dir(family)
    result = _run(model_dir, dtype, "ngram3-compiled")
    prompts = result["request"]["prompts"]
    assert not same_greedy_tokens(hf_model(model_dir), prompts, result["rounds"][0]["outputs"],
                                  _baseline(model_dir, dtype), MARGIN[dtype])
    assert result["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} compiled ngram3")
