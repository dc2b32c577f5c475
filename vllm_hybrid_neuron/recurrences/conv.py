"""The depthwise causal conv in front of the Mamba2 and GDN mixers, in the compiler-safe form
(shift-and-sum, no ``conv1d``), and the conv state a step leaves behind.

Shapes: B batch, L tokens, C channels, K conv width; conv state (B, C, K-1): the K-1 inputs
before the first token.

    out[t, c] = bias[c] + sum_j weight[c, j] window[t + j, c],   window = state ++ x
"""

from __future__ import annotations

import torch


def causal_conv(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv as K shifted multiply-adds.

    x: (B, L, C); conv_state: (B, C, K-1) (the K-1 inputs before x); weight: (C, K).
    Returns (B, L, C) before the activation.
    """
    K = weight.shape[-1]
    L = x.shape[1]
    window = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], 1)  # (B, K-1+L, C)
    out = sum(window[:, j:j + L] * weight[:, j] for j in range(K))  # (B, L, C)
    return out + bias if bias is not None else out


def next_conv_state(x: torch.Tensor, conv_state: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The last K-1 *valid* inputs of each row: (B, C, K-1).

    x: (B, L, C) right-padded; lengths: (B,) valid tokens per row; conv_state: (B, C, K-1)
    (zeros for a fresh prefill) supplies the inputs when a row is shorter than K-1.
    """
    km1 = conv_state.shape[-1]
    window = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], 1)  # (B, K-1+L, C)
    idx = lengths.long()[:, None] + torch.arange(km1)[None, :]  # (B, K-1): window rows len..len+K-2
    idx = idx[:, :, None].expand(-1, -1, x.shape[-1])
    return torch.gather(window, 1, idx).transpose(1, 2)  # (B, C, K-1)
