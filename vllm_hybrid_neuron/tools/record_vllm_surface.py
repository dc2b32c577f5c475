"""Record the vLLM surface the CPU backend relies on (``vllm_hybrid_neuron/cpu/vllm_surface.json``).

Re-record after a vLLM upgrade, once the plugin works on it::

    python -m vllm_hybrid_neuron.tools.record_vllm_surface

``tests/test_vllm_surface.py`` checks the record against the installed vLLM (names resolve,
signatures and metadata fields unchanged) and checks, with ``scan()``, that the CPU backend's
source reaches nothing of vLLM the record lacks.

What ``scan()`` finds statically: ``from vllm... import X`` / ``import vllm.x``, attributes read
on those imported names (``ops.create_onednn_mm``), ``torch.ops.vllm.<op>``, the fields read on
the attention metadata in ``cpu/vllm_seam.py``'s converters (``meta.<field>``, ``ckpt.<field>``) and
private names (``x._name``, ``getattr(x, "_name")``) the plugin does not define itself. What it
cannot find (attributes read on vLLM layer / config objects reached through ``self`` or an
argument) is listed by hand below (``CALLED``, ``DATACLASS_FIELDS``, ``INSTANCE_ATTRIBUTES``,
``SOURCE_PINS``).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent
RECORD = PKG / "cpu" / "vllm_surface.json"

# The CPU backend's served path (package-relative). tools/ is not on it.
CPU_BACKEND_FILES = [
    "registration.py",
    "config_hook.py",
    "compat/cpu_block_size.py",
    *sorted(str(p.relative_to(PKG)) for p in (PKG / "cpu").glob("*.py")),
    *sorted(str(p.relative_to(PKG)) for p in (PKG / "cpu" / "models").glob("*.py")),
    *sorted(str(p.relative_to(PKG)) for p in (PKG / "cpu" / "layers").glob("*.py")),
    *sorted(str(p.relative_to(PKG)) for p in (PKG / "ops").glob("*.py")),
]

# Local name -> vLLM metadata class, per function of the one file that reads metadata.
_CKPT = "vllm.model_executor.layers.mamba.checkpoint:MambaPrefillCheckpointMetadata"
METADATA_NAMES = {
    "cpu/vllm_seam.py": {
        "mamba2_batch": {
            "meta": "vllm.v1.attention.backends.mamba2_attn:Mamba2AttentionMetadata",
            "ckpt": _CKPT,
        },
        "gdn_batch": {
            "meta": "vllm.v1.attention.backends.gdn_attn:GDNAttentionMetadata",
            "ckpt": _CKPT,
        },
    },
}

# Called by the plugin (not overrides: those are found from the plugin's classes). True: called
# positionally, so the order of the recorded parameters matters.
_QGDN = "vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn"
CALLED = {
    "vllm.forward_context:get_forward_context": True,
    "vllm.model_executor.layers.mamba.mamba_utils:is_conv_state_dim_first": True,
    "vllm.utils.torch_utils:_encode_layer_name": True,
    "vllm.distributed:tensor_model_parallel_all_reduce": True,
    "vllm.model_executor.layers.utils:check_cpu_sgl_kernel": True,
    "vllm._custom_ops:create_onednn_mm": True,
    "vllm:ModelRegistry.register_model": True,
    "vllm.model_executor.models.config:VerifyAndUpdateConfig.verify_and_update_config": True,
    "vllm.platforms.cpu:CpuPlatform.check_and_update_config": True,
    # reached through torch.ops.vllm.qwen_gdn_attention_core(mixed_qkv, b, a, out, layer_name)
    f"{_QGDN}:qwen_gdn_attention_core": True,
    f"{_QGDN}:QwenGatedDeltaNetAttention.prepare_gdn_attention_core_inputs": True,
    f"{_QGDN}:QwenGatedDeltaNetAttention.rearrange_mixed_qkv": True,
    f"{_QGDN}:QwenGatedDeltaNetAttention._output_projection": True,
    # FullWidthGatedRMSNorm(full_hidden_size=, full_n_groups=, use_rms_norm=, eps=)
    "vllm.model_executor.layers.mamba.mamba_mixer2:Mixer2RMSNormGated.__init__": False,
}

# Fields / properties read on vLLM config objects (metadata fields are scanned, not listed).
DATACLASS_FIELDS = {
    "vllm.config:VllmConfig": ["cache_config", "model_config", "speculative_config"],
    "vllm.config:CacheConfig": ["block_size", "enable_prefix_caching", "mamba_block_size",
                                "mamba_cache_mode", "num_gpu_blocks"],
    "vllm.config:ModelConfig": ["architecture", "hf_config", "hf_text_config", "is_hybrid"],
    "vllm.model_executor.layers.fused_moe.config:FusedMoEConfig": [
        "activation", "has_bias", "moe_parallel_config"],
    "vllm.model_executor.layers.fused_moe.config:FusedMoEParallelConfig": ["use_ep"],
}

# ``self.<name>`` the plugin's subclasses (or code holding a vLLM object) read on vLLM objects;
# checked as an attribute of the class or a ``self.<name>`` in the source of a vLLM class in its MRO.
INSTANCE_ATTRIBUTES = {
    "vllm.model_executor.layers.mamba.mamba_mixer2:MambaMixer2": [
        "A", "D", "activation", "conv1d", "conv_kernel_size", "conv_weights", "dt_bias",
        "head_dim", "kv_cache", "n_groups", "num_heads", "prefix", "split_hidden_states_B_C_fn",
        "ssm_state_size", "tp_size", "tped_conv_size", "tped_dt_size", "tped_intermediate_size",
        "use_replayssm"],
    f"{_QGDN}:QwenGatedDeltaNetAttention": [
        "A_log", "activation", "conv1d", "conv_kernel_size", "dt_bias", "gqa_interleaved_layout",
        "head_v_dim", "in_proj_ba", "in_proj_qkvz", "kv_cache", "num_v_heads", "prefix",
        "tp_size"],
    "vllm.model_executor.layers.mamba.mamba_mixer2:Mixer2RMSNormGated": [
        "full_hidden_size", "n_groups", "tp_size", "use_rms_norm", "variance_epsilon", "weight"],
    "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:UnquantizedFusedMoEMethod": [
        "experts_cls", "moe"],
    "vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUUnquantizedExperts": ["_use_zentorch"],
    "vllm.model_executor.custom_op:CustomOp": ["_forward_method"],
}

# Text that must stay in vLLM's source (contracts no signature shows).
SOURCE_PINS = {
    # vLLM keeps the plain (dim, width) conv weight beside its packed one (gated_deltanet.py).
    "model_executor/layers/utils.py": ["layer._cpu_unpacked_conv_weight = unpacked",
                                       "layer.cpu_linear ="],
    # the op calls layer._forward_core(mixed_qkv, b, a, core_attn_out)
    "model_executor/layers/mamba/gdn/qwen_gdn_linear_attn.py": [
        'op_name="qwen_gdn_attention_core"', "._forward_core("],
    # vLLM's torch.ops.vllm.mamba_mixer2 calls the layer's conv_ssm_forward
    "model_executor/layers/mamba/mamba_mixer2.py": [".conv_ssm_forward("],
}

# The plugin's classes that subclass vLLM's (their overrides are recorded).
PLUGIN_CLASSES = [
    "vllm_hybrid_neuron.cpu.layers.mamba2_mixer:PluginMambaMixer2",
    "vllm_hybrid_neuron.cpu.layers.gated_deltanet:PluginGatedDeltaNet",
    "vllm_hybrid_neuron.cpu.layers.full_width_gated_norm:FullWidthGatedRMSNorm",
    "vllm_hybrid_neuron.cpu.layers.bf16_linear_layers:Bf16LinearMethod",
    "vllm_hybrid_neuron.cpu.layers.bf16_linear_layers:Bf16EmbeddingMethod",
    "vllm_hybrid_neuron.cpu.layers.moe_experts:PluginCPUExperts",
    "vllm_hybrid_neuron.cpu.models.granite_moe_hybrid:GraniteMoeHybridForCausalLM",
    "vllm_hybrid_neuron.cpu.models.qwen3_5_moe:Qwen3_5MoeForCausalLM",
    "vllm_hybrid_neuron.cpu.models.qwen3_5_moe:Qwen3_5MoeForConditionalGeneration",
    "vllm_hybrid_neuron.cpu.models.gemma4:Gemma4ForCausalLM",
    "vllm_hybrid_neuron.cpu.models.gemma4:Gemma4ForConditionalGeneration",
]

_PLUGIN_PRIVATE_PREFIXES = ("_vhn", "_vllm_hybrid_neuron")
_NOT_VLLM_PRIVATE = {"_C"}  # torch.ops._C


# -- static scan of the CPU backend's source ------------------------------------------------
def scan() -> dict:
    """What the CPU backend's source references of vLLM:
    {"modules": {module: {names}}, "attributes": {"module:Name": {attrs}},
     "custom_ops": {names}, "dataclass_fields": {"module:Class": {fields}},
     "private": {name: [files]}}."""
    modules: dict[str, set] = {}
    attributes: dict[str, set] = {}
    custom_ops: set = set()
    fields: dict[str, set] = {}
    private: dict[str, list] = {}
    defined: set = set()
    for rel in CPU_BACKEND_FILES:
        tree = ast.parse((PKG / rel).read_text(), rel)
        aliases = {}  # local name -> (module, name or None for a module)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.split(".")[0] == "vllm" and node.level == 0:
                for a in node.names:
                    modules.setdefault(node.module, set()).add(a.name)
                    aliases[a.asname or a.name] = (node.module, a.name)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "vllm":
                        modules.setdefault(a.name, set())
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
        meta_names = {}  # id(node) -> {local name: metadata class} inside a listed function
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name in METADATA_NAMES.get(rel, {}):
                for node in ast.walk(fn):
                    meta_names[id(node)] = METADATA_NAMES[rel][fn.name]
        for node in ast.walk(tree):
            attr = base = None
            if isinstance(node, ast.Attribute):
                attr, base = node.attr, node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id in ("getattr", "hasattr") and len(node.args) >= 2 and \
                    isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                attr, base = node.args[1].value, node.args[0]
            if attr is None:
                continue
            if isinstance(base, ast.Name) and base.id in aliases:
                mod, name = aliases[base.id]
                attributes.setdefault(f"{mod}:{name}", set()).add(attr)
            names = meta_names.get(id(node), {})
            if isinstance(base, ast.Name) and base.id in names:
                fields.setdefault(names[base.id], set()).add(attr)
            if isinstance(base, ast.Attribute) and base.attr == "vllm" and \
                    isinstance(base.value, ast.Attribute) and base.value.attr == "ops":
                custom_ops.add(attr)
            if attr.startswith("_") and not attr.startswith("__"):
                private.setdefault(attr, []).append(rel)
    for name in list(private):
        if name in defined or name.startswith(_PLUGIN_PRIVATE_PREFIXES) or name in _NOT_VLLM_PRIVATE:
            del private[name]
    return {"modules": modules, "attributes": attributes, "custom_ops": custom_ops,
            "dataclass_fields": fields, "private": private}


# -- resolution against the installed vLLM --------------------------------------------------
def resolve(ref: str):
    """``"module:a.b"`` -> the object (raises ImportError / AttributeError)."""
    import importlib

    mod, _, qual = ref.partition(":")
    obj = importlib.import_module(mod)
    for part in filter(None, qual.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not inspect.ismodule(obj):
                raise
            obj = importlib.import_module(f"{obj.__name__}.{part}")  # a submodule not yet imported
    return obj


def param_names(fn) -> list[str]:
    out = []
    for p in inspect.signature(fn).parameters.values():
        out.append({p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name)
    return out


def class_fields(cls) -> set[str]:
    """Dataclass fields, annotations (pydantic configs) and class attributes (properties)."""
    names = set(dir(cls))
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    for c in cls.__mro__:
        names |= set(getattr(c, "__annotations__", {}))
    names |= set(getattr(cls, "model_fields", {}) or {})
    return names


def vllm_overrides() -> dict[str, list[str]]:
    """{"module:VllmClass": [methods a plugin class overrides]} from the plugin's classes."""
    out: dict[str, set] = {}
    for ref in PLUGIN_CLASSES:
        cls = resolve(ref)
        vbase = next(c for c in cls.__mro__[1:] if c.__module__.split(".")[0] == "vllm")
        for name, value in cls.__dict__.items():
            if name.startswith("__") and name != "__init__":
                continue  # __subclasshook__ etc. that ABCMeta / typing add
            if callable(value) or isinstance(value, (classmethod, staticmethod)):
                if any(name in c.__dict__ for c in vbase.__mro__
                       if c.__module__.split(".")[0] == "vllm"):
                    out.setdefault(f"{vbase.__module__}:{vbase.__qualname__}", set()).add(name)
    return {k: sorted(v) for k, v in sorted(out.items())}


