"""CPU backend: Granite's Mamba2 and Qwen3.5's Gated DeltaNet layers on the plugin's ops.

For each family and dtype, one baseline engine (no speculation, no prefix caching)
gives reference tokens; engines with ngram speculation (1 and 3 drafts), with prefix
caching (the default: cold, warm and shared-prefix rounds, prompts of 1.1, 2.5 and 4 cache
blocks among them) and with tensor parallelism must reproduce them (fp32 prefix caching and
ngram 3 in vLLM's default compiled mode, the rest eager), and every run must agree with
transformers: greedy tokens and each generated token's log-probability (helpers.LogprobCheck).
Greedy, 48 tokens, 6 concurrent prompts of 5 to 700 tokens crossing several cache blocks.
"""

from __future__ import annotations

import functools
import re

import pytest

from helpers import (MARGIN, amx_keeps_vllm_experts, check_logprobs, hf_model,
                     plugin_linear_expected, run_vllm, same_greedy_tokens)

pytestmark = pytest.mark.slow

FAMILIES = ["granite", "qwen3_5"]
DTYPES = ["float32", "bfloat16"]
MAX_TOKENS = 48
EXPECTED_OPS = {"granite": {"mamba2_prefill", "mamba2_decode"},
                "qwen3_5": {"gdn_prefill", "gdn_decode"}}


def _assert_ops_ran(family: str, dtype: str, mode: str, result: dict,
                    recurrent: set[str] | None = None) -> None:
    """The plugin ops the run must have called: the family's recurrent ops (``recurrent``,
    default EXPECTED_OPS), counted by the op probe, and the routed experts' moe_experts (the
    default wherever vLLM would run its portable kernel; on AMX CPUs vLLM's bf16 experts keep its
    AMX kernel): counted in eager runs, and in compiled ones, where Dynamo traces the experts'
    apply into the graph and no Python runs per call, from the load-time swap's log line.
    In bf16, on CPUs where the plugin takes the dense projections (no oneDNN bf16 matmul, or
    AVX512-BF16 without AMX), bf16_linear too (bf16 engines here run eager)."""
    counts = result["plugin_op_counts"][0]
    called = {k for k, v in counts.items() if v > 0}
    assert (EXPECTED_OPS[family] if recurrent is None else recurrent) <= called, counts
    if plugin_linear_expected(dtype):
        taken = re.search(r"(\d+) linear layers / LM head run bf16_linear", result["log"])
        assert taken and int(taken.group(1)) > 0, "dense projections not on bf16_linear"
        assert counts.get("bf16_linear", 0) > 0, counts
    if amx_keeps_vllm_experts(dtype):
        return
    swapped = re.search(r"(\d+) MoE layers run the plugin's moe_experts op", result["log"])
    assert swapped and int(swapped.group(1)) > 0, "routed experts not on the plugin's op"
    if not (dtype == "float32" and mode in COMPILED_MODES):
        assert counts.get("moe_experts", 0) > 0, counts


# Engines in vLLM's default (compiled) mode, as users get it: fp32 prefix caching and ngram 3;
# the same modes run eager in bf16 (a compiled engine starts ~90 s slower, so modes share it).
COMPILED_MODES = ("prefix_caching", "ngram3")
NGRAM = {"method": "ngram", "prompt_lookup_max": 3, "prompt_lookup_min": 1}
# Prefix-caching prompts, in cache blocks (the block size is vLLM's choice: attention pages
# padded to hold a Mamba / GDN state page): one block plus a tail, and 1.1, 2.5 and 4 blocks.
BLOCK_PROMPTS = [(1, 16), (1.1, 0), (2.5, 0), (4, 0)]


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


def _logged_block_size(log: str) -> int:
    """The hybrid cache block size the engine core laid its KV cache out with."""
    import re

    match = re.search(r"kv lcm block sizes (\d+)", log)
    assert match, "vLLM no longer logs the hybrid block size"
    return int(match.group(1))


