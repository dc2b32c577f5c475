"""llama.cpp as the CPU anchor of the benchmarks (benchmark-only: never a runtime or test need).

    .venv/bin/python benchmarks/llamacpp.py --family granite [--model-dir DIR]

Builds bench_serve.py's checkpoint (or reuses DIR), converts it to a bf16 GGUF with the
converter vendored in llama.cpp, runs llama-bench (pp1024 / tg128, 2 threads) and writes
benchmarks/results/llamacpp-<family>.json. bench_threeway.py calls the same functions.

llama.cpp is built from PyPI's llama-cpp-python sdist (it vendors llama.cpp and its converter),
outside this repository; ``LLAMACPP_DIR`` (default /work/llama) names where. Without a build
every caller skips llama.cpp and prints ``build_instructions()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
RESULTS = Path(__file__).parent / "results"

# Run inside the vendored converter's directory: the tiny checkpoints' tokenizers are built by
# this project, so the converter cannot recognise their pre-tokenizer by its hash; weights are
# random and llama-bench never tokenizes text, so any BPE pre-tokenizer serves.
_CONVERT_DRIVER = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""

# transformers 5 saves Granite 4.0-H layer types as linear_attention / full_attention; the
# converter reads the hub's spellings (vLLM and the plugin take both).
_GRANITE_LAYER_TYPES = {"linear_attention": "mamba", "full_attention": "attention"}


def default_root() -> Path:
    return Path(os.environ.get("LLAMACPP_DIR", "/work/llama"))


def find_build(root: Path | None = None) -> Path | None:
    """The vendored llama.cpp directory under ``root`` with a built llama-bench, or None."""
    root = default_root() if root is None else Path(root)
    if not root.is_dir():
        return None
    for bench in sorted(root.glob("**/build/bin/llama-bench")):
        llama_dir = bench.parents[2]
        if (llama_dir / "convert_hf_to_gguf.py").is_file() and os.access(bench, os.X_OK):
            return llama_dir
    return None


def build_instructions(root: Path | None = None) -> str:
    root = default_root() if root is None else Path(root)
    return "\n".join([
        f"  mkdir -p {root} && cd {root}",
        f"  pip download --no-deps --no-binary :all: {SDIST} -d .",
        "  tar xzf llama_cpp_python-0.3.36.tar.gz && cd llama_cpp_python-0.3.36/vendor/llama.cpp",
        "  cmake -B build -G Ninja -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "
        "-DCMAKE_BUILD_TYPE=Release",
        "  cmake --build build -j2 --target llama-bench   # ~10 min on 2 cores",
    ])


def _converter_copy(checkpoint: Path, tmp: Path) -> Path:
    """A view of the checkpoint the converter accepts: links to its files, config rewritten."""
    view = tmp / "checkpoint"
    view.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "config.json":
            (view / f.name).symlink_to(f.resolve())
    config = json.loads((checkpoint / "config.json").read_text())
    if config.get("model_type") == "granitemoehybrid" and "layer_types" in config:
        config["layer_types"] = [_GRANITE_LAYER_TYPES.get(t, t) for t in config["layer_types"]]
    (view / "config.json").write_text(json.dumps(config, indent=1))
    return view


def convert(checkpoint_dir, out_gguf, llama_dir) -> Path:
    """bf16 GGUF of a project checkpoint (safetensors) with llama.cpp's vendored converter."""
    checkpoint, out_gguf = Path(checkpoint_dir), Path(out_gguf)
    config = json.loads((checkpoint / "config.json").read_text())
    extra = []
    if config.get("model_type", "").startswith("qwen3_5"):
        extra.append("--no-mtp")  # the configs declare no multi-token-prediction layers
    with tempfile.TemporaryDirectory() as tmp:
        view = _converter_copy(checkpoint, Path(tmp))
        cmd = [sys.executable, "-c", _CONVERT_DRIVER, str(llama_dir), str(view), "--outtype",
               "bf16", "--outfile", str(out_gguf), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=llama_dir)
    if proc.returncode != 0 or not out_gguf.is_file():
        raise RuntimeError("GGUF conversion failed:\n" + proc.stdout[-2000:] + proc.stderr[-4000:])
    return out_gguf


def parse_bench_json(text: str) -> dict:
    """Prompt (n_prompt > 0) and generation (n_gen > 0) speeds from llama-bench's ``-o json``."""
    rows = json.loads(text)
    pp = next(r for r in rows if r.get("n_prompt", 0) > 0 and r.get("n_gen", 0) == 0)
    tg = next(r for r in rows if r.get("n_gen", 0) > 0 and r.get("n_prompt", 0) == 0)
    return {"pp_tokens": pp["n_prompt"], "pp_tok_s": pp["avg_ts"], "pp_tok_s_stddev": pp["stddev_ts"],
            "tg_tokens": tg["n_gen"], "tg_tok_s": tg["avg_ts"], "tg_tok_s_stddev": tg["stddev_ts"],
            "tg_ms_per_token": 1e3 / tg["avg_ts"], "threads": pp.get("n_threads"),
            "build_commit": pp.get("build_commit"), "build_number": pp.get("build_number"),
            "cpu_info": pp.get("cpu_info"), "model_size_bytes": pp.get("model_size")}


def bench(gguf, threads: int = 2, pp: int = 1024, tg: int = 128, reps: int = 2,
          llama_dir: Path | None = None) -> dict:
    """llama-bench prefill (pp) and decode (tg, batch 1) speeds on ``threads`` threads."""
    llama_dir = llama_dir or find_build()
    cmd = [str(llama_dir / "build" / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads),
           "-p", str(pp), "-n", str(tg), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError("llama-bench failed:\n" + proc.stderr[-4000:])
    return parse_bench_json(proc.stdout)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_serve
    from vllm_hybrid_neuron.tools.tiny import build

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(bench_serve.CHECKPOINTS), required=True)
    ap.add_argument("--model-dir", help="reuse a checkpoint built earlier")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    llama_dir = find_build()
    if llama_dir is None:
        print("llama.cpp is not built; nothing measured. To build it:\n" + build_instructions())
        return
    preset, overrides = bench_serve.CHECKPOINTS[args.family]
    model_dir = Path(args.model_dir or tempfile.mkdtemp(prefix=f"bench-{args.family}-"))
    if not (model_dir / "config.json").exists():
        build(args.family, str(model_dir), preset=preset, overrides=overrides, dtype="bfloat16")
    tmp = Path(tempfile.mkdtemp(prefix="gguf-"))
    try:
        gguf = convert(model_dir, tmp / "model-bf16.gguf", llama_dir)
        figures = bench(gguf, threads=args.threads, llama_dir=llama_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures.update(family=args.family, preset=preset, overrides=overrides,
                   machine=platform.machine(), date=time.strftime("%Y-%m-%d"))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"llamacpp-{args.family}.json"
    out.write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
