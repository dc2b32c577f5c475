"""The neuron backend's registration, under a vllm-neuron-like platform (no Neuron stack here).

``fake_neuron_stack/`` supplies vllm-neuron 0.2's ``NeuronPlatform`` (recorded attributes, with
``device_type == "cpu"`` as the real one) and NxDI's ``MODEL_TYPES``; each probe runs in a fresh
process with vLLM's platform set to it, so vLLM's registries in this process stay untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_hybrid_neuron import registration

FAKE_STACK = Path(__file__).parent / "fake_neuron_stack"
ARCHS = list(registration.ARCHITECTURES)

PRELUDE = """
import json, sys
import vllm.platforms
from vllm_neuron.platform import NeuronPlatform
vllm.platforms.current_platform = NeuronPlatform()
import vllm_hybrid_neuron
vllm_hybrid_neuron.register()
from vllm_hybrid_neuron import registration
"""


def _probe(code: str, **env) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join([str(FAKE_STACK), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": pythonpath,
                                            "VLLM_HYBRID_NEURON_BACKEND": "auto", **env})


def _last_json(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_platform_detection_does_not_trust_device_type():
    sys.path.insert(0, str(FAKE_STACK))
    try:
        from vllm.platforms.cpu import CpuPlatform
        from vllm_neuron.platform import NeuronPlatform
    finally:
        sys.path.remove(str(FAKE_STACK))
    assert NeuronPlatform.device_type == "cpu"  # as vllm-neuron 0.2 sets it
    assert registration.is_neuron_platform(NeuronPlatform())
    assert not registration.is_neuron_platform(CpuPlatform())

    class InTreeNeuron:  # vLLM's old in-tree platform
        device_type = "neuron"

    assert registration.is_neuron_platform(InTreeNeuron())


def test_neuron_platform_registers_the_ports_with_all_three_registries():
    out = _last_json(_probe("""
from neuronx_distributed_inference.utils.constants import MODEL_TYPES
from vllm import ModelRegistry
from vllm.model_executor.models.registry import _ModelInfo
from vllm.model_executor.models.config import MODELS_CONFIG_MAP
lazy = {k: isinstance(dict.__getitem__(v, "causal-lm"), str) for k, v in MODEL_TYPES.items()}
port = MODEL_TYPES["qwen3_5moe"]["causal-lm"]
from vllm_hybrid_neuron.neuron.vllm_side import NxdiServedModel
info = _ModelInfo.from_model_cls(NxdiServedModel)
print(json.dumps({
    "backend": registration.current_backend(),
    "lazy_before_lookup": lazy,
    "port": port.__module__ + ":" + port.__name__,
    "vllm": {a: ModelRegistry.models[a].module_name + ":" + ModelRegistry.models[a].class_name
             for a in registration.ARCHITECTURES},
    "hooks": sorted(a for a in registration.ARCHITECTURES
                    if getattr(MODELS_CONFIG_MAP.get(a), "_vllm_hybrid_neuron_hook", False)),
    "text_generation": info.is_text_generation_model, "hybrid": info.is_hybrid,
}))
"""))
    assert out["backend"] == "neuron"
    assert out["lazy_before_lookup"] == {"granitemoehybrid": True, "qwen3_5moe": True, "gemma4": True}
    assert out["port"] == "vllm_hybrid_neuron.neuron.qwen3_5_moe:NeuronQwen3_5MoeForCausalLM"
    assert set(out["vllm"].values()) == {"vllm_hybrid_neuron.neuron.vllm_side:NxdiServedModel"}
    assert out["hooks"] == sorted(ARCHS)
    # vLLM sees a plain text generator: no Mamba cache sizing for state that lives on device.
    assert out["text_generation"] and not out["hybrid"]


ENGINE_CONFIG = """
from vllm.engine.arg_utils import EngineArgs
kwargs = json.loads(sys.argv[-1]) if len(sys.argv) > 1 else {{}}
try:
    cfg = EngineArgs(model={model!r}, max_model_len=256, **{kwargs}).create_engine_config()
    print(json.dumps({{"ok": True, "prefix_caching": cfg.cache_config.enable_prefix_caching}}))
except Exception as e:
    print(json.dumps({{"ok": False, "error": f"{{type(e).__name__}}: {{e}}"}}))
"""


@pytest.fixture(scope="module")
def qwen_dir(tiny_model_dir):
    return tiny_model_dir("qwen3_5")


def test_vllm_config_refuses_speculative_decoding_naming_the_setting(qwen_dir):
    spec = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2,
                                   "prompt_lookup_max": 3}}
    proc = _probe(ENGINE_CONFIG.format(model=qwen_dir, kwargs=repr(spec)))
    out = _last_json(proc)
    assert not out["ok"] and "speculative_config" in out["error"], out


def test_vllm_config_turns_prefix_caching_off_and_says_so(qwen_dir):
    proc = _probe(ENGINE_CONFIG.format(model=qwen_dir, kwargs=repr({"enable_prefix_caching": True})))
    out = _last_json(proc)
    assert out == {"ok": True, "prefix_caching": False}, out
    assert "enable_prefix_caching turned off" in proc.stdout + proc.stderr


def test_vllm_config_refuses_native_scheduler_chunked_prefill(qwen_dir):
    proc = _probe(ENGINE_CONFIG.format(model=qwen_dir, kwargs="{}"), DISABLE_NEURON_CUSTOM_SCHEDULER="1")
    out = _last_json(proc)
    assert not out["ok"] and "DISABLE_NEURON_CUSTOM_SCHEDULER" in out["error"], out


def test_placeholder_is_never_built():
    from vllm_hybrid_neuron.neuron.vllm_side import NxdiServedModel

    with pytest.raises(RuntimeError, match="vllm-neuron"):
        NxdiServedModel(vllm_config=None)