@functools.cache
def _run(model_dir: str, dtype: str, mode: str) -> dict:
    prompts, shared = _prompts(model_dir)
    request = {"model": model_dir, "dtype": dtype, "prompts": prompts + [shared],
               "max_tokens": MAX_TOKENS, "max_model_len": 1024, "logprobs": True,
               "llm_kwargs": {"enable_prefix_caching": False}}
    env = None
    if mode == "prefix_caching":
        # Cold batch, then the same batch again, then prompts sharing a long prefix. vLLM
        # keeps a reusable state where its scheduler ends a prefill chunk on a block boundary
        # (align mode), so prompts are also sized in blocks (generate.py resolves them).
        story = prompts[4] * 8
        blocks = [{"source": story, "blocks": b, "plus": plus} for b, plus in BLOCK_PROMPTS]
        request.update(
            prompts=prompts + blocks, rounds=2,
            later_rounds=[[shared], [{"source": story, "blocks": 1, "plus": 8,
                                      "suffix": prompts[0]}]],
            max_model_len=4096, llm_kwargs={})
    elif mode.startswith("ngram"):
        request["llm_kwargs"]["speculative_config"] = {
            **NGRAM, "num_speculative_tokens": int(mode[len("ngram"):])}
    elif mode == "tp2":
        request["llm_kwargs"]["tensor_parallel_size"] = 2
        env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    if dtype == "float32" and mode in COMPILED_MODES:
        request["llm_kwargs"]["enforce_eager"] = False
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
    """Every token of every round of ``result`` against transformers, teacher-forced on its own
    tokens. One check over the whole run: in bf16 the bound scales with transformers' own bf16
    error, and over a single 48-token prompt that is too small a sample (per prompt, the ratio
    of the two errors ranged 0.5x to 7x on the same engine whose whole-run ratio was 1.7x)."""
    prompts, outputs, logprobs = [], [], []
    for batch, rnd in zip(result["batches"], result["rounds"], strict=True):
        prompts += batch
        outputs += rnd["outputs"]
        logprobs += rnd["logprobs"]
    check = check_logprobs(model_dir, dtype, prompts, outputs, logprobs)
    print(f"{label}: {check}")
    assert not check.problems(), f"{label}: {check}"


def test_baseline_matches_transformers_on_plugin_ops(case):
    family, dtype, model_dir = case
    result = _run(model_dir, dtype, "baseline")
    _assert_ops_ran(family, dtype, "baseline", result)
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} {dtype} baseline")


@pytest.mark.parametrize("drafts", [1, 3])
def test_ngram_speculation_keeps_greedy_tokens(case, drafts):
    family, dtype, model_dir = case
    mode = f"ngram{drafts}"
    result = _run(model_dir, dtype, mode)
    outputs, baseline = result["rounds"][0]["outputs"], _baseline(model_dir, dtype)
    if dtype == "float32" and mode in COMPILED_MODES:  # compiled kernels round differently
        assert not same_greedy_tokens(hf_model(model_dir), result["batches"][0], outputs,
                                      baseline, MARGIN[dtype])
    else:
        assert outputs == baseline
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} {dtype} ngram{drafts}")
    metrics = result["metrics"]
    proposed = metrics["vllm:spec_decode_num_draft_tokens"]
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"]
    assert 0 < accepted < proposed, metrics  # drafts both accepted and rejected
    # every decode step here verifies drafts: the spec-decode op, not the plain decode one
    decode_op = "mamba2_spec_decode" if family == "granite" else "gdn_spec_decode"
    _assert_ops_ran(family, dtype, mode, result, {decode_op})


def _assert_prefix_caching(model_dir: str, dtype: str, result: dict) -> None:
    """Cold, warm and shared-prefix rounds: the baseline's tokens (near-ties aside), every
    block-sized prompt hitting each block before its last token, transformers' logprobs."""
    block = result["block_size"]
    assert _logged_block_size(result["log"]) == block  # front end and engine core agree
    cold, warm, shared, probe_shared = result["rounds"]
    batch, baseline = result["batches"][0], _baseline(model_dir, dtype)
    # Cache hits change how steps are batched: the runs must agree, near-ties aside (a 16-token
    # prompt once parted at a candidate pair 0.0017 logits apart in fp32).
    model, margin = hf_model(model_dir), MARGIN[dtype]
    assert not same_greedy_tokens(model, batch[:6], cold["outputs"][:6], baseline[:6], margin)
    assert not same_greedy_tokens(model, batch, warm["outputs"], cold["outputs"], margin)
    assert not same_greedy_tokens(model, result["batches"][2], shared["outputs"], baseline[6:],
                                  margin)
    # A repeated prompt of n tokens reuses the state after its last whole block before token n.
    lengths = [len(p) for p in batch[6:]]
    assert warm["cached_tokens"][6:] == [(n - 1) // block * block for n in lengths], (
        block, lengths, warm["cached_tokens"])
    # and so does a prompt sharing one block (plus 8 tokens) with them
    assert probe_shared["cached_tokens"] == [block]
    _assert_transformers_logprobs(model_dir, dtype, result, f"{dtype} prefix caching")


def test_prefix_caching_keeps_greedy_tokens_and_hits(case):
    family, dtype, model_dir = case
    result = _run(model_dir, dtype, "prefix_caching")
    _assert_ops_ran(family, dtype, "prefix_caching", result)
    _assert_prefix_caching(model_dir, dtype, result)


@pytest.mark.parametrize("dtype", ["float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_2_keeps_greedy_tokens(tiny_model_dir, family, dtype):
    model_dir = tiny_model_dir(family)
    result = _run(model_dir, dtype, "tp2")
    assert len(result["served_classes"]) == 2
    _assert_ops_ran(family, dtype, "tp2", result)  # rank 0: its half of each expert
    assert result["rounds"][0]["outputs"] == _baseline(model_dir, dtype)
    _assert_transformers_logprobs(model_dir, dtype, result, f"{family} {dtype} tp2")
