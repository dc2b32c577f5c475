"""Gated RMSNorm over the full Mamba2 width, as transformers' GraniteMoeHybrid does it.

transformers' ``GraniteMoeHybridRMSNormGated`` computes ``y = w * rms_norm(x * silu(z))``
with the variance taken over the whole intermediate width, whatever ``mamba_n_groups``
is. vLLM's ``Mixer2RMSNormGated`` normalises each of the n_groups slices separately
(mamba_ssm's convention), which gives different logits for any checkpoint with
n_groups > 1. With n_groups == 1 (all released Granite 4.0-H models) the two agree.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.layers.mamba.mamba_mixer2 import Mixer2RMSNormGated


class FullWidthGatedRMSNorm(Mixer2RMSNormGated):
    """``Mixer2RMSNormGated`` with the variance over the full width (all TP ranks)."""

    def forward_native(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        # x, gate: (tokens, intermediate / tp)
        input_dtype = x.dtype
        x = x * nn.functional.silu(gate.to(torch.float32))  # fp32
        if not self.use_rms_norm:
            return x.to(input_dtype)
        sum_sq = x.pow(2).sum(dim=-1, keepdim=True)  # (tokens, 1)
        if self.tp_size > 1:
            sum_sq = tensor_model_parallel_all_reduce(sum_sq)
        variance = sum_sq / self.full_hidden_size
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def forward_cpu(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.forward_native(x, gate)

    def forward_cuda(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.forward_native(x, gate)


def use_full_width_gated_norm(model: nn.Module) -> int:
    """Replace every ``Mixer2RMSNormGated`` inside ``model`` by a
    ``FullWidthGatedRMSNorm`` of the same shape (before weights load, so the
    checkpoint's norm weights land in the new module); returns how many."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is Mixer2RMSNormGated:
                setattr(parent, name, FullWidthGatedRMSNorm(
                    full_hidden_size=child.full_hidden_size,
                    full_n_groups=child.n_groups,
                    use_rms_norm=child.use_rms_norm,
                    eps=child.variance_epsilon,
                ))
                replaced += 1
    return replaced
