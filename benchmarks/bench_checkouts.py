"""Serve the same checkpoint from two checkouts of the plugin, interleaved: did a change move
end-to-end speed?

    .venv/bin/python benchmarks/bench_checkouts.py --family granite --before /path/to/worktree \
        [--runs 2] [--quick] [--model-dir DIR] [--label seam]

"before" is another checkout of this repository (``git worktree add DIR REV``, with its
``_C*.so`` copied or built); its package is put first on PYTHONPATH for the served process, so
vLLM loads that plugin. "after" is this checkout. Runs alternate (before, after, before, ...)
on bench_serve.py's workloads and checkpoints; medians go to
benchmarks/results/checkouts-<label>-<family>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import bench_serve as bs  # beside this script

from vllm_hybrid_neuron.tools.tiny import build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(bs.CHECKPOINTS), required=True)
    ap.add_argument("--before", required=True, help="checkout served as 'before'")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model-dir")
    ap.add_argument("--label", default="change")
    args = ap.parse_args()
    before = Path(args.before).resolve()
    assert (before / "vllm_hybrid_neuron" / "registration.py").exists(), before
    preset, overrides = bs.CHECKPOINTS[args.family]
    model_dir = args.model_dir or tempfile.mkdtemp(prefix=f"bench-{args.family}-")
    if not (Path(model_dir) / "config.json").exists():
        build(args.family, model_dir, preset=preset, overrides=overrides, dtype="bfloat16")
    sides = {"before": {"PYTHONPATH": str(before)}, "after": {}}
    samples = {side: [] for side in sides}
    for _ in range(args.runs):
        for side, env in sides.items():
            bs.PATHS[side] = env  # serve_and_bench reads the path's env from PATHS
            samples[side].append(bs.serve_and_bench(model_dir, side, args.quick))
    table = {side: {key: {m: statistics.median(r[key][m] for r in runs) for m in bs.METRICS}
                    for key in runs[0]} for side, runs in samples.items()}
    out = bs.RESULTS / f"checkouts-{args.label}-{args.family}"
    out.with_suffix(".json").write_text(json.dumps(
        {"family": args.family, "runs": args.runs, "quick": args.quick, "medians": table,
         "samples": samples, "when": time.strftime("%Y-%m-%d %H:%M")}, indent=2) + "\n")
    lines = [f"| {args.family} workload | TTFT ms (after / before) | TPOT ms (after / before) | "
             "output tok/s (after / before) |", "|---|---|---|---|"]
    for key in table["after"]:
        cells = [f"{table['after'][key][m]:.1f} / {table['before'][key][m]:.1f} = "
                 f"{table['after'][key][m] / table['before'][key][m]:.2f}x" for m in bs.METRICS]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
