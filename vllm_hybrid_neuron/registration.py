"""The plugin's one hook into vLLM: pick a backend and register the model classes.

vLLM loads general plugins in every process it starts (API server, engine core,
workers, the model-inspection subprocess), so ``register()`` must be idempotent
and cheap: architectures are registered as lazy ``"module:Class"`` strings.
"""

from __future__ import annotations

import logging

from vllm_hybrid_neuron import __version__, envs
from vllm_hybrid_neuron.families import ARCHITECTURES, cpu_class_path

# A child of vLLM's "vllm" logger, so its handler and format apply.
logger = logging.getLogger("vllm.hybrid_neuron")

# Architecture name -> "module:Class" of the plugin's CPU model classes.
CPU_MODELS: dict[str, str] = {arch: cpu_class_path(arch) for arch in ARCHITECTURES}

# "backend": the backend this process registered; "announced": the backend its log line named.
_state: dict[str, str | None] = {"backend": None, "announced": None}


def is_neuron_platform(platform) -> bool:
    """Whether vLLM's resolved platform is AWS Neuron.

    Not ``device_type``: vllm-neuron's ``NeuronPlatform`` (the out-of-tree platform plugin, 0.2)
    sets ``device_type = device_name = "cpu"``. It is recognised by its class's package, or by the
    Neuron runtime's device-control variable; ``device_type == "neuron"`` covers vLLM's old
    in-tree Neuron platform.
    """
    cls = type(platform)
    return (cls.__module__.split(".")[0] == "vllm_neuron"
            or getattr(platform, "device_control_env_var", None) == "NEURON_RT_VISIBLE_CORES"
            or getattr(platform, "device_type", None) == "neuron")


def resolve_backend() -> str:
    """"cpu" or "neuron": the env override if set, else the platform vLLM resolved."""
    requested = envs.backend_override()
    if requested != "auto":
        return requested
    from vllm.platforms import current_platform

    return "neuron" if is_neuron_platform(current_platform) else "cpu"


def current_backend() -> str | None:
    """The backend this process registered, or None before ``register()``."""
    return _state["backend"]


def register() -> None:
    if _state["backend"] is not None:
        return
    import vllm.logger  # noqa: F401  (configures the "vllm" logger this one inherits)

    backend = resolve_backend()
    if backend == "neuron":
        from vllm_hybrid_neuron.neuron.registration import register_neuron_models

        register_neuron_models(ARCHITECTURES)
    else:
        _register_cpu_models()
    _state["backend"] = backend
    if logger.hasHandlers():  # some handler (vLLM's, or the root's) would print it now
        announce()


def announce() -> None:
    """Log which backend serves which architectures, once per process.

    vLLM 0.32 sets up its logging lazily: the process that builds the engine config (the API
    server, or an in-process ``LLM`` engine) loads plugins before that, where the line would be
    dropped. ``register()`` logs it where logging is already set up (engine core, workers);
    elsewhere the config hook calls this when vLLM builds the engine config for one of the
    plugin's architectures.
    """
    if _state["backend"] is None or _state["announced"] == _state["backend"]:
        return
    _state["announced"] = _state["backend"]
    logger.info(
        "vllm-hybrid-neuron %s: backend=%s, architectures: %s",
        __version__, _state["backend"], ", ".join(ARCHITECTURES),
    )


def _register_cpu_models() -> None:
    from vllm import ModelRegistry

    from vllm_hybrid_neuron.compat import cpu_block_size, torchvision_cpu
    from vllm_hybrid_neuron.cpu import config_hooks

    # Qwen3.5's vLLM module imports transformers' image processors, which import
    # torchvision; make that import work even where the venv lacks the .pth hook.
    torchvision_cpu.install()
    for arch, target in CPU_MODELS.items():
        ModelRegistry.register_model(arch, target)
    config_hooks.install(CPU_MODELS)
    cpu_block_size.install(CPU_MODELS)
    if envs.count_ops():  # tests only: count the plugin's layer calls
        from vllm_hybrid_neuron.tools import op_probe

        op_probe.install()
