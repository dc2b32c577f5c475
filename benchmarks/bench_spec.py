"""ngram speculative decoding on a repetitive workload: acceptance and output tok/s.

    .venv/bin/python benchmarks/bench_spec.py --model-dir DIR --label NAME [--drafts 3]

Runs the same greedy batch (4 prompts that repeat a passage, 128 new tokens each) on one
engine without speculation and on one with ngram drafts, both with the plugin, and checks
the tokens are identical. Acceptance depends on the checkpoint: a random-weight model does
not continue the passage (acceptance ~0: the cost of speculation), while one whose greedy
output repeats itself (e.g. tied embeddings that echo the last token) accepts nearly every
draft (the mechanism's gain). Each --label is one row of benchmarks/results/spec.json / .md.

Both figures are given: output tok/s of a whole round (prefill included) and decode tok/s,
the tokens after each sequence's first over the round's time less a prefill-only round's
(max_tokens 1; fastest of two of each). --prompts 1 is the latency case, where one
sequence's 3-draft verification step is a 4-row forward; 4 prompts make it 16 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MOE_NAMES = {"auto": "default (the plugin's moe_experts since 2026-12-07)",
             "vllm": "vLLM's kernel", "plugin": "plugin's moe_experts"}


def run(request: dict, moe: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        req, res = Path(tmp, "req.json"), Path(tmp, "res.json")
        req.write_text(json.dumps(request))
        env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4",
               "VLLM_HYBRID_NEURON_MOE": moe}
        proc = subprocess.run([sys.executable, "-m", "vllm_hybrid_neuron.tools.generate",
                               str(req), str(res)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        return json.loads(res.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--drafts", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--label", default="random weights",
                        help="row name for this checkpoint in the results table")
    parser.add_argument("--moe", default="auto", choices=["auto", "plugin", "vllm"],
                        help="VLLM_HYBRID_NEURON_MOE for both engines (named in the row)")
    parser.add_argument("--prompts", type=int, default=4, choices=range(1, 5),
                        help="concurrent sequences (1: one sequence, the latency case)")
    parser.add_argument("--compiled", action="store_true",
                        help="vLLM's default compiled mode (default: --enforce-eager)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    passage = tok("The quick brown fox jumps over the lazy dog. A state space model keeps "
                  "a hidden state. ", add_special_tokens=False)["input_ids"]
    prompts = [(passage * 12)[i: i + 200] for i in range(0, 40, 10)][:args.prompts]
    # rounds: warm-up, then prefill-only and whole rounds alternately (two of each)
    full, prefill = args.max_tokens, 1
    base = {"model": args.model_dir, "dtype": "bfloat16", "prompts": prompts,
            "max_model_len": 2048, "rounds": 5,
            "round_max_tokens": [full, prefill, full, prefill, full],
            "llm_kwargs": {"enable_prefix_caching": False,
                           "enforce_eager": not args.compiled}}
    spec = json.loads(json.dumps(base))
    spec["llm_kwargs"]["speculative_config"] = {
        "method": "ngram", "num_speculative_tokens": args.drafts,
        "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    results = {}
    for name, request in (("plain", base), (f"ngram{args.drafts}", spec)):
        r = run(request, args.moe)
        whole = min((r["rounds"][i] for i in (2, 4)), key=lambda x: x["seconds"])
        prefill_s = min(r["rounds"][i]["seconds"] for i in (1, 3))
        tokens = sum(len(o) for o in whole["outputs"])
        m = r["metrics"]
        results[name] = {
            "output_tok_s": tokens / whole["seconds"], "outputs": whole["outputs"],
            "decode_tok_s": (tokens - len(prompts)) / (whole["seconds"] - prefill_s),
            "prefill_s": prefill_s,
            "acceptance": (m.get("vllm:spec_decode_num_accepted_tokens", 0)
                           / max(m.get("vllm:spec_decode_num_draft_tokens", 0), 1))}
        print(name, {k: v for k, v in results[name].items() if k != "outputs"}, flush=True)
    same = results["plain"]["outputs"] == results[f"ngram{args.drafts}"]["outputs"]
    plain, fast = results["plain"], results[f"ngram{args.drafts}"]
    RESULTS.mkdir(exist_ok=True)
    summary = {"model": json.loads(Path(args.model_dir, "tiny_model.json").read_text()),
               "identical_tokens": same, "plain_tok_s": plain["output_tok_s"],
               "ngram_tok_s": fast["output_tok_s"], "acceptance": fast["acceptance"],
               "plain_decode_tok_s": plain["decode_tok_s"],
               "ngram_decode_tok_s": fast["decode_tok_s"], "prompts": args.prompts,
               "mode": "compiled" if args.compiled else "eager",
               "drafts": args.drafts, "max_tokens": args.max_tokens, "moe": args.moe}
    path = RESULTS / "spec.json"
    table = json.loads(path.read_text()) if path.exists() else {}
    if "model" in table:  # one-row file of an earlier version
        table = {"random weights": table}
    table[args.label] = summary
    path.write_text(json.dumps(table, indent=2) + "\n")
    lines = ["| checkpoint | MoE experts | workload | plain tok/s | ngram tok/s | speed-up "
             "| decode only: plain / ngram tok/s = speed-up | draft acceptance "
             "| tokens identical |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in table.items():
        decode = (f"{r['plain_decode_tok_s']:.1f} / {r['ngram_decode_tok_s']:.1f} = "
                  f"{r['ngram_decode_tok_s'] / r['plain_decode_tok_s']:.2f}x"
                  if "plain_decode_tok_s" in r else "- (not measured)")
        lines.append(
            f"| {label} | {MOE_NAMES[r.get('moe', 'auto')]} "
            f"| {r.get('prompts', 4)} repetitive prompt(s) x {r.get('max_tokens', 128)} tokens, "
            f"{r['drafts']} drafts, {r.get('mode', 'eager')} | {r['plain_tok_s']:.1f} | "
            f"{r['ngram_tok_s']:.1f} | {r['ngram_tok_s'] / r['plain_tok_s']:.2f}x | {decode} | "
            f"{r['acceptance']:.0%} | {r['identical_tokens']} |")
    (RESULTS / "spec.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "spec.md").read_text())


if __name__ == "__main__":
    main()
