"""The ports use only operators neuronx-cc compiles.

Each port's prefill and decode run under a dispatch mode that records every ATen operator; the
ones the Neuron compiler rejects (XLA TriangularSolve and the other linear-algebra solvers and
decompositions, listed in Neuron's unsupported-operator errors) must not appear. Checked in the
chunked-prefill configuration too, where the GDN UT transform lives.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from neuron_helpers import app_cls, prompt
from vllm_hybrid_neuron.neuron.cpu_runner import CpuRunner

# Operators that lower to XLA custom calls neuronx-cc has no kernel for.
REJECTED = ("linalg_solve_triangular", "triangular_solve", "linalg_inv", "linalg_solve",
            "linalg_cholesky", "cholesky", "linalg_lu", "lu_", "linalg_qr", "linalg_eig",
            "linalg_svd", "_linalg_svd", "linalg_householder_product", "ormqr", "geqrf")


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))


def rejected(ops: set[str]) -> list[str]:
    return sorted(op for op in ops if op.startswith(REJECTED))


@pytest.mark.parametrize("family,chunk", [("granite", {"ssd_chunk_size": 16}),
                                          ("qwen3_5", {"gdn_chunk_size": 16}), ("gemma4", {})])
def test_no_rejected_operator_in_prefill_or_decode(checkpoint, family, chunk):
    r = CpuRunner(app_cls(family), checkpoint(family), batch_size=2, **chunk)
    with OpRecorder() as rec:
        r.prefill([prompt(40, seed=1), prompt(23, seed=2)], [0, 1])
        r.decode([5, 6], [40, 23], [0, 1])
    assert rec.ops, "the recorder saw nothing"
    assert rejected(rec.ops) == []


def test_the_recorder_sees_a_triangular_solve():
    """The check can fail: the old UT transform (a triangular solve) is caught."""
    with OpRecorder() as rec:
        A = torch.rand(4, 4).tril(-1) + torch.eye(4)
        torch.linalg.solve_triangular(A, torch.eye(4), upper=False, unitriangular=True)
    assert rejected(rec.ops) == ["linalg_solve_triangular"]
