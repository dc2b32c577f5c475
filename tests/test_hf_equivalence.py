"""Greedy tokens from vLLM + plugin agree with transformers on each family's tiny model."""

from __future__ import annotations

import pytest
import torch

from helpers import MARGIN, check_against_hf, hf_model, prompt_ids, run_vllm

# fp32 for Granite and Gemma 4; Qwen3.5 in bf16 (vLLM 0.32's GDN on CPU needs bf16).
CASES = [
    ("granite", "float32", "vllm_hybrid_neuron.cpu.models.granite_moe_hybrid:GraniteMoeHybridForCausalLM"),
    ("qwen3_5", "bfloat16", "vllm_hybrid_neuron.cpu.models.qwen3_5_moe:Qwen3_5MoeForCausalLM"),
    ("gemma4", "float32", "vllm_hybrid_neuron.cpu.models.gemma4:Gemma4ForCausalLM"),
]


@pytest.mark.slow
@pytest.mark.parametrize("moe", ["auto", "plugin"], ids=["vllm-moe", "plugin-moe"])
@pytest.mark.parametrize("family,dtype,served_class", CASES, ids=[c[0] for c in CASES])
def test_greedy_matches_transformers(tiny_model_dir, family, dtype, served_class, moe):
    model_dir = tiny_model_dir(family)
    prompts = prompt_ids(model_dir)
    assert max(len(p) for p in prompts) > 300
    # Prefix caching off: vLLM 0.32's CPU Mamba2 prefill crashes in its "align" mode on
    # prompts longer than a block (test_cpu_backend.py::test_prefix_caching_keeps_greedy_tokens_and_hits
    # covers the plugin's fix).
    result = run_vllm({"model": model_dir, "dtype": dtype, "prompts": prompts,
                       "max_tokens": 32, "llm_kwargs": {"enable_prefix_caching": False}},
                      env={"VLLM_HYBRID_NEURON_MOE": moe})
    assert result["served_classes"] == [served_class]
    assert "vllm-hybrid-neuron" in result["log"] and "backend=cpu" in result["log"]
    # The routed experts run where chosen: vLLM's kernel by default, the plugin's op on request
    # wherever vLLM would run its portable kernel; on AMX CPUs vLLM's bf16 experts use its AMX
    # grouped GEMM, which the plugin keeps (and says so).
    amx_experts = dtype == "bfloat16" and torch.cpu._is_amx_tile_supported()
    uses_op = result["plugin_op_counts"][0].get("moe_experts", 0) > 0
    assert uses_op == (moe == "plugin" and not amx_experts)
    if moe == "plugin" and amx_experts:
        assert "vLLM's kernel kept for X86CPUUnquantizedExperts" in result["log"]

    outputs = result["rounds"][0]["outputs"]
    # A model stuck on one token would agree with anything: demand varied output.
    assert len({t for out in outputs for t in out}) >= 16
    model = hf_model(model_dir)
    for prompt, generated in zip(prompts, outputs):
        assert len(generated) == 32
        check = check_against_hf(model, prompt, generated)
        print(f"{family} {dtype} prompt {len(prompt)} tokens: worst deficit "
              f"{check.worst_deficit:.4f}, generate prefix {check.generate_prefix_match}/8")
        assert check.worst_deficit <= MARGIN[dtype], (
            f"{family} prompt of {len(prompt)} tokens: a chosen token is "
            f"{check.worst_deficit:.4f} logits below transformers' argmax")
        assert check.matches_generate(8, MARGIN[dtype]), (
            f"{family}: only {check.generate_prefix_match} leading tokens equal "
            f"transformers' generate, and the first difference is not a near-tie "
            f"({check.divergence_gap:.4f} logits)")
