"""Test helpers: run vLLM in a subprocess, re-score its tokens with transformers."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

# Near-tie margins (logits) for comparing two vLLM runs' greedy tokens (same_greedy_tokens).
MARGIN = {"float32": 0.02, "bfloat16": 0.25}
# vLLM + plugin against transformers fp32, teacher-forced on vLLM's tokens (LogprobCheck):
# fp32: every generated token's log-probability within FP32_LOGPROB_TOL, and no chosen token
# more than FP32_MARGIN logits below transformers' argmax. bf16: no further from transformers
# fp32 than BF16_FACTOR times transformers' own bf16 run on the same tokens, for the
# log-probabilities (worst token, and root-mean-square over all tokens) and for the chosen
# tokens' deficits (a near-tie in bf16 is a gap within the logit error transformers' bf16 run
# itself shows). The rms bound was added on 2026-12-07: on a Zen 4 machine (AVX512-BF16, no AMX)
# three of 128 tiny-Qwen3.5 tokens sat at 0.09-0.12 whichever kernels the plugin used (vLLM's
# own bf16 layers), so a worst token alone is a sample of a few outliers.
FP32_LOGPROB_TOL, FP32_MARGIN, BF16_FACTOR = 1e-3, 2e-3, 3.0

_TEXTS = [
    "Hello, my name is",
    "The capital of France is",
    "a b c d a b c d a b c d a b c",
]
_LONG_TEXT = (
    "Serving a language model means batching requests, caching keys and values, "
    "and streaming tokens back to each client as soon as they are ready. "
) * 8


def prompt_ids(model_dir: str, long_tokens: int = 320) -> list[list[int]]:
    """Three short prompts and one of ``long_tokens`` tokens, as token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in _TEXTS]
    long = tok(_LONG_TEXT * 4, add_special_tokens=False)["input_ids"][:long_tokens]
    assert len(long) == long_tokens
    return prompts + [long]


def amx_keeps_vllm_experts(dtype: str) -> bool:
    """Whether the routed experts stay on vLLM's kernel whatever VLLM_HYBRID_NEURON_MOE says:
    on AMX CPUs vLLM's bf16 experts are its AMX grouped GEMM, which the plugin keeps (it
    replaces only the portable "vec" kernel)."""
    return dtype == "bfloat16" and torch.cpu._is_amx_tile_supported()


def plugin_linear_expected(dtype: str) -> bool:
    """Whether the plugin's model classes run their dense projections on bf16_linear here: bf16
    weights, on a CPU where the plugin takes them (cpu/layers/bf16_linear_layers.py: no oneDNN
    bf16 matmul, or AVX512-BF16 without AMX)."""
    from vllm_hybrid_neuron.cpu.layers.bf16_linear_layers import plugin_linear_wanted

    return dtype == "bfloat16" and plugin_linear_wanted()