def _prepare_imports() -> None:
    from vllm_hybrid_neuron.compat import torchvision_cpu

    torchvision_cpu.install()  # Qwen3.5's vLLM module imports torchvision (see registration)


def record() -> dict:
    import vllm

    _prepare_imports()
    found = scan()
    modules = {m: set(n) for m, n in found["modules"].items()}
    for ref, attrs in found["attributes"].items():
        mod, name = ref.split(":")
        target = f"{mod}.{name}"
        if inspect.ismodule(resolve(ref)):
            modules.setdefault(target, set()).update(attrs)
        else:
            modules.setdefault(mod, set()).update(f"{name}.{a}" for a in attrs)
    for name in sorted(modules):
        for n in modules[name]:
            resolve(f"{name}:{n}")  # fails here, not later, if the scan found a stale name

    overrides = vllm_overrides()
    signatures, positional = {}, []
    for ref, pos in CALLED.items():
        signatures[ref] = param_names(resolve(ref))
        if pos:
            positional.append(ref)
    for cls_ref, methods in overrides.items():
        for m in methods:
            ref = f"{cls_ref}.{m}"
            signatures[ref] = param_names(resolve(ref))
            positional.append(ref)

    dc = {k: set(v) for k, v in DATACLASS_FIELDS.items()}
    for cls_ref, f in found["dataclass_fields"].items():
        dc.setdefault(cls_ref, set()).update(f)
    for cls_ref, f in dc.items():
        missing = f - class_fields(resolve(cls_ref))
        assert not missing, f"{cls_ref} lacks {sorted(missing)}"

    return {
        "vllm_version": vllm.__version__,
        "modules": {k: sorted(v) for k, v in sorted(modules.items())},
        "custom_ops": sorted(found["custom_ops"]),
        "signatures": dict(sorted(signatures.items())),
        "called_positionally": sorted(positional),
        "overrides": overrides,
        "dataclass_fields": {k: sorted(v) for k, v in sorted(dc.items())},
        "instance_attributes": {k: sorted(v) for k, v in sorted(INSTANCE_ATTRIBUTES.items())},
        "private_names": sorted(found["private"]),
        "source_pins": SOURCE_PINS,
    }


def main() -> None:
    data = record()
    RECORD.write_text(json.dumps(data, indent=1) + "\n")
    counts = {k: len(v) for k, v in data.items() if isinstance(v, (dict, list))}
    print(f"wrote {RECORD} (vLLM {data['vllm_version']}): {counts}")


if __name__ == "__main__":
    main()
