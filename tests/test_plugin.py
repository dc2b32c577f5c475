"""The plugin hook itself: idempotent registration, backend choice, disabling it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import run_vllm
from vllm_hybrid_neuron import registration


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


REGISTRY_PROBE = """
import json, logging, vllm_hybrid_neuron
logging.basicConfig(level=logging.INFO)  # vLLM configures logging only in its engines
from vllm.plugins import load_general_plugins
from vllm import ModelRegistry
load_general_plugins()
{extra}
print(json.dumps({{a: ModelRegistry.models[a].module_name for a in {archs!r}}}))
"""


def test_register_twice_is_harmless():
    proc = _python(REGISTRY_PROBE.format(
        extra="vllm_hybrid_neuron.register(); vllm_hybrid_neuron.register()",
        archs=list(registration.ARCHITECTURES)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch, target in registration.CPU_MODELS.items():
        assert modules[arch] == target.split(":")[0]
    banner = "vllm-hybrid-neuron 0.1.0: backend=cpu"
    assert (proc.stdout + proc.stderr).count(banner) == 1


def test_vllm_plugins_can_disable_the_plugin():
    # VLLM_PLUGINS lists the plugins to load: naming another one leaves ours out.
    proc = _python(REGISTRY_PROBE.format(extra="", archs=list(registration.ARCHITECTURES)),
                   env={"VLLM_PLUGINS": "some_other_plugin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(m.startswith("vllm.model_executor.models.") for m in modules.values()), modules
    assert "vllm-hybrid-neuron" not in proc.stdout + proc.stderr


@pytest.fixture
def fresh_registration(monkeypatch):
    monkeypatch.setitem(registration._state, "backend", None)
    calls = []
    monkeypatch.setattr(registration, "_register_cpu_models", lambda: calls.append("cpu"))
    import vllm_hybrid_neuron.neuron.registration as neuron_reg
    monkeypatch.setattr(neuron_reg, "register_neuron_models", lambda archs: calls.append("neuron"))
    return calls


@pytest.mark.parametrize("value,expected", [("cpu", "cpu"), ("neuron", "neuron"),
                                            ("auto", "cpu"), ("", "cpu"), (" CPU ", "cpu")])
def test_backend_switch(monkeypatch, fresh_registration, value, expected):
    monkeypatch.setenv("VLLM_HYBRID_NEURON_BACKEND", value)
    registration.register()
    registration.register()
    assert fresh_registration == [expected]
    assert registration.current_backend() == expected


def test_bad_backend_value_names_the_variable(monkeypatch, fresh_registration):
    monkeypatch.setenv("VLLM_HYBRID_NEURON_BACKEND", "tpu")
    with pytest.raises(ValueError, match="VLLM_HYBRID_NEURON_BACKEND"):
        registration.register()
    assert fresh_registration == []


def test_import_is_light():
    proc = _python("import sys, vllm_hybrid_neuron; "
                   "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_packaging_fixes_hold():
    """The set-up's three fixes: `import vllm` works (no CUDA torchaudio/torchcodec),
    torchvision imports beside CPU torch (the shim was needed), and the `vllm` CLI finds
    its version through the alias distribution."""
    proc = _python("import vllm, torchvision, transformers.image_utils\n"
                   "from vllm_hybrid_neuron.compat import torchvision_cpu\n"
                   "print(vllm.__version__, torchvision_cpu.shim_was_needed())")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["0.32.0", "True"]
    from vllm_hybrid_neuron.tools.server import vllm_executable

    cli = subprocess.run([vllm_executable(), "--version"], capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert cli.stdout.strip().splitlines()[-1] == "0.32.0+cpu"


@pytest.mark.slow
def test_backend_is_logged_by_an_in_process_engine(tiny_model_dir):
    """An in-process engine (LLM with VLLM_ENABLE_V1_MULTIPROCESSING=0) builds its engine config
    in the process that loaded the plugin before vLLM set up logging: the backend line must still
    be logged, once (the config hook announces it)."""
    model_dir = tiny_model_dir("granite")
    result = run_vllm({"model": model_dir, "prompts": [[1, 2, 3]], "max_tokens": 2})
    lines = [l for l in result["log"].splitlines() if "vllm-hybrid-neuron" in l and "backend=" in l]
    assert len(lines) == 1 and "backend=cpu" in lines[0], lines
