"""Per-layer-type time shares (torch.profiler) for the plugin and vLLM's native path.

    .venv/bin/python benchmarks/profile_layers.py --family granite --model-dir DIR

For each path (plugin loaded / VLLM_PLUGINS=none), in its own process: a 512-token
prefill, then 64 decode steps at batch 1 and at batch 4 (16-token prompts); reports the
share of model forward time spent in the recurrent mixers, attention and MoE blocks. Writes
benchmarks/results/profile-<family>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PHASES = {"prefill-512": (1, 512, 1), "decode-b1": (1, 16, 64), "decode-b4": (4, 16, 64)}


def worker(model_dir: str) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # Beside this script: benchmarks/ is sys.path[0] here, and vLLM's engine core and workers
    # inherit sys.path, so apply_model's functions pickle by reference to this module.
    import layer_profile
    llm = LLM(model=model_dir, dtype="bfloat16", max_model_len=2048, enforce_eager=True,
              enable_prefix_caching=False, seed=0)
    out = {}
    for phase, (batch, prompt_len, new_tokens) in PHASES.items():
        prompts = [TokensPrompt(prompt_token_ids=[(7 * i + j) % 500 + 10
                                                  for j in range(prompt_len)])
                   for i in range(batch)]
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts, params, use_tqdm=False)  # warm-up
        llm.apply_model(layer_profile.start_layer_profile)
        llm.generate(prompts, params, use_tqdm=False)
        totals = llm.apply_model(layer_profile.stop_layer_profile)[0]
        step = totals.pop("model_step")  # all model forwards of the phase
        out[phase] = {"model_ms": step, **{k: v / step for k, v in totals.items()}}
    return out


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        print("RESULT " + json.dumps(worker(sys.argv[2])))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--order", default="plugin,native",
                        help="which path runs first (machine drift shows as an order effect)")
    args = parser.parse_args()
    results = {}
    for path in args.order.split(","):
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4",
               "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
        if path == "native":
            env["VLLM_PLUGINS"] = "none"
        proc = subprocess.run([sys.executable, __file__, "--worker", args.model_dir],
                              env=env, capture_output=True, text=True, timeout=3600)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if not line:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
        results[path] = json.loads(line[-1][len("RESULT "):])
        print(path, results[path], flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"profile-{args.family}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    kinds = ["recurrent_core", "recurrent_mixer", "attention", "moe"]
    lines = [f"| {args.family} phase | path | model forward ms (total) | " + " | ".join(kinds) + " |",
             "|---|---|---|" + "---|" * len(kinds)]
    for phase in PHASES:
        for path in [p for p in ("plugin", "native") if p in results]:
            r = results[path][phase]
            lines.append(f"| {phase} | {path} | {r['model_ms']:.0f} | "
                         + " | ".join(f"{100 * r.get(k, 0):.1f}%" for k in kinds) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
