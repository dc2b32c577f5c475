"""Greedy generation with ``vllm.LLM`` on token-id prompts, reported as JSON.

    python -m vllm_hybrid_neuron.tools.generate REQUEST.json [RESULT.json]

REQUEST: {"model": DIR, "dtype": "float32", "prompts": [[ids...], ...],
          "max_tokens": 32, "llm_kwargs": {...}, "rounds": 1, "logprobs": false,
          "later_rounds": [[[ids...], ...], ...],   (optional: other prompts per round)
          "round_max_tokens": [n, ...]}   (optional: max_tokens of each round)
         A prompt may also be {"source": [ids...], "blocks": 2.5, "plus": 0, "suffix": [ids]}:
         source[:int(blocks * B) + plus] + suffix, B the KV cache block size the engine chose.
RESULT:  {"served_classes": [...], "plugin_op_counts": [{...}], "startup_s": ...,
          "block_size": B, "batches": [[[ids...], ...], ...] (each round's prompts, resolved),
          "rounds": [{"outputs": [[ids...]], "cached_tokens": [...], "seconds": ...,
                      "logprobs": [[logprob of each generated token...]] (if asked)}],
          "metrics": {...}}

One engine per process: tests run this in a subprocess so engines never overlap and a
crashing engine fails one test, not the whole session. With "rounds" > 1 the same
prompts are sent again on the warm engine (prefix-cache hits show in cached_tokens);
"later_rounds" sends other prompts after the first round instead.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _metrics(llm) -> dict[str, float]:
    """Counters vLLM exposes (speculative decoding acceptance among them)."""
    out: dict[str, float] = {}
    try:
        for metric in llm.get_metrics():
            value = getattr(metric, "value", None)
            if isinstance(value, (int, float)):
                out[metric.name] = out.get(metric.name, 0) + value
    except Exception as exc:  # metrics are optional: report why they are missing
        out["error"] = repr(exc)[:200]
    return out


def _resolve(prompt, block_size: int) -> list[int]:
    """Token ids of a prompt given as ids or as a length in cache blocks (see REQUEST)."""
    if isinstance(prompt, list):
        return prompt
    length = int(prompt["blocks"] * block_size) + prompt.get("plus", 0)
    if length > len(prompt["source"]):
        raise ValueError(f"prompt of {prompt['blocks']} blocks of {block_size}: source has "
                         f"{len(prompt['source'])} tokens, {length} needed")
    return prompt["source"][:length] + prompt.get("suffix", [])


def run(request: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_hybrid_neuron.tools.introspect import model_class_path, plugin_op_counts

    kwargs = dict(model=request["model"], dtype=request.get("dtype", "float32"),
                  max_model_len=request.get("max_model_len", 1024), seed=0,
                  enforce_eager=True, disable_log_stats=False)
    kwargs.update(request.get("llm_kwargs", {}))
    started = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - started
    want_logprobs = request.get("logprobs", False)

    def params(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                              logprobs=0 if want_logprobs else None)

    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    batches = [request["prompts"]] * request.get("rounds", 1)
    batches += request.get("later_rounds", [])
    batches = [[_resolve(p, block_size) for p in batch] for batch in batches]
    max_tokens = request.get("round_max_tokens",
                             [request.get("max_tokens", 32)] * len(batches))
    if len(max_tokens) != len(batches):
        raise ValueError(f"round_max_tokens has {len(max_tokens)} entries for "
                         f"{len(batches)} rounds")
    rounds = []
    for batch, n in zip(batches, max_tokens):
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in batch]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params(n), use_tqdm=False)
        rounds.append({
            "outputs": [list(o.outputs[0].token_ids) for o in outs],
            "cached_tokens": [o.num_cached_tokens or 0 for o in outs],
            "seconds": time.perf_counter() - t0,
        })
        if want_logprobs:  # vLLM's log-probability of each token it chose
            rounds[-1]["logprobs"] = [[step[t].logprob for t, step in
                                       zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
                                      for o in outs]
    return {"served_classes": llm.apply_model(model_class_path),
            "plugin_op_counts": llm.apply_model(plugin_op_counts), "startup_s": startup,
            "block_size": block_size, "batches": batches, "rounds": rounds,
            "metrics": _metrics(llm)}


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # apply_model sends a function to the workers, which needs pickle.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    with open(sys.argv[1]) as f:
        request = json.load(f)
    result = json.dumps(run(request))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(result)
    else:
        print(result)


if __name__ == "__main__":
    main()
