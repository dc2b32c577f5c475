"""Functions to run inside vLLM workers (``LLM.apply_model``) to see what served."""

from __future__ import annotations


def model_class_path(model) -> str:
    """``"module:Class"`` of the model instance a worker holds."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def plugin_op_counts(model) -> dict[str, int]:
    """How many layer calls in this worker went through the plugin's ops, by kind."""
    from vllm_hybrid_neuron.cpu.layers import op_stats

    return op_stats.snapshot()


# -- per-layer-type time breakdown under torch.profiler ---------------------------
# Forward hooks open a ``record_function("vhn::<kind>")`` range around every layer of a
# kind, so the profiler's key averages give each kind's total time per step.
_PROFILE: dict = {}


def _layer_kind(module) -> str | None:
    name = type(module).__name__
    if "MambaMixer" in name or "GatedDeltaNet" in name:
        return "recurrent_mixer"
    if "MoE" in name or "Moe" in name:
        return "moe"
    if name.endswith("Attention"):
        return "attention"
    return None


def start_layer_profile(model) -> int:
    """Install the range hooks once and start a CPU profiler in this worker."""
    import torch
    from torch.autograd.profiler import record_function

    if "hooks" not in _PROFILE:
        hooks = []
        targets = [(m, _layer_kind(m)) for m in model.modules()] + [(model, "model_step")]
        for module, kind in targets:
            if kind is None:
                continue

            def pre(mod, args, kind=kind):
                mod._vhn_range = record_function(f"vhn::{kind}")
                mod._vhn_range.__enter__()

            def post(mod, args, output):
                mod._vhn_range.__exit__(None, None, None)

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
    return totals
