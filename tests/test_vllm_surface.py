"""The vLLM surface the CPU backend relies on (vllm_hybrid_neuron/cpu/vllm_surface.json), checked.

Conformance: every recorded name resolves in the installed vLLM, every recorded signature still
has the recorded parameters, every recorded field / attribute / source pin is still there.
Completeness: a scan of the CPU backend's source finds nothing of vLLM the record lacks.
After a vLLM upgrade each moved item fails by name; re-record with
``python -m vllm_hybrid_neuron.tools.record_vllm_surface`` once the plugin is fixed.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
from pathlib import Path

import pytest

from vllm_hybrid_neuron.tools import record_vllm_surface as rec

SURFACE = json.loads(rec.RECORD.read_text())


@pytest.fixture(scope="module", autouse=True)
def _imports():
    rec._prepare_imports()


def _fails(items, check) -> list[str]:
    out = []
    for item in items:
        try:
            problem = check(item)
        except Exception as e:  # noqa: BLE001 - the message names what moved
            problem = f"{type(e).__name__}: {e}"
        if problem:
            out.append(f"{item}: {problem}")
    return out


def test_recorded_names_resolve():
    refs = [f"{m}:{n}" for m, names in SURFACE["modules"].items() for n in names] + \
        [f"{m}:" for m in SURFACE["modules"]]
    bad = _fails(refs, lambda ref: rec.resolve(ref) and None)
    assert not bad, "vLLM names moved:\n" + "\n".join(bad)


def test_recorded_custom_ops_exist():
    import torch

    bad = _fails(SURFACE["custom_ops"],
                 lambda op: None if hasattr(torch.ops.vllm, op) else "no torch.ops.vllm op")
    assert not bad, "\n".join(bad)


def test_recorded_signatures():
    positional = set(SURFACE["called_positionally"])

    def check(ref):
        want, have = SURFACE["signatures"][ref], rec.param_names(rec.resolve(ref))
        if ref in positional:
            return None if have[:len(want)] == want and not (set(have) - set(want)) \
                else f"parameters {have}, recorded {want}"
        missing = [p for p in want if p not in have]
        return f"lost parameters {missing} (now {have})" if missing else None

    bad = _fails(SURFACE["signatures"], check)
    assert not bad, "vLLM signatures changed:\n" + "\n".join(bad)


def test_recorded_dataclass_fields():
    def check(ref):
        missing = sorted(set(SURFACE["dataclass_fields"][ref]) - rec.class_fields(rec.resolve(ref)))
        return f"lost fields {missing}" if missing else None

    bad = _fails(SURFACE["dataclass_fields"], check)
    assert not bad, "vLLM metadata / config fields moved:\n" + "\n".join(bad)


def test_recorded_instance_attributes():
    def check(ref):
        cls = rec.resolve(ref)
        src = "".join(inspect.getsource(c) for c in cls.__mro__
                      if c.__module__.split(".")[0] == "vllm")
        missing = [a for a in SURFACE["instance_attributes"][ref]
                   if not hasattr(cls, a) and not re.search(rf"self\.{re.escape(a)}\b", src)]
        return f"no longer sets {missing}" if missing else None

    bad = _fails(SURFACE["instance_attributes"], check)
    assert not bad, "vLLM layer attributes moved:\n" + "\n".join(bad)


def test_recorded_source_pins():
    import vllm

    root = Path(vllm.__file__).parent

    def check(rel):
        text = (root / rel).read_text()
        missing = [s for s in SURFACE["source_pins"][rel] if s not in text]
        return f"no longer contains {missing}" if missing else None

    bad = _fails(SURFACE["source_pins"], check)
    assert not bad, "vLLM source the plugin relies on changed:\n" + "\n".join(bad)


def test_overrides_are_recorded_and_still_override():
    assert rec.vllm_overrides() == SURFACE["overrides"], "re-record: the plugin's overrides changed"
    refs = [f"{c}.{m}" for c, ms in SURFACE["overrides"].items() for m in ms]
    assert not _fails(refs, lambda r: None if r in SURFACE["signatures"] else "no signature")


def test_source_reaches_nothing_unrecorded():
    found = rec.scan()
    mods = SURFACE["modules"]
    gaps = []
    for m, names in found["modules"].items():
        gaps += [f"{m}:{n}" for n in sorted(names - set(mods.get(m, [None])))]
        if m not in mods:
            gaps.append(f"module {m}")
    for ref, attrs in found["attributes"].items():
        m, name = ref.split(":")
        for a in sorted(attrs):
            if a not in mods.get(f"{m}.{name}", []) and f"{name}.{a}" not in mods.get(m, []):
                gaps.append(f"{ref}.{a}")
    gaps += [f"torch.ops.vllm.{op}" for op in sorted(found["custom_ops"] - set(SURFACE["custom_ops"]))]
    for cls, fields in found["dataclass_fields"].items():
        gaps += [f"{cls}.{f}" for f in sorted(fields - set(SURFACE["dataclass_fields"].get(cls, [])))]
    gaps += [f"private name {n} (in {', '.join(sorted(set(files)))})"
             for n, files in sorted(found["private"].items()) if n not in SURFACE["private_names"]]
    assert not gaps, "the CPU backend uses vLLM names the record lacks (add them, re-record):\n" + \
        "\n".join(gaps)


MIXERS = ["cpu/layers/mamba2_mixer.py", "cpu/layers/gated_deltanet.py"]
SEAM_ONLY = {"get_forward_context", "attn_metadata", "kv_cache", "_encode_layer_name",
             "is_conv_state_dim_first", "_cpu_unpacked_conv_weight"}
SEAM_MODULES = ("vllm.forward_context", "vllm.v1.attention", "vllm.utils.torch_utils",
                "vllm.model_executor.layers.mamba.mamba_utils")
METADATA_NAMES = {"meta", "ckpt", "checkpoint"}


def seam_reads(tree: ast.AST) -> list[str]:
    """What code (not docstrings) in ``tree`` reaches that only cpu/vllm_seam.py may."""
    reached = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and n.id in SEAM_ONLY:
            reached.append(n.id)
        elif isinstance(n, ast.Attribute):
            if n.attr in SEAM_ONLY:
                reached.append(n.attr)
            if isinstance(n.value, ast.Name) and n.value.id in METADATA_NAMES:
                reached.append(f"{n.value.id}.{n.attr}")  # a metadata field read
            if isinstance(n.value, ast.Name) and n.value.id == "torch" and n.attr == "ops":
                reached.append("torch.ops")  # a custom op called directly
        elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith(SEAM_MODULES):
            reached.append(n.module)
        elif isinstance(n, ast.Constant) and n.value in SEAM_ONLY:
            reached.append(n.value)  # getattr(x, "_private")
    return sorted(set(reached))


@pytest.mark.parametrize("rel", MIXERS)
def test_mixers_reach_vllm_state_only_through_the_seam(rel):
    """The mixers consume cpu.batch.RecurrentBatch; vLLM's metadata, cache views, custom ops
    and private attributes are read in cpu/vllm_seam.py alone (checked on the code, not the
    docstrings)."""
    reached = seam_reads(ast.parse((rec.PKG / rel).read_text()))
    assert reached == [], reached


def test_private_vllm_names_are_touched_in_the_seam_only():
    """vLLM's private names (and torch.ops.vllm) appear in cpu/vllm_seam.py alone."""
    found = rec.scan()
    elsewhere = {n: sorted(set(f) - {"cpu/vllm_seam.py"}) for n, f in found["private"].items()}
    assert {n: f for n, f in elsewhere.items() if f} == {}
