"""Linear layer for bf16 weights on CPUs where oneDNN has no bf16 matmul: out = x @ weight^T + b.

vLLM's CPU linear layers call oneDNN; where oneDNN cannot build a bf16 matmul (CPUs without
AVX512-BF16) vLLM falls back to torch's linear, whose bf16 path is slow at every batch size
there (it re-reads the weight per row at decode sizes; ~7 GFLOP/s at prefill sizes).
``bf16_linear`` streams the weight once for up to 64 rows and uses fp32 GEMM on
weight blocks converted on the fly at prefill sizes (``csrc/bf16_linear.cpp``); built where the
CPU has AVX512-BF16 (without AMX oneDNN streams decode-sized weights at 56-79% of the read
bandwidth there), its streamed kernel takes bf16 dot products and prefill sizes go to
ATen's bf16 GEMM. Other dtypes go to ``at::linear``. fp32 accumulation throughout, one rounding of the result.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vllm_hybrid_neuron.ops._library import ops, require_c

STREAM_ROWS = 64  # up to this many rows the C++ op streams the weight (once)


def bf16_linear_ref(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference. x: (..., K); weight: (N, K); bias: (N,) or None. Returns (..., N) in x's
    dtype, computed in fp32."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def kernel_isa() -> str:
    """The dot kernel this build's op streams with: "avx512_bf16" (VDPBF16PS on bf16 inputs),
    "avx512" or "avx2" (bf16 weights widened to fp32), or "scalar"."""
    require_c()
    return str(ops.bf16_linear_isa())


def bf16_linear(x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Same arguments and result as ``bf16_linear_ref`` (one C++ op)."""
    require_c()
    return ops.bf16_linear(x, weight, bias)
