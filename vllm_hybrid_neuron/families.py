"""The model families the plugin serves, and their architecture names: the one list.

Registration (both backends), the tiny-model builder and the tests read it from here. Adding a
family: an entry below, its CPU model classes in ``cpu/models/<cpu_module>.py`` (named as the
architectures), its NxDI port in ``neuron/`` (``neuron/registration.PORTS``), its preset in
``tools/tiny.py`` (see docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str              # short name used by tools, tests and benchmarks
    causal: str            # architecture of the text-only checkpoint
    multimodal: str | None  # the *ForConditionalGeneration architecture (served text-only)
    cpu_module: str        # vllm_hybrid_neuron.cpu.models.<cpu_module> holds the CPU classes

    @property
    def architectures(self) -> tuple[str, ...]:
        return (self.causal,) + ((self.multimodal,) if self.multimodal else ())


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("granite", "GraniteMoeHybridForCausalLM", None, "granite_moe_hybrid"),
    Family("qwen3_5", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration",
           "qwen3_5_moe"),
    Family("gemma4", "Gemma4ForCausalLM", "Gemma4ForConditionalGeneration", "gemma4"),
)}

ARCHITECTURES: tuple[str, ...] = tuple(a for f in FAMILIES.values() for a in f.architectures)


def cpu_class_path(architecture: str) -> str:
    """``"module:Class"`` of the plugin's CPU model class for ``architecture``."""
    family = family_of(architecture)
    return f"vllm_hybrid_neuron.cpu.models.{family.cpu_module}:{architecture}"


def family_of(architecture: str) -> Family:
    for family in FAMILIES.values():
        if architecture in family.architectures:
            return family
    raise KeyError(f"{architecture} is not an architecture of vllm-hybrid-neuron "
                   f"({', '.join(ARCHITECTURES)})")
