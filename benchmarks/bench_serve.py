"""End-to-end serving benchmark: the plugin against vLLM 0.32's native CPU path.

    .venv/bin/python benchmarks/bench_serve.py --family granite [--runs 3] [--quick]
        [--paths plugin plugin-vllm-moe native] [--suffix -vllm-moe]

Builds a random checkpoint with realistic layer widths (fewer layers), then in one run
serves it with `vllm serve` once per path - the plugin (its moe_experts op for the routed
experts where vLLM would run its portable kernel, the default); optionally the plugin with
vLLM's MoE kernel (VLLM_HYBRID_NEURON_MOE=vllm); and with VLLM_PLUGINS set so the plugin is
not loaded (vLLM's native CPU path) - and drives each with
`vllm bench serve` (random dataset; 1024 in / 128 out and 128 in / 512 out;
concurrency 1 and 4; both cores bound), the paths' runs interleaved. Writes benchmarks/results/serve-<family>.json
and .md (medians of --runs, and plugin/native ratios); plot_serve.py draws the PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from vllm_hybrid_neuron.tools.server import VllmServer, vllm_executable
from vllm_hybrid_neuron.tools.tiny import build

RESULTS = Path(__file__).parent / "results"

# Realistic layer widths with fewer layers and a 32k vocabulary (bf16).
CHECKPOINTS = {
    # granite-4.0-h-tiny widths, 8 layers (7 Mamba2 + 1 attention), 32 experts top-6.
    "granite": ("granite-4.0-h-tiny", {
        "num_hidden_layers": 8, "vocab_size": 32768, "num_local_experts": 32,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"]
        + ["linear_attention"] * 4}),
    # Qwen3.5-35B-A3B GDN widths (16 key / 32 value heads of 128), 4 layers
    # (3 GDN + 1 attention), 32 experts top-8.
    "qwen3_5": ("qwen3.5-35b-a3b", {
        "num_hidden_layers": 4, "vocab_size": 32768, "num_experts": 32,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"]}),
}
WORKLOADS = [(1024, 128), (128, 512)]
CONCURRENCY = [1, 4]
METRICS = ["median_ttft_ms", "median_tpot_ms", "output_throughput"]


def bench_once(server: VllmServer, model_dir: str, inp: int, out: int, conc: int,
               num_prompts: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [vllm_executable(), "bench", "serve", "--backend", "vllm",
               "--base-url", server.base_url, "--model", "bench", "--tokenizer", model_dir,
               "--dataset-name", "random", "--random-input-len", str(inp),
               "--random-output-len", str(out), "--num-prompts", str(num_prompts),
               "--max-concurrency", str(conc), "--ignore-eos", "--seed", "0",
               "--save-result", "--result-dir", tmp, "--result-filename", "r.json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
        result = json.loads((Path(tmp) / "r.json").read_text())
    return {m: result[m] for m in METRICS}


# Served paths: vLLM native, the plugin (its moe_experts op by default), the plugin on vLLM's MoE
# kernel.
# "-compiled" paths run vLLM's default compiled mode; the others --enforce-eager.
PATHS = {"native": {"VLLM_PLUGINS": "none"},  # load no general plugin: vLLM's native classes
         "plugin": {},
         "plugin-vllm-moe": {"VLLM_HYBRID_NEURON_MOE": "vllm"},
         "native-compiled": {"VLLM_PLUGINS": "none"},
         "plugin-compiled": {}}


def serve_and_bench(model_dir: str, path: str, quick: bool, workloads=None) -> dict:
    """One server start, every workload once; returns {workload: metrics}.
    workloads: [(input len, output len, concurrency)], default every WORKLOADS x CONCURRENCY."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4", **PATHS[path]}
    plugin = not path.startswith("native")
    args = ["--served-model-name", "bench", "--dtype", "bfloat16", "--max-model-len", "2048",
            "--no-enable-prefix-caching"]
    if not path.endswith("-compiled"):
        args.append("--enforce-eager")
    if workloads is None:
        workloads = [(inp, out, conc) for inp, out in WORKLOADS for conc in CONCURRENCY]
    sample = {}
    with VllmServer(model_dir, args, env=env, ready_timeout=1800) as server:
        assert ("vllm-hybrid-neuron" in server.log()) == plugin
        assert ("MoE layers run the plugin's moe_experts op" in server.log()) == (
            plugin and path != "plugin-vllm-moe")
        bench_once(server, model_dir, 64, 16, 1, 2)  # warm-up
        # and one request per prompt length measured: a server's first prefill of a length
        # pays one-time costs (2026-12-08, Qwen3.5 plugin compiled, 1024-token prompts sent
        # directly: 1690 ms first, 1429-1520 ms after), which --quick's single c=1 request
        # otherwise put in its TTFT
        for inp in sorted({inp for inp, _, _ in workloads}):
            bench_once(server, model_dir, inp, 4, 1, 1)
        for inp, out, conc in workloads:
            num_prompts = conc * (1 if quick else 2)
            key = f"in{inp}-out{out}-c{conc}"
            sample[key] = bench_once(server, model_dir, inp, out, conc, num_prompts)
            print(key, path, sample[key], flush=True)
    return sample


def interleaved_runs(model_dir: str, runs: int, quick: bool, paths: list[str],
                     workloads=None) -> dict:
    """plugin, native, plugin, native, ...: slow drift of a shared machine hits every path
    alike instead of biasing the ratio; medians over the runs."""
    samples = {path: [] for path in paths}
    for _ in range(runs):
        for path in paths:
            samples[path].append(serve_and_bench(model_dir, path, quick, workloads))
    table = {}
    for path, runs_ in samples.items():
        table[path] = {}
        for key in runs_[0]:
            table[path][key] = {m: statistics.median(r[key][m] for r in runs_) for m in METRICS}
            table[path][key]["samples"] = [r[key] for r in runs_]
    return table


def write_markdown(family: str, results: dict, path: Path) -> None:
    lines = []
    for served in [p for p in PATHS if not p.startswith("native") and p in results]:
        base = "native-compiled" if served.endswith("-compiled") else "native"
        if base not in results:
            continue
        lines += [f"| {family} workload | TTFT ms ({served} / {base} = ratio) | "
                  f"TPOT ms ({served} / {base} = ratio) | output tok/s ({served} / {base} = ratio) |",
                  "|---|---|---|---|"]
        for key in results[served]:
            cells = []
            for m in METRICS:
                p, n = results[served][key][m], results[base][key][m]
                cells.append(f"{p:.1f} / {n:.1f} = **{p / n:.2f}x**")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(CHECKPOINTS), required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer prompts per run")
    parser.add_argument("--model-dir", help="reuse a checkpoint built earlier")
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=["plugin", "native"],
                        help="served paths, interleaved (native is always measured)")
    parser.add_argument("--suffix", default="", help="results file suffix")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    preset, overrides = CHECKPOINTS[args.family]
    model_dir = args.model_dir or tempfile.mkdtemp(prefix=f"bench-{args.family}-")
    if not (Path(model_dir) / "config.json").exists():
        t0 = time.time()
        build(args.family, model_dir, preset=preset, overrides=overrides, dtype="bfloat16")
        print(f"built {model_dir} in {time.time() - t0:.0f}s", flush=True)
    results = {"family": args.family, "preset": preset, "overrides": overrides,
               "runs": args.runs}
    paths = args.paths + ([] if "native" in args.paths else ["native"])
    results.update(interleaved_runs(model_dir, args.runs, args.quick, paths))
    out = RESULTS / f"serve-{args.family}{args.suffix}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(args.family, results, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
