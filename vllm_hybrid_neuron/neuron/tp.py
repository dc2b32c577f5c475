"""Tensor parallelism for the ports: which heads each rank holds, and the rank-major checkpoint layout.

NxD shards a checkpoint by cutting each parallel layer's full tensor into ``tp_degree``
contiguous pieces along its partition dim (``get_sharded_checkpoint``). The ports' weight
conversion therefore writes every sharded tensor *rank-major*: piece r is exactly what rank r
needs, in the order its forward reads it. That covers what contiguous cutting cannot:
fused projections (Mamba2 ``in_proj`` = [z, x, B, C, dt], GDN ``in_proj_qkv`` = [q, k, v]), whose
parts are each split per head, and heads that are fewer than the ranks (KV heads, Mamba2 groups,
GDN key heads), which are copied so that every rank holds the one its query / value heads use.

Head assignment (``head_split``): with ``n`` heads over ``tp`` ranks, ``n % tp == 0`` gives rank r
heads ``[r n/tp, (r+1) n/tp)``; ``tp % n == 0`` gives rank r the single head ``r n // tp``
(replicated ``tp / n`` times). Query-like heads (attention queries, Mamba2 heads, GDN value heads)
must divide evenly; the shared ones (KV heads, groups, GDN key heads) may be replicated, and
because both use the same contiguous order, rank r's query heads always read rank r's copy.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_hybrid_neuron.neuron.layers import HAS_NXD, BaseParallelLayer, _nxd, set_parallel_attributes


def tp_degree(config) -> int:
    return int(config.neuron_config.tp_degree)


def per_rank(n: int, tp: int, name: str) -> int:
    """n split evenly over tp ranks; a config field that does not divide raises, naming it."""
    if n % tp:
        raise ValueError(f"{name}={n} is not divisible by tp_degree={tp}")
    return n // tp


def head_split(n: int, tp: int, name: str) -> list[list[int]]:
    """Heads each rank holds: contiguous blocks when tp divides n, one replicated head when n divides tp."""
    if n % tp == 0:
        k = n // tp
        return [list(range(r * k, (r + 1) * k)) for r in range(tp)]
    if tp % n == 0:
        return [[r * n // tp] for r in range(tp)]
    raise ValueError(f"{name}={n}: neither a multiple nor a divisor of tp_degree={tp}")


def heads_per_rank(n: int, tp: int, name: str) -> int:
    return len(head_split(n, tp, name)[0])


def take_heads(w: torch.Tensor, head_dim: int, heads: list[int], dim: int = 0) -> torch.Tensor:
    """Rows (along dim) of the given heads, each head_dim wide, in that order."""
    idx = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])
    return w.index_select(dim, idx)


def rank_major(per_rank_parts: list[list[torch.Tensor]], dim: int = 0) -> torch.Tensor:
    """[[rank 0's parts], [rank 1's parts], ...] -> one tensor NxD cuts into exactly those pieces."""
    return torch.cat([torch.cat(parts, dim) for parts in per_rank_parts], dim)


def shard_heads(w: torch.Tensor, n_heads: int, head_dim: int, tp: int, name: str, dim: int = 0) -> torch.Tensor:
    """One per-head tensor laid out rank-major (replicating heads when there are fewer than ranks)."""
    return rank_major([[take_heads(w, head_dim, hs, dim)] for hs in head_split(n_heads, tp, name)], dim)


def shard_fused(parts: list[tuple[torch.Tensor, int, int, str]], tp: int, dim: int = 0) -> torch.Tensor:
    """Fused projection: parts (tensor, n_heads, head_dim, config name) concatenated along dim in the
    full model; here each rank's piece is [part0 heads of rank r, part1 heads of rank r, ...]."""
    splits = [head_split(n, tp, name) for _, n, _, name in parts]
    return rank_major([[take_heads(w, hd, s[r], dim) for (w, _, hd, _), s in zip(parts, splits)]
                       for r in range(tp)], dim)


def reduce_sum(x: torch.Tensor, tp: int) -> torch.Tensor:
    """Sum over the tensor-parallel ranks (identity at TP=1)."""
    if tp == 1:
        return x
    return _nxd("parallel_layers.mappings", "reduce_from_tensor_model_parallel_region")(x)


class ShardedWeight(BaseParallelLayer):
    """One tensor split across the ranks along ``dim`` (per-head or per-channel parameters outside
    a linear layer: conv weights, dt_bias, A_log, D, norm weights of sharded channels).

    ``weight`` holds this rank's piece, ``full_shape[dim] / tp`` wide; NxD's checkpoint sharding
    cuts the full (rank-major) checkpoint tensor into those pieces. ``stride=2`` instead takes
    rank r's share of each half ([gate | up] -> [gate_r | up_r], as NxD's fused expert weights).
    At TP=1 it is a plain holder.
    """

    def __init__(self, full_shape: tuple[int, ...], tp: int, dtype: torch.dtype, fill: float = 0.0,
                 dim: int = 0, stride: int = 1) -> None:
        nn.Module.__init__(self)
        shape = list(full_shape)
        shape[dim] = per_rank(shape[dim], tp, f"sharded dim {dim} of {tuple(full_shape)}")
        self.weight = nn.Parameter(torch.full(shape, fill, dtype=dtype), requires_grad=False)
        if HAS_NXD and tp > 1:
            set_parallel_attributes(self.weight, dim=dim, num_partitions=tp, stride=stride)


def require_nxd_for_tp(tp: int, what: str) -> None:
    if tp > 1 and not HAS_NXD:
        raise ValueError(f"{what}: tp_degree={tp} needs neuronx-distributed (its parallel layers and "
                         "collectives); without it only tp_degree=1 runs")
