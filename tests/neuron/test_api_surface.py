"""The ports against the recorded NxDI / vllm-neuron API (vllm_hybrid_neuron/neuron/api_surface.json).

NxDI is not installed here, so conformance is checked against the record: every method a port
(or a CPU stand-in) overrides has the recorded parameters, and the package reaches nothing of
NxDI / neuronx-distributed that the record does not list.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest

from neuron_helpers import app_cls
from vllm_hybrid_neuron.families import ARCHITECTURES
from vllm_hybrid_neuron.families import FAMILIES as ALL_FAMILIES
from vllm_hybrid_neuron.neuron import base, registration

PKG = Path(base.__file__).parent
SURFACE = json.loads((PKG / "api_surface.json").read_text())
NX = "neuronx_distributed_inference."
FAMILIES = list(ALL_FAMILIES)


def _recorded(*class_names: str) -> dict:
    out = {}
    for name in class_names:
        out.update(SURFACE["classes"][NX + name]["methods"])
    return out


def _ours(cls, name: str):
    raw = next(c.__dict__[name] for c in cls.__mro__ if name in c.__dict__)
    kind = "staticmethod" if isinstance(raw, staticmethod) else \
        "classmethod" if isinstance(raw, classmethod) else "method"
    fn = raw.__func__ if kind != "method" else raw
    names = []
    for p in inspect.signature(fn).parameters.values():
        names.append({p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name)
    return kind, names


def _check(cls, recorded: dict) -> list[str]:
    checked = []
    for name, rec in recorded.items():
        owner = next((c for c in cls.__mro__ if name in c.__dict__), None)
        if owner is None or not owner.__module__.startswith("vllm_hybrid_neuron."):
            continue  # not overridden by us
        kind, names = _ours(cls, name)
        assert kind == rec["kind"], f"{cls.__name__}.{name}: {kind} vs recorded {rec['kind']}"
        star = next((i for i, n in enumerate(names) if n.startswith("*") and not n.startswith("**")), None)
        if star is None:  # same parameters; the traced forward is called positionally
            assert names == rec["params"], f"{cls.__name__}.{name}{names} vs {rec['params']}"
        else:  # *args absorbs the trailing recorded parameters
            assert names[:star] == rec["params"][:star], f"{cls.__name__}.{name}{names} vs {rec['params']}"
        checked.append(name)
    return checked


@pytest.mark.parametrize("family", FAMILIES)
def test_overridden_methods_match_recorded_signatures(family):
    app = app_cls(family)
    model_methods = _check(app._model_cls, _recorded("models.model_base.NeuronBaseModel"))
    assert {"setup_attr_for_model", "init_model", "init_inference_optimization", "forward"} <= set(model_methods)
    config_methods = _check(app.get_config_cls(), _recorded("models.config.InferenceConfig"))
    assert {"add_derived_config", "get_required_attributes", "get_neuron_config_cls"} <= set(config_methods)
    app_methods = _check(app, _recorded("models.application_base.NeuronApplicationBase",
                                        "models.model_base.NeuronBaseForCausalLM"))
    assert {"convert_hf_to_neuron_state_dict", "load_hf_model", "update_state_dict_for_tied_weights",
            "get_config_cls", "get_neuron_config_cls"} <= set(app_methods)
    assert app._model_cls is not None


def test_cpu_stand_ins_match_recorded_signatures():
    _check(base._NeuronBaseModel, _recorded("models.model_base.NeuronBaseModel"))
    _check(base._InferenceConfig, _recorded("models.config.InferenceConfig"))
    _check(base._NeuronBaseForCausalLM, _recorded("models.application_base.NeuronApplicationBase",
                                                  "models.model_base.NeuronBaseForCausalLM"))
    rec = SURFACE["functions"]
    assert list(inspect.signature(base._load_pretrained_config).parameters) == \
        rec[NX + "utils.hf_adapter.load_pretrained_config"]["params"]
    assert list(inspect.signature(base._greedy_sampler).parameters) == \
        rec[NX + "modules.generation.sampling.create_sampler"]["params"]


def _nxdi_references() -> set[str]:
    """Every NxDI / neuronx-distributed name the package reaches (via base._nxdi / layers._nxd or imports)."""
    refs = set()
    for path in PKG.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
                fname = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
                args = [a.value for a in node.args if isinstance(a, ast.Constant)]
                if fname == "_nxdi" and len(args) == 2:
                    refs.add(NX + ".".join(args))
                elif fname == "_nxd" and len(args) == 2:
                    refs.add("neuronx_distributed." + ".".join(args))
                elif fname == "_nxdi" or fname == "_nxd":
                    raise AssertionError(f"{path.name}: non-literal NxDI lookup")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for mod in mods:
                    assert not mod.startswith(("neuronx_distributed", "torch_neuronx", "vllm_neuron")), \
                        f"{path.name}: direct import of {mod} (go through base._nxdi / layers._nxd)"
    return refs


def test_ports_reach_only_recorded_nxdi_names():
    listed = (set(SURFACE["classes"]) | set(SURFACE["functions"]) | set(SURFACE["module_attributes"])
              | set(SURFACE["parallel_layers"]))
    refs = _nxdi_references()
    assert refs and refs <= listed, sorted(refs - listed)


def test_neuron_config_fields_read_are_recorded():
    fields = set()
    for path in PKG.glob("*.py"):
        if path.name == "base.py":
            continue  # the stand-in defines them
        fields |= set(re.findall(r"(?:neuron_config|\bnc)\.(\w+)", path.read_text()))
    assert fields <= set(SURFACE["neuron_config_fields"]), sorted(fields - set(SURFACE["neuron_config_fields"]))


ARCHS = list(ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_neuron_lookup_resolves_to_the_port(arch):
    model_types = registration.insert_ports({"llama": {"causal-lm": object}})
    model, task = registration.model_types_key(arch)
    expected = {"GraniteMoeHybrid": "granite", "Qwen3_5Moe": "qwen3_5", "Gemma4": "gemma4"}[arch.split("For")[0]]
    assert model_types[model][task] is app_cls(expected)
    assert model_types["llama"] == {"causal-lm": object}  # existing entries untouched


def test_lookup_key_rule_matches_the_record():
    rule = SURFACE["functions"]["vllm_neuron.worker.neuronx_distributed_model_loader._get_neuron_model_cls"]
    assert "ConditionalGeneration -> CausalLM" in rule["rule"]
    assert registration.model_types_key("Gemma4ForConditionalGeneration") == ("gemma4", "causal-lm")
    assert registration.model_types_key("LlamaForCausalLM") == ("llama", "causal-lm")


def test_register_without_nxdi_fails_clearly():
    if base.HAS_NXDI:
        pytest.skip("NxDI installed")
    with pytest.raises(ImportError, match="neuronx-distributed-inference"):
        registration.register_neuron_models()


def test_cpu_plugin_import_pulls_in_nothing_neuron():
    import subprocess
    import sys

    code = ("import sys, vllm_hybrid_neuron.registration as r; "
            "print([m for m in sys.modules if m.startswith(('vllm_hybrid_neuron.neuron', 'neuronx'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_hybrid_state_layout(checkpoint):
    from vllm_hybrid_neuron.neuron.cpu_runner import CpuRunner

    r = CpuRunner(app_cls("granite"), checkpoint("granite"), batch_size=3, seq_len=64)
    r.config.architectures = ["GraniteMoeHybridForCausalLM"]
    layout = registration.hybrid_state_layout(r.config)
    per_slot = sum(p[0].numel() * p.element_size() for p in r.model.past_key_values)
    assert layout == {"slots": 3, "slots_per_sequence": 1, "speculative_width": 0,
                      "state_bytes_per_slot": per_slot, "kinds": ["conv", "k", "ssm", "v"]}


@pytest.mark.neuron
def test_compile_and_run_on_neuron():
    pytest.skip("needs Neuron devices and the Neuron SDK: compile each port with NxDI and compare to CPU")
