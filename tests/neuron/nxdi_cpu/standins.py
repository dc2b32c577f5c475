"""Thin stand-ins for the Neuron packages that cannot install on a CPU host.

Stubbed (every submodule fabricated on import, every attribute a permissive ``Stub``):
    torch_xla, torch_neuronx, neuronxcc (incl. neuronxcc.nki), nki, libneuronxla, nkilib;
    boto3, botocore, tenacity (training-only imports of neuronx_distributed)
Given real behaviour:
    torch_neuronx.utils.get_platform_target() -> "trn2"
    torch_xla.core.xla_model.REDUCE_SUM / _MAX / ... -> their string values ("sum", "max", ...)
    nki.jit / neuronxcc.nki.jit (and any stubbed decorator) return the function unchanged
Nothing here computes: a stub called with a tensor raises, so a silent wrong result cannot come from it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

NEURON_PACKAGES = ("torch_xla", "torch_neuronx", "neuronxcc", "nki", "libneuronxla", "nkilib")
# On PyPI but not installed here: neuronx_distributed.trainer imports them for S3 checkpoint storage
# (training only); stubbed rather than added to the test extra, which keeps CI's install as it is.
PYPI_ONLY_AT_IMPORT = ("boto3", "botocore", "tenacity")
STUBBED_PACKAGES = NEURON_PACKAGES + PYPI_ONLY_AT_IMPORT


class Stub:
    """Stands for any attribute of a stubbed module: attribute access, decoration and subclassing work."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> "Stub":
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return Stub(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        # a decorator (@nki.jit, nki.jit(kernel, mode=...)) or a decorator factory (@nki.jit(mode=...))
        if args and callable(args[0]) and not isinstance(args[0], type):
            return args[0]
        import torch

        if not any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values())):
            return Stub(f"{self._name}(...)")  # import-time construction (enums, config records)
        raise RuntimeError(f"stand-in {self._name} was called on the CPU path; it has no CPU behaviour")

    def __getitem__(self, item) -> "Stub":
        return Stub(f"{self._name}[...]")

    def __mro_entries__(self, bases):
        return (type(self._name.rsplit(".", 1)[-1], (), {}),)

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<stand-in {self._name}>"


def _get_platform_target() -> str:
    return "trn2"


# torch_xla's reduce-type constants are plain strings; NxD keys its CPU-mode (gloo) reduce-op table
# by them, so they must be stable values, not a fresh stub per attribute access.
_XLA_REDUCE_TYPES = {f"REDUCE_{op.upper()}": op for op in ("sum", "mul", "and", "or", "min", "max")}

OVERRIDES = {
    "torch_xla.core.xla_model": _XLA_REDUCE_TYPES,
    "torch_neuronx.utils": {"get_platform_target": _get_platform_target},
    "torch_neuronx.utils.utils": {"get_platform_target": _get_platform_target},
}


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return Stub(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in STUBBED_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__file__ = f"<stand-in {spec.name}>"
        return module

    def exec_module(self, module):
        for key, value in OVERRIDES.get(module.__name__, {}).items():
            setattr(module, key, value)


# transformers here is 5.x, NxDI pins 4.57: modules / names that 4.57 had and 5.x dropped, stubbed only
# where the installed transformers lacks them.
TRANSFORMERS_GAPS = {
    "transformers.utils.fx": ("HFTracer",),
}


def _fill_transformers_gaps() -> list[str]:
    filled = []
    for mod_name, names in TRANSFORMERS_GAPS.items():
        try:
            module = importlib.import_module(mod_name)
        except ImportError:
            module = types.ModuleType(mod_name)
            module.__file__ = f"<stand-in {mod_name}>"
            sys.modules[mod_name] = module
        for name in names:
            if not hasattr(module, name):
                value = Stub(f"{mod_name}.{name}")
                setattr(module, name, type(name, (), {"__doc__": repr(value)}))
                filled.append(f"{mod_name}.{name}")
    return filled


# TorchScript custom classes torch_neuronx's C++ library registers (``torch.classes.<ns>.<name>``);
# neuronx_distributed names them in annotations evaluated at import time.
TORCH_CLASSES = {
    "neuron": ("SPMDModel", "LayoutTransformation", "Runtime"),
}


def _fill_torch_classes() -> None:
    import torch

    for namespace, names in TORCH_CLASSES.items():
        ns = getattr(torch.classes, namespace)  # torch caches the namespace object on torch.classes
        for name in names:
            ns.__dict__.setdefault(name, type(name, (), {"__doc__": f"stand-in torch.classes.{namespace}.{name}"}))


def install() -> list[str]:
    """Put the finder first on sys.meta_path and fill the transformers gaps (idempotent).

    Returns the transformers names that were stubbed."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    _fill_torch_classes()
    return _fill_transformers_gaps()