# Engine core and worker inside the generate process (no EngineCore / worker processes):
# vLLM's in-process engine and its "uni" executor run the same model code, kernels and
# scheduler, without two more spawned processes that each import vLLM and a worker shutdown
# wait (a tiny-model engine test took 62 s with them, 26 s without, same tokens and
# log-probabilities). vLLM's process layout stays covered: tensor-parallel runs keep it here,
# and test_serve / test_abort serve through `vllm serve`.
IN_PROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def run_vllm(request: dict, env: dict | None = None, timeout: int = 600,
             command: list[str] | None = None) -> dict:
    """Run ``vllm_hybrid_neuron.tools.generate`` (or ``command``, given the request and result
    paths) in a fresh process; return its JSON. The engine runs inside that process
    (IN_PROCESS_ENV and the "uni" executor), except with tensor parallelism."""
    llm_kwargs = request.get("llm_kwargs", {})
    if llm_kwargs.get("tensor_parallel_size", 1) == 1:
        request = {**request, "llm_kwargs": {"distributed_executor_backend": "uni",
                                             **llm_kwargs}}
        env = {**IN_PROCESS_ENV, **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        req, res = os.path.join(tmp, "req.json"), os.path.join(tmp, "res.json")
        with open(req, "w") as f:
            json.dump(request, f)
        proc = subprocess.run(
            (command or [sys.executable, "-m", "vllm_hybrid_neuron.tools.generate"]) + [req, res],
            env={**os.environ, **(env or {})}, capture_output=True, text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(
                f"vLLM run failed (rc={proc.returncode}):\n{_errors(proc.stdout + proc.stderr)}")
        with open(res) as f:
            result = json.load(f)
        result["log"] = proc.stdout + proc.stderr
        return result


def _errors(log: str, limit: int = 6000) -> str:
    """The lines of a vLLM log that say what went wrong (the root cause is often
    far above the final traceback)."""
    lines = [l for l in log.splitlines() if "ERROR" in l or "Error" in l or "error" in l]
    return "\n".join(lines)[-limit:] or log[-limit:]


def hf_model(model_dir: str):
    """transformers fp32 (see hf_models)."""
    return hf_models(model_dir, "float32")


@torch.no_grad()
def hf_logprobs(model, prompt: list[int], generated: list[int]) -> tuple[list[float], list[int]]:
    """transformers fp32, teacher-forced on ``prompt + generated``: the log-probability of each
    generated token, and transformers' argmax at each of those positions."""
    full = torch.tensor([prompt + generated])
    logits = model(full).logits[0].float()  # (seq, vocab)
    rows = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(generated)], -1)
    chosen = rows.gather(1, torch.tensor(generated)[:, None])[:, 0]
    return chosen.tolist(), rows.argmax(-1).tolist()


@torch.no_grad()
def _teacher_forced(model, prompt: list[int], generated: list[int]) -> tuple[torch.Tensor, float]:
    """transformers' fp32 logits at the positions that chose ``generated`` (gen, vocab), and the
    worst deficit: how far a chosen token's logit is below that position's argmax."""
    logits = model(torch.tensor([prompt + generated])).logits[0].float()  # (seq, vocab)
    rows = logits[len(prompt) - 1: len(prompt) - 1 + len(generated)]  # (gen, vocab)
    chosen = rows.gather(1, torch.tensor(generated)[:, None])[:, 0]
    return rows, float((rows.max(dim=1).values - chosen).max())


@torch.no_grad()
def same_greedy_tokens(model, prompts: list[list[int]], outputs: list[list[int]],
                       expected: list[list[int]], margin: float) -> list[str]:
    """Where ``outputs`` differ from ``expected`` (two vLLM runs that must agree): why, as a
    list of messages (empty when they agree). Floating-point results depend on how a step is
    batched, so two exact runs may part at a near-tie; that is accepted only where transformers
    (fp32, teacher-forced on the shared prefix) puts the two candidates within ``margin`` logits
    of each other and each run's tokens stay within ``margin`` of its argmax throughout."""
    problems = []
    for i, (prompt, got, want) in enumerate(zip(prompts, outputs, expected)):
        if got == want:
            continue
        at = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        if at >= min(len(got), len(want)):
            problems.append(f"prompt {i}: {len(got)} tokens against {len(want)}")
            continue
        rows, got_deficit = _teacher_forced(model, prompt, got)
        gap = abs(float(rows[at, got[at]] - rows[at, want[at]]))  # same context up to ``at``
        deficits = [got_deficit, _teacher_forced(model, prompt, want)[1]]
        if gap > margin or max(deficits) > margin:
            problems.append(f"prompt {i} ({len(prompt)} tokens) parts at token {at}: candidates "
                            f"{gap:.4f} logits apart, worst deficits {deficits}")
    return problems


