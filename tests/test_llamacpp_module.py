"""benchmarks/llamacpp.py without a llama.cpp build: discovery, llama-bench output parsing and
the converter's view of a checkpoint (llama.cpp itself is a benchmark-only dependency)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("llamacpp", ROOT / "benchmarks" / "llamacpp.py")
llamacpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llamacpp)

# llama-bench -o json, two result rows (values as llama-bench 0c1e570 writes them)
SAMPLE = json.dumps([
    {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Xeon", "model_size": 1356000000,
     "n_threads": 2, "n_prompt": 1024, "n_gen": 0, "avg_ts": 210.5, "stddev_ts": 1.5},
    {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "Xeon", "model_size": 1356000000,
     "n_threads": 2, "n_prompt": 0, "n_gen": 128, "avg_ts": 32.0, "stddev_ts": 0.2},
])


def test_no_build_is_none(tmp_path):
    assert llamacpp.find_build(tmp_path) is None
    assert llamacpp.find_build(tmp_path / "missing") is None
    assert "pip download" in llamacpp.build_instructions(tmp_path)


def test_a_build_is_found(tmp_path):
    llama = tmp_path / "sdist" / "vendor" / "llama.cpp"
    (llama / "build" / "bin").mkdir(parents=True)
    (llama / "convert_hf_to_gguf.py").write_text("")
    bench = llama / "build" / "bin" / "llama-bench"
    bench.write_text("")
    assert llamacpp.find_build(tmp_path) is None  # not executable
    bench.chmod(0o755)
    assert llamacpp.find_build(tmp_path) == llama


def test_parse_bench_json():
    r = llamacpp.parse_bench_json(SAMPLE)
    assert (r["pp_tokens"], r["pp_tok_s"], r["tg_tokens"], r["tg_tok_s"]) == (1024, 210.5, 128, 32.0)
    assert r["tg_ms_per_token"] == pytest.approx(31.25)
    with pytest.raises(StopIteration):  # a run without its decode row is an error, not a zero
        llamacpp.parse_bench_json(json.dumps(json.loads(SAMPLE)[:1]))


def test_converter_view_renames_granite_layer_types(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"x")
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "granitemoehybrid",
        "layer_types": ["linear_attention", "full_attention", "linear_attention"]}))
    (tmp_path / "work").mkdir()
    view = llamacpp._converter_copy(ckpt, tmp_path / "work")
    assert json.loads((view / "config.json").read_text())["layer_types"] == [
        "mamba", "attention", "mamba"]
    assert (view / "model.safetensors").resolve() == (ckpt / "model.safetensors").resolve()
    assert json.loads((ckpt / "config.json").read_text())["layer_types"][0] == "linear_attention"
