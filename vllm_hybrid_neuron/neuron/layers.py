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


def _nxd(module: str, name: str):
    """``neuronx_distributed.<module>.<name>``, or None when neuronx-distributed is not importable."""
    try:
        return getattr(importlib.import_module(f"neuronx_distributed.{module}"), name)
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


HAS_NXD = _nxd("parallel_layers.layers", "ColumnParallelLinear") is not None

# Parameters outside linear layers that NxD must shard (tp.ShardedWeight) live in a subclass of
# NxD's BaseParallelLinear: get_sharded_checkpoint only cuts tensors of its parallel layer types.
BaseParallelLayer = _nxd("parallel_layers.layers", "BaseParallelLinear") or nn.Module


def set_parallel_attributes(param: nn.Parameter, dim: int, num_partitions: int, stride: int = 1) -> None:
    """Mark param as split along dim into num_partitions pieces (NxD's sharding attributes); with
    stride s each piece is the concatenation of its share of s equal parts (gate | up)."""
    _nxd("parallel_layers.utils", "set_tensor_model_parallel_attributes")(
        param, is_parallel=True, dim=dim, stride=stride, num_partitions=num_partitions)

ColumnParallelLinear = _nxd("parallel_layers.layers", "ColumnParallelLinear") or _ColumnParallelLinear
RowParallelLinear = _nxd("parallel_layers.layers", "RowParallelLinear") or _RowParallelLinear
ParallelEmbedding = _nxd("parallel_layers.layers", "ParallelEmbedding") or _ParallelEmbedding