@functools.cache
def hf_models(model_dir: str, dtype: str):
    """transformers' model of ``model_dir`` in ``dtype`` (loaded once per session): the
    ConditionalGeneration class for a checkpoint with towers, run on text only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    multimodal = getattr(AutoConfig.from_pretrained(model_dir), "vision_config", None) is not None
    cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    return cls.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


@dataclass
class LogprobCheck:
    """vLLM's generated tokens and log-probabilities against transformers, teacher-forced."""
    dtype: str
    logprob_err: float  # max |vLLM logprob - transformers fp32 logprob| of the chosen tokens
    logprob_rms: float  # root-mean-square of the same differences over all tokens
    deficit: float  # max over tokens of (fp32 argmax logit - chosen token's fp32 logit)
    hf_bf16_logprob_err: float  # transformers bf16 against fp32 on the same tokens (bf16 only)
    hf_bf16_logit_err: float  # max |bf16 logit - fp32 logit| over those rows (bf16 only)
    hf_bf16_logprob_rms: float  # rms of transformers bf16's logprob differences (bf16 only)
    tokens: int

    def problems(self) -> list[str]:
        if self.dtype == "float32":
            bounds = [("logprob error", self.logprob_err, FP32_LOGPROB_TOL),
                      ("chosen-token deficit", self.deficit, FP32_MARGIN)]
        else:
            bounds = [("logprob rms error", self.logprob_rms,
                       BF16_FACTOR * self.hf_bf16_logprob_rms),
                      ("logprob error", self.logprob_err, BF16_FACTOR * self.hf_bf16_logprob_err),
                      ("chosen-token deficit", self.deficit, BF16_FACTOR * self.hf_bf16_logit_err)]
        return [f"{what} {value:.2e} > {bound:.2e}" for what, value, bound in bounds
                if not value <= bound]

    def __str__(self) -> str:
        s = (f"{self.tokens} tokens: logprob err {self.logprob_err:.2e} "
             f"(rms {self.logprob_rms:.2e}), deficit {self.deficit:.2e}")
        if self.dtype != "float32":
            s += (f" (transformers bf16: logprob err {self.hf_bf16_logprob_err:.2e} "
                  f"(rms {self.hf_bf16_logprob_rms:.2e}), logit err {self.hf_bf16_logit_err:.2e})")
        return s


@functools.lru_cache(maxsize=256)
@torch.no_grad()
def _teacher_forced_rows(model_dir: str, dtype: str, prompt: tuple[int, ...],
                         generated: tuple[int, ...]) -> torch.Tensor:
    """transformers' logits (gen, vocab), fp32, at the positions that chose ``generated``
    (cached: a warm round repeats the cold round's sequences)."""
    full = torch.tensor([prompt + generated])
    span = slice(len(prompt) - 1, len(prompt) - 1 + len(generated))
    return hf_models(model_dir, dtype)(full).logits[0, span].float()


@torch.no_grad()
def check_logprobs(model_dir: str, dtype: str, prompts: list[list[int]],
                   outputs: list[list[int]], logprobs: list[list[float]]) -> LogprobCheck:
    """Teacher-force each ``prompt + output`` through transformers fp32 (and bf16 when ``dtype``
    is bf16); compare vLLM's ``logprobs`` of its chosen tokens, worst case over all prompts."""
    err = deficit = hf_lp_err = hf_logit_err = 0.0
    tokens = 0
    sq = hf_sq = 0.0  # sums of squared logprob differences
    for prompt, generated, got in zip(prompts, outputs, logprobs, strict=True):
        assert len(got) == len(generated)
        key = (tuple(prompt), tuple(generated))
        chosen = torch.tensor(generated)[:, None]
        rows = _teacher_forced_rows(model_dir, "float32", *key)  # (gen, vocab)
        ref = torch.log_softmax(rows, -1).gather(1, chosen)[:, 0]
        # NaN counts as the worst error (Python's max() would drop it: a state blown up by a
        # flipped decay sign once passed this line as "0.0").
        diff = (torch.tensor(got) - ref).abs().nan_to_num(nan=float("inf"))
        err = max(err, float(diff.max()))
        sq += float(diff.pow(2).sum())
        deficit = max(deficit, float((rows.max(1).values - rows.gather(1, chosen)[:, 0]).max()))
        if dtype != "float32":
            rows16 = _teacher_forced_rows(model_dir, "bfloat16", *key)
            lp16 = torch.log_softmax(rows16, -1).gather(1, chosen)[:, 0]
            hf_lp_err = max(hf_lp_err, float((lp16 - ref).abs().max()))
            hf_sq += float((lp16 - ref).pow(2).sum())
            hf_logit_err = max(hf_logit_err, float((rows16 - rows).abs().max()))
        tokens += len(generated)
    rms = lambda total: (total / max(tokens, 1)) ** 0.5  # noqa: E731
    return LogprobCheck(dtype, err, rms(sq), deficit, hf_lp_err, hf_logit_err, rms(hf_sq), tokens)
