"""Parallel layers: neuronx_distributed's classes when importable, plain torch at TP=1 otherwise.

The stand-ins take the same constructor arguments the ports pass (extra TP-only
arguments are accepted and ignored) and keep the parameter names (``weight``,
``bias``), so converted state dicts load into either.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
from torch.nn import functional as F


def _nxd(name: str):
    try:
        return getattr(importlib.import_module("neuronx_distributed.parallel_layers.layers"), name)
    except ImportError:
        return None


class _Linear(nn.Linear):
    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, **_tp_only) -> None:
        super().__init__(input_size, output_size, bias=bias, dtype=dtype)


class _ColumnParallelLinear(_Linear):
    """y = x W^T (+ b); gather_output / pad / sequence_parallel_* only matter at TP > 1."""


class _RowParallelLinear(_Linear):
    """y = x W^T (+ b); input_is_parallel / reduce_dtype only matter at TP > 1."""


class _ParallelEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None,
                 dtype: torch.dtype = torch.float32, **_tp_only) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # padding_idx only affects gradients; the lookup is a plain gather.
        return F.embedding(input_ids, self.weight)


HAS_NXD = _nxd("ColumnParallelLinear") is not None

ColumnParallelLinear = _nxd("ColumnParallelLinear") or _ColumnParallelLinear
RowParallelLinear = _nxd("RowParallelLinear") or _RowParallelLinear
ParallelEmbedding = _nxd("ParallelEmbedding") or _ParallelEmbedding
