"""Load the compiled ``vllm_hybrid_neuron._C`` ops and register their fake (meta) kernels.

All ops but ``bf16_linear`` return nothing and write into their ``Tensor(a!)`` arguments,
so each fake kernel only has to exist (and check nothing); ``bf16_linear``'s fake gives
its output's shape. torch.compile can then trace through them.
"""

from __future__ import annotations

import torch

try:
    from vllm_hybrid_neuron import _C  # noqa: F401  (registers torch.ops.vllm_hybrid_neuron.*)

    HAS_C = True
except ImportError:  # pragma: no cover - the extension was not built
    HAS_C = False

ops = torch.ops.vllm_hybrid_neuron if HAS_C else None

_OPS = (
    "causal_conv1d_fwd",
    "causal_conv1d_update",
    "selective_state_update",
    "mamba2_decode",
    "gdn_decode",
    "gdn_spec_decode",
    "ssd_chunk_scan",
    "gdn_recurrent",
    "gdn_chunk",
    "moe_experts_packed",
)


def _fake(*args, **kwargs) -> None:
    return None


if HAS_C:
    for _name in _OPS:
        torch.library.register_fake(f"vllm_hybrid_neuron::{_name}")(_fake)

    @torch.library.register_fake("vllm_hybrid_neuron::bf16_linear")
    def _bf16_linear_fake(x, weight, bias):  # the one functional op: (..., K) -> (..., N)
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def require_c() -> None:
    if not HAS_C:
        raise RuntimeError(
            "vllm_hybrid_neuron._C is not built: run `pip install --no-build-isolation -e .`"
        )
