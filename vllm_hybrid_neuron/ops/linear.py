"""Dense projection for decode-sized batches: out = x @ weight^T + bias.

vLLM's CPU linear layers call oneDNN, or torch's linear where oneDNN cannot build a bf16
matmul (CPUs without AVX512-BF16); torch's bf16 path then reads the weight once per row at
small M. ``linear_small_m`` reads it once per call for M <= 8 rows (fp32 accumulation) and is
``at::linear`` otherwise, so it can stand in for any bf16 / fp32 projection.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.ops._library import ops, require_c

MAX_ROWS = 8  # M at or below which the C++ kernel streams the weight once


def linear_small_m_ref(x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference. x: (..., K); weight: (N, K); bias: (N,) or None. Returns (..., N) in x's
    dtype, computed in fp32."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def linear_small_m(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same arguments and result as ``linear_small_m_ref`` (one C++ op)."""
    require_c()
    return ops.linear_small_m(x, weight, bias)
