"""Put the plugin's layers in place of vLLM's inside a freshly built model.

vLLM builds its mixers deep inside the decoder layers; the plugin's model classes
call these right after ``super().__init__`` (before weights load) so that only the
plugin's architectures change, never other models that share vLLM's layers. The
plugin layers are subclasses that add no state, so switching an instance's class
keeps its parameters, weight loaders and registration in vLLM's forward context.
"""

from __future__ import annotations

from torch import nn


def swap_layer_class(model: nn.Module, native: type, plugin: type) -> int:
    """Make every instance of exactly ``native`` in ``model`` a ``plugin`` instance."""
    assert issubclass(plugin, native) and plugin.__dict__.get("__init__") is None, (
        f"{plugin.__name__} must be a state-free subclass of {native.__name__}")
    swapped = 0
    for module in model.modules():
        if type(module) is native:
            module.__class__ = plugin
            swapped += 1
    return swapped


def require(condition: bool, parameter: str, message: str) -> None:
    """Refuse an unsupported configuration at load time, naming the parameter."""
    if not condition:
        raise ValueError(f"vllm-hybrid-neuron (CPU backend): {parameter}: {message}")
