"""Where a decode step's time goes: inside torch / custom ops versus outside them (Python and
framework glue: vLLM's scheduler, input preparation, sampling bookkeeping, the model's Python).

    .venv/bin/python benchmarks/step_overhead.py --family qwen3_5 --model-dir DIR [--native]
        [--compiled] [--batch 1] [--steps 64] [--spec-drafts 3 --repetitive]

One engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the profiler sees the
engine core and the model), bf16, both cores. After a warm-up, ``--steps`` greedy decode steps
of ``--batch`` sequences run under torch.profiler (CPU activities); a profiled run of the
prefill and first token alone is subtracted op by op, so the figures are the decode steps'.
Reported per step: wall time; time inside ops (the sum of every op's self CPU time: no op
counted twice); the rest, outside any op; and the ops with the largest self time. Writes
benchmarks/results/step-overhead-<family>-<path>-b<batch>.json and prints a summary line.

With --spec-drafts N the engine drafts N tokens per step by ngram (bench_spec.py's
configuration) and --repetitive gives it bench_spec.py's repeating prompts; since a
speculative step emits a variable number of tokens, every figure is also given per output
token (``*_per_token``), the unit in which a plain and a speculative run compare.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SCOPE = "gpu_model_runner: "  # vLLM's profiler scopes (the CPU runner subclasses the GPU one)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--native", action="store_true", help="VLLM_PLUGINS=none (vLLM's own path)")
    ap.add_argument("--compiled", action="store_true", help="vLLM's default compiled mode")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16,
                    help="prompt tokens per sequence (bench_serve's c=1 workload: 1024)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--spec-drafts", type=int, default=0, help="ngram drafts per step (0: off)")
    ap.add_argument("--repetitive", action="store_true",
                    help="bench_spec.py's prompts (a repeated passage) instead of 16 ids")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    # vLLM's model-runner phases (forward, sample, draft, ...) as profiler scopes: their
    # call counts are the engine steps, their inclusive times where an engine step goes.
    os.environ["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] = "1"
    if args.native:
        os.environ["VLLM_PLUGINS"] = "none"
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = ({"method": "ngram", "num_speculative_tokens": args.spec_drafts,
             "prompt_lookup_max": 3, "prompt_lookup_min": 1} if args.spec_drafts else None)
    llm = LLM(model=args.model_dir, dtype="bfloat16", max_model_len=2048, seed=0,
              enforce_eager=not args.compiled, enable_prefix_caching=False,
              speculative_config=spec, disable_log_stats=False)
    if args.repetitive:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model_dir)
        passage = tok("The quick brown fox jumps over the lazy dog. A state space model keeps "
                      "a hidden state. ", add_special_tokens=False)["input_ids"]
        ids = [(passage * 12)[10 * i: 10 * i + 200] for i in range(args.batch)]
    else:
        ids = [[(11 * i + j) % 500 + 10 for j in range(args.prompt_len)]
               for i in range(args.batch)]
    prompts = [TokensPrompt(prompt_token_ids=x) for x in ids]

    def decode(n):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0

    decode(args.steps)  # warm-up
    one = min(decode(1) for _ in range(3))  # prefill + one token: subtracted below

    def profiled(n):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            wall = decode(n)
        events = prof.key_averages()
        return wall, ({e.key: (e.self_cpu_time_total, e.count) for e in events
                       if not e.key.startswith(SCOPE)},
                      {e.key[len(SCOPE):]: (e.cpu_time_total, e.count) for e in events
                       if e.key.startswith(SCOPE)})

    # The prefill and first token run under the profiler alone, then with the decode steps;
    # each op's figures are the difference, so the prompts' prefill is not counted.
    wall_one, (ops_one, scopes_one) = profiled(1)
    wall_all, (ops_all, scopes_all) = profiled(args.steps + 1)
    wall = wall_all - wall_one

    def minus(after, before):
        return {k: (us - before.get(k, (0, 0))[0], n - before.get(k, (0, 0))[1])
                for k, (us, n) in after.items()}

    ops = minus(ops_all, ops_one)
    scopes = minus(scopes_all, scopes_one)
    engine_steps = scopes.get("forward", (0, 0))[1]
    counters = {m.name: m.value for m in llm.get_metrics()
                if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value")}
    inside_us = sum(us for us, _ in ops.values())
    top = sorted(ops.items(), key=lambda kv: kv[1][0], reverse=True)[:15]
    step_ms = wall / args.steps * 1e3
    tokens = args.batch * args.steps  # output tokens after the first, ignore_eos
    result = {
        "family": args.family, "path": "native" if args.native else "plugin",
        "mode": "compiled" if args.compiled else "eager", "batch": args.batch,
        "prompt_len": args.prompt_len,
        "moe_env": os.environ.get("VLLM_HYBRID_NEURON_MOE", "auto"),
        "steps": args.steps, "spec_drafts": args.spec_drafts,
        "repetitive": args.repetitive, "spec_counters_cumulative": counters,
        "profiled_decode_s": wall, "prefill_and_first_token_s": one,
        "step_ms_profiled": step_ms,
        "inside_ops_fraction": inside_us / 1e6 / wall,
        "outside_ops_fraction": 1 - inside_us / 1e6 / wall,
        "top_ops": [{"name": k, "self_ms_per_step": us / 1e3 / args.steps,
                     "self_ms_per_token": us / 1e3 / tokens,
                     "calls_per_step": n / args.steps} for k, (us, n) in top],
    }
    plain = min(decode(args.steps + 1) for _ in range(2))
    result["step_ms"] = (plain - one) / args.steps * 1e3
    result["ms_per_token"] = (plain - one) / tokens * 1e3
    result["outside_ops_ms_per_token"] = (wall - inside_us / 1e6) / tokens * 1e3
    # Engine steps (model forwards) and each model-runner phase's inclusive time per step:
    # a speculative run's verification steps are fewer than its output positions.
    result["engine_steps"] = engine_steps
    result["output_tokens_per_engine_step"] = tokens / max(engine_steps, 1)
    result["engine_step_ms_profiled"] = wall / max(engine_steps, 1) * 1e3
    result["phase_ms_per_engine_step"] = {
        k: us / 1e3 / max(engine_steps, 1) for k, (us, _) in sorted(scopes.items())}
    RESULTS.mkdir(exist_ok=True)
    spec_tag = f"-ngram{args.spec_drafts}" if args.spec_drafts else ""
    name = (f"step-overhead-{args.family}-{result['path']}-{result['mode']}-b{args.batch}"
            f"{spec_tag}{'-rep' if args.repetitive else ''}"
            f"{'' if args.prompt_len == 16 else f'-p{args.prompt_len}'}.json")
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"SUMMARY {args.family} {result['path']} {result['mode']} b{args.batch}: step "
          f"{result['step_ms']:.1f} ms unprofiled ({step_ms:.1f} profiled), "
          f"{result['ms_per_token']:.2f} ms per output token; outside ops "
          f"{result['outside_ops_fraction']:.0%} of the profiled run; spec {counters}")
    print(f"  {engine_steps} engine steps, {result['output_tokens_per_engine_step']:.2f} output "
          f"tokens each, {result['engine_step_ms_profiled']:.1f} ms each (profiled): " + ", ".join(
              f"{k} {v:.1f} ms" for k, v in result["phase_ms_per_engine_step"].items()))
    for t in result["top_ops"]:
        print(f"  {t['self_ms_per_token']:8.3f} ms/token {t['calls_per_step']:7.1f} calls/step  "
              f"{t['name']}")


if __name__ == "__main__":
    main()
