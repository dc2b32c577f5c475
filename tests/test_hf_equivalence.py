"""vLLM + plugin against transformers on each family's tiny model: greedy tokens and the
log-probability of every generated token (teacher-forced, transformers fp32 as reference;
bounds in helpers.py). The models have every constant-initialised tensor randomised and
sharpened logits (tools/tiny.py); tests/README.md shows their top-2 gap distributions and
the deliberate breaks these checks catch.

Granite and Qwen3.5 are checked in both dtypes, with speculation, prefix caching, TP=2 and
vLLM's compiled mode by test_cpu_backend.py; this file adds Gemma 4 (compiled, speculation,
prefix caching and long prompts: test_gemma4_long_prompts.py), the plugin's MoE op and the
*ForConditionalGeneration checkpoints of Qwen3.5 and Gemma 4, eager.
"""

from __future__ import annotations

import pytest

from helpers import amx_keeps_vllm_experts, check_logprobs, prompt_ids, run_vllm

# Granite and Qwen3.5 causal checkpoints on the default experts kernel (the plugin's op) are
# test_cpu_backend.py's baselines; "vllm" rows keep vLLM's kernel covered. "multimodal": the
# *ForConditionalGeneration checkpoint users have (nested text_config, vision / audio tower
# weights), served text-only (--language-model-only).
M = "vllm_hybrid_neuron.cpu.models."
PARAMS = [  # family, dtype, MoE kernel, checkpoint, the class vLLM serves
    ("granite", "float32", "vllm", "causal", M + "granite_moe_hybrid:GraniteMoeHybridForCausalLM"),
    ("qwen3_5", "bfloat16", "plugin", "multimodal",
     M + "qwen3_5_moe:Qwen3_5MoeForConditionalGeneration"),
    ("gemma4", "float32", "auto", "causal", M + "gemma4:Gemma4ForCausalLM"),
    ("gemma4", "float32", "plugin", "multimodal", M + "gemma4:Gemma4ForConditionalGeneration"),
    ("gemma4", "bfloat16", "vllm", "causal", M + "gemma4:Gemma4ForCausalLM"),
]


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype,moe,checkpoint,served_class", PARAMS,
                         ids=[f"{f}-{d}-{'vllm' if m == 'vllm' else 'plugin'}-moe-{c}"
                              for f, d, m, c, _ in PARAMS])
def test_matches_transformers(tiny_model_dir, family, dtype, moe, checkpoint, served_class):
    multimodal = checkpoint == "multimodal"
    model_dir = tiny_model_dir(family, multimodal=multimodal)
    prompts = prompt_ids(model_dir)
    assert max(len(p) for p in prompts) > 300
    llm_kwargs = {"enable_prefix_caching": False}
    if multimodal:
        llm_kwargs["language_model_only"] = True
    result = run_vllm({"model": model_dir, "dtype": dtype, "prompts": prompts,
                       "max_tokens": 32, "logprobs": True, "llm_kwargs": llm_kwargs},
                      env={"VLLM_HYBRID_NEURON_MOE": moe})
    assert result["served_classes"] == [served_class]
    assert "vllm-hybrid-neuron" in result["log"] and "backend=cpu" in result["log"]
    # The routed experts run where chosen: the plugin's op by default ("auto") or on request,
    # wherever vLLM would run its portable kernel; vLLM's with "vllm"; on AMX CPUs vLLM's bf16
    # experts use its AMX grouped GEMM, which the plugin keeps (and says so).
    amx_experts = amx_keeps_vllm_experts(dtype)
    uses_op = result["plugin_op_counts"][0].get("moe_experts", 0) > 0
    assert uses_op == (moe != "vllm" and not amx_experts)
    if moe != "vllm" and amx_experts:
        assert "vLLM's kernel kept for X86CPUUnquantizedExperts" in result["log"]

    outputs, logprobs = result["rounds"][0]["outputs"], result["rounds"][0]["logprobs"]
    # A model stuck on one token would agree with anything: demand varied output.
    assert len({t for out in outputs for t in out}) >= 16
    assert all(len(out) == 32 for out in outputs)
    check = check_logprobs(model_dir, dtype, prompts, outputs, logprobs)
    print(f"{family} {dtype} moe={moe}: {check}")
    assert not check.problems(), f"{family} {dtype}: {check}"
