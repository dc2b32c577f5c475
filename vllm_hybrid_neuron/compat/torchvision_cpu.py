"""Make PyPI's torchvision importable beside a CPU-only torch.

PyPI's torchvision 0.28 for Linux x86_64 is a CUDA build: its ``_C.so`` links
``libc10_cuda.so`` and fails to load beside ``torch==2.13.0+cpu`` (torchvision
catches that), and then ``torchvision/_meta_registrations.py`` calls
``torch.library.register_fake`` for ``torchvision::nms`` and ``::qnms`` unconditionally, which torch
2.13 refuses for an operator that was never defined. transformers imports
torchvision for its image utilities (Gemma 4 and Qwen3.5 configs reach them), so
without this every such import fails.

The fix: a meta-path hook that runs just before ``torchvision._meta_registrations``
executes. If torchvision's C++ ops did not load, it defines the schemas of
those two operators (schemas only, no kernels), so the fake registration succeeds.
Nothing here runs the op: calling ``torchvision.ops.nms`` still raises, as it would
with any torchvision whose extension failed to load.

Installed into the venv as a ``.pth`` line by ``scripts/setup.sh``; it imports
nothing heavy until torchvision itself is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "torchvision._meta_registrations"
# The operators that _meta_registrations.py registers fakes for without checking
# that torchvision's extension loaded.
MISSING_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_state = {"defined": False}
_keep_alive: list = []


def _define_missing_schemas() -> None:
    import torch
    import torchvision.extension as ext

    if ext._has_ops() or hasattr(torch.ops.torchvision, "nms"):
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in MISSING_SCHEMAS:
        lib.define(schema)
    _keep_alive.append(lib)  # a Library deregisters its ops when collected
    _state["defined"] = True


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        _define_missing_schemas()
        self._inner.exec_module(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    """Idempotent: put the hook first on ``sys.meta_path``."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def shim_was_needed() -> bool:
    """True when this process had to define the missing schemas."""
    return _state["defined"]
