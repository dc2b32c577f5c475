"""Routed MoE experts alone: vLLM's CPU kernel (``cpu_fused_moe``, prepacked weights, the ISA
vLLM serves with on this CPU: "amx" where AMX tiles exist, else "vec")
against the plugin's ``moe_experts``, at the bench_serve checkpoints' expert shapes, bf16.

For each M (tokens in the call) two routings: random top-k (distinct experts grow with M:
batched decode) and every token on the same top-k experts (one sequence's prefill chunk, or a
speculative verification step). Eight layers' weights are cycled so that the caches cannot hold
them. Reported per layer call: milliseconds, the fraction of the read-bandwidth floor (the
distinct experts' bytes over benchmarks/roofline.py's measured bandwidth) and GFLOP/s.

    .venv/bin/python benchmarks/bench_moe.py [--threads 2] [--out benchmarks/results/moe]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import roofline
from vllm_hybrid_neuron.ops.moe import moe_experts_packed, pack_moe_weights

# (family, experts, hidden K, intermediate I, top-k) of benchmarks/bench_serve.py's checkpoints.
SHAPES = [("granite", 32, 1536, 512, 6), ("qwen3_5", 32, 2048, 512, 8)]
LAYERS = 8


def _routing(M: int, E: int, topk: int, hot: bool, g: torch.Generator):
    if hot:
        ids = torch.arange(topk).repeat(M, 1)
    else:
        ids = torch.stack([torch.randperm(E, generator=g)[:topk] for _ in range(M)])
    weights = torch.rand(M, topk, generator=g)
    return (weights / weights.sum(-1, keepdim=True)).contiguous(), ids.to(torch.int32).contiguous()


def _median_ms(fn, layers: int, reps: int) -> float:
    for i in range(layers):
        fn(i)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(layers):
            fn(i)
        times.append((time.perf_counter() - t0) / layers)
    return statistics.median(times) * 1e3


def _gemm_gflops(reps: int = 7) -> float:
    """The machine's bf16 GEMM rate (ATen / oneDNN, (1024, 2048) x (2048, 2048)^T, best of
    ``reps``): what the issue's ">= 70% of bf16 GEMM throughput" is measured against."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 2048, generator=g).bfloat16()
    w = torch.randn(2048, 2048, generator=g).bfloat16()
    for _ in range(2):
        torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 * 2048 * 2048 / best / 1e9


def main() -> None:
    from vllm import _custom_ops

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    ap.add_argument("--out", default="benchmarks/results/moe")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    isa = "amx" if torch.cpu._is_amx_tile_supported() else "vec"  # as vLLM's experts classes pick
    if isa == "amx":  # ask Linux for the AMX tile state (in a server oneDNN has done so already)
        torch._C._cpu._init_amx()
    bw = roofline.read_bandwidth_gbs()
    gemm = _gemm_gflops()
    g = torch.Generator().manual_seed(0)
    rows = []
    for family, E, K, inter, topk in SHAPES:
        w13 = [(torch.randn(E, 2 * inter, K, generator=g) * 0.02).bfloat16() for _ in range(LAYERS)]
        w2 = [(torch.randn(E, K, inter, generator=g) * 0.02).bfloat16() for _ in range(LAYERS)]
        packed = [(_custom_ops.cpu_prepack_moe_weight(a, isa),
                   _custom_ops.cpu_prepack_moe_weight(b, isa)) for a, b in zip(w13, w2)]
        ours = [pack_moe_weights(a, b) for a, b in zip(w13, w2)]  # as PluginCPUExperts at load
        expert_bytes = 3 * inter * K * 2
        for M in args.m:
            for hot in (False, True):
                if hot and M == 1:
                    continue
                x = torch.randn(M, K, generator=g).bfloat16()
                weights, ids = _routing(M, E, topk, hot, g)
                out = torch.empty_like(x)
                distinct = int(torch.unique(ids).numel())
                floor_ms = distinct * expert_bytes / (bw * 1e9) * 1e3
                flop = 2 * M * topk * 3 * inter * K
                reps = args.reps if M <= 64 else 3

                def vllm(i):
                    _custom_ops.cpu_fused_moe(out, x, packed[i][0], packed[i][1], None, None,
                                              weights, ids, "silu", isa)

                def plugin(i):
                    moe_experts_packed(out, x, ours[i][0], ours[i][1], weights, ids, inter)

                row = {"family": family, "M": M, "routing": "same experts" if hot else "random",
                       "distinct_experts": distinct, "floor_ms": round(floor_ms, 3)}
                for name, fn in (("vllm", vllm), ("plugin", plugin)):
                    ms = _median_ms(fn, LAYERS, reps)
                    row[f"{name}_ms"] = round(ms, 3)
                    row[f"{name}_of_floor"] = round(floor_ms / ms, 3)
                    row[f"{name}_gflops"] = round(flop / ms / 1e6, 1)
                row["speedup"] = round(row["vllm_ms"] / row["plugin_ms"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
        del w13, w2, packed, ours
    gemm = max(gemm, _gemm_gflops())  # measured before and after: the better of the two
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(
        {"read_bandwidth_gbs": round(bw, 1), "bf16_gemm_gflops": round(gemm, 1), "threads": args.threads, "vllm_isa": isa, "rows": rows}, indent=1))
    lines = [f"read bandwidth {bw:.1f} GB/s, bf16 GEMM {gemm:.0f} GFLOP/s (ATen, 1024 x 2048 x 2048, "
             "best of 7, before and after), "
             f"{args.threads} threads, bf16, vLLM ISA {isa}, {LAYERS} layers' "
             "weights cycled; of floor = distinct experts' bytes / bandwidth over the time", "",
             "| family | M | routing | distinct experts | floor ms | vLLM ms | vLLM of floor (GFLOP/s) "
             "| plugin ms | plugin of floor (GFLOP/s) | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['family']} | {r['M']} | {r['routing']} | {r['distinct_experts']} | {r['floor_ms']:.3f} "
            f"| {r['vllm_ms']:.3f} | {r['vllm_of_floor']:.0%} ({r['vllm_gflops']:.0f}) | {r['plugin_ms']:.3f} "
            f"| {r['plugin_of_floor']:.0%} ({r['plugin_gflops']:.0f}) | {r['speedup']:.2f}x |")
    out_path.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
