"""Plot benchmarks/results/threeway-*.json (bench_threeway.py) into threeway.png: each path's
TTFT, TPOT and output tok/s relative to vLLM native in its default compiled mode.

    .venv/bin/python benchmarks/plot_threeway.py [--results benchmarks/results/zen4]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
C1, C4 = "in1024-out128-c1", "in128-out512-c4"
# (label, workload, metric, llama.cpp figure from its llama-bench dict or None)
BARS = [("TTFT @1024, c=1", C1, "median_ttft_ms", lambda l: 1024 / l["pp_tok_s"] * 1e3),
        ("TPOT, c=1", C1, "median_tpot_ms", lambda l: 1e3 / l["tg_tok_s"]),
        ("TPOT, c=4", C4, "median_tpot_ms", None)]
PATHS = [("plugin-compiled", "vLLM + plugin (compiled)"), ("plugin", "vLLM + plugin (eager)"),
         ("native", "vLLM native (eager)")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the directory bench_threeway.py wrote to (one machine's runs)")
    results = ap.parse_args().results
    files = sorted(results.glob("threeway-*.json"))
    fig, axes = plt.subplots(1, len(files), figsize=(6.5 * len(files), 4.2), squeeze=False)
    for ax, path in zip(axes[0], files):
        data = json.loads(path.read_text())
        serve, llama = data["serve"], data["llamacpp"]
        series = PATHS + ([("llama.cpp", "llama.cpp (llama-bench)")] if llama else [])
        width = 0.8 / len(series)
        for i, (key, label) in enumerate(series):
            ratios = []
            for _, wl, metric, from_llama in BARS:
                base = serve["native-compiled"][wl][metric]
                if key == "llama.cpp":
                    ratios.append(from_llama(llama) / base if from_llama else 0.0)
                else:
                    ratios.append(serve[key][wl][metric] / base)
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(BARS))]
            ax.bar(xs, ratios, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(BARS)), [b[0] for b in BARS])
        ax.set_ylabel("time / vLLM native compiled (lower is better)")
        ax.set_title(f"{data['family']} ({data['preset']} widths, bf16, 2 cores)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = results / "threeway.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
