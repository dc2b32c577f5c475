"""Deliberate breaks: each must fail the transformers check that guards the served model.

    .venv/bin/python -m pytest -m mutation -s tests/test_mutations.py

Each case serves a broken model with vLLM + plugin (fp32) and asserts that check_logprobs -
the check test_cpu_backend.py and test_hf_equivalence.py apply - rejects it against
transformers on the unbroken checkpoint. Weight breaks edit the checkpoint vLLM loads (a term
dropped or a constant restored: what a wrong formula or wrong indexing of that tensor gives);
code breaks patch the served layer (tests/mutants/run_mutant.py); "vllm-native" serves vLLM's
own classes without the plugin. One engine per break (about a minute each), so this file runs
on request, not in CI; tests/README.md holds its table.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

from helpers import FP32_LOGPROB_TOL, check_logprobs, prompt_ids, run_vllm

pytestmark = [pytest.mark.slow, pytest.mark.mutation]

# name: (family, tensor-name suffix, new value from the old tensor)
WEIGHT_BREAKS = {
    "granite_dt_bias_dropped": ("granite", "mamba.dt_bias", torch.zeros_like),
    "granite_conv_bias_dropped": ("granite", "mamba.conv1d.bias", torch.zeros_like),
    "granite_gated_norm_weight_1": ("granite", "mamba.norm.weight", torch.ones_like),
    "granite_no_ssm_decay": ("granite", "mamba.A_log", lambda t: torch.full_like(t, -30.0)),
    "granite_D_dropped": ("granite", "mamba.D", torch.zeros_like),
    "qwen3_5_dt_bias_dropped": ("qwen3_5", "linear_attn.dt_bias", torch.zeros_like),
    "qwen3_5_beta_fixed_half": ("qwen3_5", "linear_attn.in_proj_b.weight", torch.zeros_like),
    "qwen3_5_gated_norm_weight_1": ("qwen3_5", "linear_attn.norm.weight", torch.ones_like),
    "qwen3_5_no_decay": ("qwen3_5", "linear_attn.A_log", lambda t: torch.full_like(t, -30.0)),
    "gemma4_layer_scalar_1": ("gemma4", "layer_scalar", torch.ones_like),
    "gemma4_per_expert_scale_1": ("gemma4", "router.per_expert_scale", torch.ones_like),
    "gemma4_q_norm_weight_1": ("gemma4", "self_attn.q_norm.weight", torch.ones_like),
}
CODE_BREAKS = {"qwen3_5_decay_sign_flipped": "qwen3_5", "gemma4_no_v_norm": "gemma4",
               "qwen3_5_decode_dt_bias_dropped": "qwen3_5"}
# vLLM 0.32's own Granite normalises the Mamba2 gated norm per group (the plugin fixes it).
NATIVE_BREAKS = {"granite_vllm_native_gated_norm": "granite"}
MUTANT_RUNNER = os.path.join(os.path.dirname(__file__), "mutants", "run_mutant.py")


def _serve(model_dir: str, prompts, env=None, command=None, dtype="float32") -> dict:
    return run_vllm({"model": model_dir, "dtype": dtype, "prompts": prompts,
                     "max_tokens": 16, "logprobs": True,
                     "llm_kwargs": {"enable_prefix_caching": False}}, env=env, command=command)


def _assert_caught(name: str, reference_dir: str, prompts, result: dict) -> None:
    rnd = result["rounds"][0]
    check = check_logprobs(reference_dir, "float32", prompts, rnd["outputs"], rnd["logprobs"])
    print(f"MUTATION | {name} | {check.logprob_err:.3g} | {check.deficit:.3g} | "
          f"{'; '.join(check.problems()) or 'NOT CAUGHT'}")
    assert check.problems(), f"{name} passed the transformers check: {check}"
    assert check.logprob_err > 10 * FP32_LOGPROB_TOL  # caught by a wide margin


def _broken_copy(reference: str, tmp_path, name: str) -> str:
    from safetensors.torch import load_file, save_file

    _, suffix, new = WEIGHT_BREAKS[name]
    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    weights = load_file(broken / "model.safetensors")
    hit = [k for k in weights if k.endswith(suffix)]
    assert hit, f"no tensor ends with {suffix}"
    for key in hit:
        assert not torch.equal(weights[key], new(weights[key])), f"{key} already unbroken"
        weights[key] = new(weights[key])
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return str(broken)


@pytest.mark.parametrize("name", list(WEIGHT_BREAKS))
def test_weight_break_is_caught(tiny_model_dir, tmp_path, name):
    reference = tiny_model_dir(WEIGHT_BREAKS[name][0])
    prompts = prompt_ids(reference)
    _assert_caught(name, reference, prompts, _serve(_broken_copy(reference, tmp_path, name), prompts))


# The bf16 check (helpers.LogprobCheck: rms and per-token bounds scaled by transformers' own
# bf16 run) against the same kind of breaks, served in bf16. Its resolution is bf16's: the
# subtlest fp32 break above, qwen3_5_dt_bias_dropped (fp32 logprob error 0.035), served in bf16
# measured rms 0.022 / worst token 0.116 against the unbroken model's 0.019 / 0.118 (Zen 4,
# 2026-12-07) - no bf16 check tells them apart; the fp32 checks are the ones that do.
@pytest.mark.parametrize("name", ["granite_D_dropped", "qwen3_5_no_decay",
                                  "gemma4_q_norm_weight_1"])
def test_bf16_weight_break_is_caught(tiny_model_dir, tmp_path, name):
    reference = tiny_model_dir(WEIGHT_BREAKS[name][0])
    prompts = prompt_ids(reference)
    rnd = _serve(_broken_copy(reference, tmp_path, name), prompts, dtype="bfloat16")["rounds"][0]
    check = check_logprobs(reference, "bfloat16", prompts, rnd["outputs"], rnd["logprobs"])
    print(f"MUTATION bf16 | {name} | {check} | {'; '.join(check.problems()) or 'NOT CAUGHT'}")
    assert check.problems(), f"{name} passed the bf16 transformers check: {check}"


@pytest.mark.parametrize("name", list(CODE_BREAKS))
def test_code_break_is_caught(tiny_model_dir, name):
    reference = tiny_model_dir(CODE_BREAKS[name])
    prompts = prompt_ids(reference)
    result = _serve(reference, prompts, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                    command=[sys.executable, MUTANT_RUNNER, name])
    _assert_caught(name, reference, prompts, result)


@pytest.mark.parametrize("name", list(NATIVE_BREAKS))
def test_vllm_native_break_is_caught(tiny_model_dir, name):
    reference = tiny_model_dir(NATIVE_BREAKS[name])
    prompts = prompt_ids(reference)
    result = _serve(reference, prompts, env={"VLLM_PLUGINS": ""})
    assert not any("vllm_hybrid_neuron" in c for c in result["served_classes"])
    _assert_caught(name, reference, prompts, result)
