"""Functions to run inside vLLM workers (``LLM.apply_model``) to see what served."""

from __future__ import annotations


def model_class_path(model) -> str:
    """``"module:Class"`` of the model instance a worker holds."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def plugin_op_counts(model) -> dict[str, int]:
    """How many layer calls in this worker went through the plugin's ops, by kind (empty
    unless the worker runs with ``VLLM_HYBRID_NEURON_COUNT_OPS=1``: ``tools/op_probe.py``)."""
    from vllm_hybrid_neuron.tools import op_probe

    return op_probe.snapshot()


# -- per-layer-type time breakdown under torch.profiler ---------------------------
# Forward hooks open a ``record_function("vhn::<kind>")`` range around every layer of a
# kind, so the profiler's key averages give each kind's total time per step.
_PROFILE: dict = {}


def _layer_kind(module) -> str | None:
    name = type(module).__name__
    if "MambaMixer" in name or "GatedDeltaNet" in name:
        return "recurrent_mixer"
    if name.endswith(("MoE", "SparseMoeBlock", "SharedMLP")):  # routed + shared experts
        return "moe"
    if name.endswith("Attention") and "DecoderLayer" not in name:
        return "attention"
    return None


def start_layer_profile(model) -> int:
    """Install the range hooks once and start a CPU profiler in this worker."""
    import torch
    from torch.autograd.profiler import record_function

    if "hooks" not in _PROFILE:
        hooks = []
        # Outermost module of each kind only (a MoE block holds a fused-MoE layer, an
        # attention block holds vLLM's Attention): nested ranges would count twice.
        targets, kept = [(model, "model_step")], []
        for name, module in model.named_modules():
            kind = _layer_kind(module) if module is not model else None
            if kind and not any(name.startswith(k + ".") for k, kk in kept if kk == kind):
                kept.append((name, kind))
                targets.append((module, kind))
        for module, kind in targets:

            def pre(mod, args, kind=kind):
                rf = record_function(f"vhn::{kind}")
                rf.__enter__()
                setattr(mod, f"_vhn_range_{kind}", rf)

            def post(mod, args, output, kind=kind):
                getattr(mod, f"_vhn_range_{kind}").__exit__(None, None, None)

            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        _PROFILE["hooks"] = hooks
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    profiler.__enter__()
    _PROFILE["profiler"] = profiler
    return len(_PROFILE["hooks"]) // 2


def stop_layer_profile(model) -> dict[str, float]:
    """Stop the profiler; total milliseconds per layer kind (and per model step)."""
    profiler = _PROFILE.pop("profiler")
    profiler.__exit__(None, None, None)
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        if event.key.startswith("vhn::"):
            totals[event.key[5:]] = event.cpu_time_total / 1e3
        elif event.key in _RECURRENT_CORE_OPS:  # conv + recurrence, without projections
            totals["recurrent_core"] = totals.get("recurrent_core", 0.0) + event.cpu_time_total / 1e3
    return totals


# vLLM's custom ops that bracket exactly the conv + SSM / delta-rule core of a mixer
# (both the plugin's layers and vLLM's native ones go through them).
_RECURRENT_CORE_OPS = ("vllm::mamba_mixer2", "vllm::qwen_gdn_attention_core",
                       "vllm::cpu_gdn_attention_core")
