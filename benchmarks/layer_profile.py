"""Per-layer-type time breakdown under torch.profiler, run inside a vLLM worker
(``LLM.apply_model``) by benchmarks/profile_layers.py. Benchmark-only: nothing on the served
path imports it.

Forward hooks open a ``record_function("vhn::<kind>")`` range around every layer of a kind,
so the profiler's key averages give each kind's total time per step.
"""

from __future__ import annotations

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
