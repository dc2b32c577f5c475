"""Roofline fractions of the served benchmark: how far each path is from this machine's limits.

    .venv/bin/python benchmarks/roofline.py --family granite --model-dir DIR

- decode: weight bytes a step must stream (every non-expert weight, plus the experts the
  batch's tokens route to: top_k at batch 1, E(1 - (1 - k/E)^b) expected distinct ones at
  batch b) over the measured read bandwidth, against the measured TPOT;
- prefill: 2 x active parameters x prompt tokens (+ causal attention scores) over the measured
  bf16 GEMM throughput, against the measured TTFT of a 1024-token prompt at concurrency 1.
Both cores, as in bench_serve.py. Reads benchmarks/results/serve-<family>.json; writes
roofline-<family>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch
from safetensors import safe_open

RESULTS = Path(__file__).parent / "results"
EXPERT = re.compile(r"(block_sparse_moe\.(input|output)_linear|mlp\.experts\.\d+\.)")


def read_bandwidth_gbs(mb: int = 1024, reps: int = 7) -> float:
    """Streaming read bandwidth (GB/s): max-reduction of an fp32 buffer far larger than the
    caches (a bf16 sum is conversion-bound here and reads ~25x slower)."""
    t = torch.ones(mb * 2**20 // 4)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        t.max()
        times.append(time.perf_counter() - t0)
    return t.numel() * 4 / statistics.median(times[1:]) / 1e9


def gemm_tflops(m: int = 1024, k: int = 2048, n: int = 4096, reps: int = 7) -> float:
    """bf16 GEMM throughput (TFLOP/s) at prefill-like shapes."""
    a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times[1:]) / 1e12


def weight_bytes(model_dir: str) -> tuple[float, float, dict]:
    """(non-expert bytes without the embedding, bytes of one expert over all layers, config)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dense = expert_total = 0
    with safe_open(str(Path(model_dir) / "model.safetensors"), "pt") as f:
        for name in f.keys():
            shape = f.get_slice(name).get_shape()
            numel = 1
            for s in shape:
                numel *= s
            if "embed_tokens" in name:
                continue  # a gather of a few rows, not a streamed matrix
            if EXPERT.search(name):
                expert_total += numel * 2
            else:
                dense += numel * 2
    experts = config.get("num_local_experts") or config.get("num_experts")
    return dense, expert_total / experts, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True)
    parser.add_argument("--model-dir", required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    serve = json.loads((RESULTS / f"serve-{args.family}.json").read_text())
    dense, per_expert, cfg = weight_bytes(args.model_dir)
    E = cfg.get("num_local_experts") or cfg.get("num_experts")
    k = cfg["num_experts_per_tok"]
    bw, tflops = read_bandwidth_gbs(), gemm_tflops()
    layers = cfg["num_hidden_layers"]
    attn_layers = sum(t == "full_attention" for t in cfg.get("layer_types", []))
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rows, out = [], {"read_bandwidth_gbs": bw, "bf16_gemm_tflops": tflops,
                     "dense_weight_mb": dense / 1e6, "expert_weight_mb": per_expert / 1e6}
    for conc in (1, 4):
        touched = E * (1 - (1 - k / E) ** conc)
        floor_ms = (dense + touched * per_expert) / (bw * 1e9) * 1e3
        for wl in ("in1024-out128", "in128-out512"):
            key = f"{wl}-c{conc}"
            for path in ("plugin", "native"):
                tpot = serve[path][key]["median_tpot_ms"]
                rows.append(("decode", key, path, floor_ms, tpot))
    n = 1024
    active = dense + k * per_expert  # bytes of bf16 weights one token touches
    flops = 2 * n * active / 2 + attn_layers * 2 * 2 * (n * n / 2) * heads * head_dim
    floor_ms = flops / (tflops * 1e12) * 1e3
    for path in ("plugin", "native"):
        rows.append(("prefill", "in1024-out128-c1", path, floor_ms, serve[path]["in1024-out128-c1"]["median_ttft_ms"]))
    out["rows"] = [dict(phase=p, workload=w, path=pa, floor_ms=f, measured_ms=m, fraction=f / m)
                   for p, w, pa, f, m in rows]
    (RESULTS / f"roofline-{args.family}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [f"{args.family}: read bandwidth {bw:.1f} GB/s, bf16 GEMM {tflops * 1e3:.0f} GFLOP/s "
             f"(2 threads); weights streamed per decode step: {dense / 1e6:.0f} MB dense + "
             f"{per_expert / 1e6:.1f} MB per routed expert ({layers} layers)", "",
             "| phase | workload | path | floor ms | measured ms (TPOT / TTFT) | fraction of roofline |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {p} | {w} | {pa} | {f:.1f} | {m:.1f} | {100 * f / m:.0f}% |" for p, w, pa, f, m in rows]
    (RESULTS / f"roofline-{args.family}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
