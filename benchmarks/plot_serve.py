"""Plot plugin/native ratios from benchmarks/results/serve-*.json into serve.png.

    .venv/bin/python benchmarks/plot_serve.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# (metric, label, higher is better)
METRICS = [("median_ttft_ms", "TTFT", False), ("median_tpot_ms", "TPOT", False),
           ("output_throughput", "output tok/s", True)]


def main() -> None:
    files = sorted(RESULTS.glob("serve-*.json"))
    fig, axes = plt.subplots(1, len(files), figsize=(7 * len(files), 4.5), squeeze=False)
    for ax, path in zip(axes[0], files):
        data = json.loads(path.read_text())
        keys = list(data["plugin"])
        width = 0.8 / len(METRICS)
        for i, (metric, label, higher) in enumerate(METRICS):
            ratios = [data["plugin"][k][metric] / data["native"][k][metric] for k in keys]
            xs = [j + (i - 1) * width for j in range(len(keys))]
            ax.bar(xs, ratios, width, label=f"{label} ({'higher' if higher else 'lower'} is better)")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(keys)), keys, rotation=15)
        ax.set_ylabel("plugin / native (same run, medians)")
        ax.set_title(f"{data['family']} ({data['preset']} widths, "
                     f"{data['overrides'].get('num_hidden_layers')} layers, bf16, 2 cores)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = RESULTS / "serve.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
