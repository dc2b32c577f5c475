"""Routed experts of an MoE block, grouped by expert: each expert's weights are read once per call.

    out[t] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])
    expert_e(x) = (act(x @ w13[e, :I].T) * (x @ w13[e, I:].T)) @ w2[e].T

The layout is vLLM's (``w13`` = [gate; up] stacked on dim 1). Routing (softmax, top-k,
renormalisation, Gemma 4's scales) and the shared expert stay with the caller. The C++ op
(``csrc/moe_experts.cpp``) accumulates in fp32 with fp32 intermediates and rounds once, to
``x``'s dtype; the reference does the same in plain torch, one expert at a time.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.ops._library import ops, require_c

# Activation codes of the C++ op.
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


def _act(g: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(g)
    if activation == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if activation == "gelu":
        return F.gelu(g)
    raise ValueError(f"activation={activation!r}: choose one of {', '.join(ACTIVATIONS)}")


def moe_experts_ref(out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                    topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    activation: str = "silu") -> None:
    """Reference, written into ``out``. x, out: (M, K); w13: (E, 2I, K); w2: (E, K, I);
    topk_weights, topk_ids: (M, topk)."""
    inter = w13.shape[1] // 2
    acc = torch.zeros(x.shape, dtype=torch.float32)  # (M, K)
    for e in torch.unique(topk_ids).tolist():
        tok, j = torch.nonzero(topk_ids == e, as_tuple=True)  # tokens routed to e
        h = x[tok].float() @ w13[e].float().T  # (n, 2I)
        y = (_act(h[:, :inter], activation) * h[:, inter:]) @ w2[e].float().T  # (n, K)
        acc.index_add_(0, tok, topk_weights[tok, j].float()[:, None] * y)
    out.copy_(acc)


def moe_experts(out: torch.Tensor, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                activation: str = "silu") -> None:
    """Same arguments and result as ``moe_experts_ref`` (one C++ op)."""
    require_c()
    if activation not in ACTIVATIONS:
        _act(x, activation)  # raises, naming the choices
    ops.moe_experts(out, x, w13, w2, topk_weights, topk_ids, ACTIVATIONS[activation])
