"""Decode-sized dense projections: vLLM's CPU path and the plugin's bf16_linear against the
read-bandwidth floor.

vLLM 0.32 runs every unquantized CPU linear layer through ``dispatch_cpu_unquantized_gemm``:
oneDNN's ``onednn_mm`` with a prepacked weight handle for the dense projections (small-N
router-like weights go to sgl-kernel's ``weight_packed_linear``). At decode, M = 1..8 rows,
a projection should cost its weight bytes / read bandwidth. This measures, per shape of the
bench_serve checkpoints (granite-4.0-h-tiny and qwen3.5-35b-a3b widths, bf16), the time of
vLLM's kernel and of ``torch.nn.functional.linear``, with enough weight copies cycled that the
caches cannot hold them, as a fraction of that floor, and the same for the plugin's
``bf16_linear`` (weights streamed once per call for M <= 8).

    .venv/bin/python benchmarks/bench_linear.py [--threads 2] [--out benchmarks/results/linear]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import roofline
from vllm_hybrid_neuron.ops import bf16_linear

# (name, N out, K in) at the two checkpoints' real widths.
SHAPES = {
    "granite": [("lm_head", 100352, 1536), ("mamba in_proj", 6448, 1536),
                ("mamba out_proj", 1536, 3072), ("attn qkv", 2560, 1536),
                ("attn o_proj", 1536, 1536), ("shared gate_up", 2048, 1536),
                ("shared down", 1536, 1024)],
    "qwen3_5": [("lm_head", 248320, 2048), ("gdn in_proj_qkvz", 12288, 2048),
                ("gdn out_proj", 2048, 4096), ("attn qkv(+gate)", 9216, 2048),
                ("attn o_proj", 2048, 4096), ("shared gate_up", 1024, 2048),
                ("shared down", 2048, 512)],
}
CACHE_BYTES = 256 * 2**20  # cycle weight copies totalling at least this


def vllm_linear(weight: torch.Tensor):
    """vLLM's own CPU dispatch for this weight (the callable the layer would use)."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    layer.bias = None
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    return lambda x: layer.cpu_linear(x, weight, None)


def time_calls(fns, x, reps: int) -> float:
    """Median seconds per call, cycling through ``fns`` (one per weight copy)."""
    for f in fns:  # warm-up
        f(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for f in fns:
            f(x)
        times.append((time.perf_counter() - t0) / len(fns))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--prefill-m", type=int, default=1024,
                    help="one prefill-sized M (GFLOP/s; LM heads skipped: vLLM computes logits "
                         "for sampled rows only); 0 to skip")
    ap.add_argument("--out", default="benchmarks/results/linear")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = roofline.read_bandwidth_gbs()
    rows = []
    for family, shapes in SHAPES.items():
        for name, n, k in shapes:
            nbytes = n * k * 2
            copies = max(2, -(-CACHE_BYTES // nbytes))
            weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            kernels = {"vllm": [vllm_linear(w) for w in weights],
                       "plugin": [lambda x, w=w: bf16_linear(x, w) for w in weights]}
            sizes = list(args.m) + ([args.prefill_m] if args.prefill_m and name != "lm_head" else [])
            for m in sizes:
                if m > 8:  # compute-bound: one weight copy, fewer repetitions
                    kernels = {p: fns[:1] for p, fns in kernels.items()}
                x = torch.randn(m, k, dtype=torch.bfloat16)
                floor_ms = nbytes / (bw * 1e9) * 1e3
                row = {"family": family, "layer": name, "N": n, "K": k, "M": m,
                       "floor_ms": round(floor_ms, 4)}
                for path, fns in kernels.items():
                    ms = time_calls(fns, x, args.reps if m <= 8 else 3) * 1e3
                    row[f"{path}_ms"] = round(ms, 4)
                    row[f"{path}_of_floor"] = round(floor_ms / ms, 3)
                    row[f"{path}_gflops"] = round(2 * m * n * k / ms / 1e6, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
            del weights, kernels
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"read_bandwidth_gbs": round(bw, 1), "threads": args.threads, "rows": rows}, indent=1))
    lines = [f"read bandwidth {bw:.1f} GB/s, {args.threads} threads, bf16; fraction = floor / measured "
             "(weight bytes / bandwidth over time; meaningful at decode sizes, GFLOP/s at prefill sizes)",
             "", "| family | layer | N x K | M | floor ms | vLLM ms | vLLM of floor (GFLOP/s) | plugin ms | plugin of floor (GFLOP/s) | plugin speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['layer']} | {r['N']} x {r['K']} | {r['M']} | {r['floor_ms']:.3f} | "
                     f"{r['vllm_ms']:.3f} | {r['vllm_of_floor']:.0%} ({r['vllm_gflops']:.0f}) | {r['plugin_ms']:.3f} | "
                     f"{r['plugin_of_floor']:.0%} ({r['plugin_gflops']:.0f}) | "
                     f"{r['vllm_ms'] / r['plugin_ms']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
