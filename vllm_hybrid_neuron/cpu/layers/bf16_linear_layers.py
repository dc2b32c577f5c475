"""Dense projections (and the LM head) on ``bf16_linear`` where vLLM's CPU path is slow.

vLLM's CPU linear layers run oneDNN's matmul with a prepacked weight. Where oneDNN cannot
build a bf16 matmul (CPUs without AVX512-BF16, such as this project's AVX2 machines) vLLM falls
back to ``torch.nn.functional.linear``, whose bf16 path is slow at every size there: it
re-reads the weight for every row at decode sizes (M = 4 rows - batched decode, a speculative
verification step - runs at ~19% of the read bandwidth, ~4x the cost of M = 1) and reaches
~7 GFLOP/s at prefill sizes. Where oneDNN's bf16 matmul works without AMX (AVX512-BF16, e.g.
Zen 4) it streams decode-sized weights at 56-79% of the read bandwidth, and the plugin's
AVX512-BF16 kernel 1.1-1.7x faster at 1-8 rows (benchmarks/bench_linear.py, README). On
those CPUs the plugin's model classes give their bf16 linear layers and LM head
``bf16_linear`` (``ops/bf16_linear.py``); on AMX CPUs vLLM's oneDNN path stays.
``VLLM_HYBRID_NEURON_LINEAR`` overrides the choice (``envs.py``).

Hooked by switching the class of each layer's quantisation method to a state-free subclass
whose ``process_weights_after_loading`` sets the ``cpu_linear`` callable vLLM's
``cpu_unquantized_gemm`` calls, in place of vLLM's dispatch (which would prepack the weight
for oneDNN and drop it); layers it does not take (small router-like weights vLLM gives
sgl-kernel, fp32 weights) get vLLM's dispatch.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from vllm_hybrid_neuron import envs
from vllm_hybrid_neuron.cpu import vllm_seam
from vllm_hybrid_neuron.cpu.cpu_features import has_amx
from vllm_hybrid_neuron.ops.bf16_linear import bf16_linear, kernel_isa

logger = logging.getLogger("vllm.hybrid_neuron")


@functools.cache
def onednn_bf16_matmul_available() -> bool:
    """Whether vLLM's oneDNN matmul can be built for a bf16 weight on this CPU."""
    from vllm import _custom_ops as ops

    if not vllm_seam.onednn_supported():
        return False
    try:
        ops.create_onednn_mm(torch.zeros(64, 64, dtype=torch.bfloat16).t(), 32)
        return True
    except RuntimeError:
        return False


def linear_choice() -> tuple[bool, str]:
    """Whether the plugin's model classes put their bf16 dense projections on ``bf16_linear``,
    and why: ``VLLM_HYBRID_NEURON_LINEAR`` = "plugin" / "vllm", or "auto" (default): where oneDNN
    has no bf16 matmul, and where this build's kernel has AVX512-BF16 dot products and the CPU
    no AMX."""
    choice = envs.linear_kernel()
    if choice != "auto":
        return choice == "plugin", f"{envs.LINEAR_ENV}={choice}"
    if not onednn_bf16_matmul_available():
        return True, "oneDNN has no bf16 matmul on this CPU"
    if has_amx():
        return False, "oneDNN's AMX bf16 matmul"
    if kernel_isa() == "avx512_bf16":
        return True, "AVX512-BF16 without AMX: streams decode-sized weights faster than oneDNN"
    return False, f"this build's bf16_linear kernel is {kernel_isa()}, oneDNN bf16 works"


def plugin_linear_wanted() -> bool:
    return linear_choice()[0]


class PluginLinear:
    """The ``cpu_linear`` callable of the layers the plugin takes (a class attribute, so the
    op probe can count its calls: tools/op_probe.py)."""

    @staticmethod
    def apply(x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        return bf16_linear(x, weight, bias)


def _takes(layer: nn.Module) -> bool:
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    if vllm_seam.skips_gemm_dispatch(layer):
        return False  # vLLM gives such layers plain F.linear
    w = getattr(layer, "weight", None)
    if w is None or w.is_meta or w.dim() != 2 or w.numel() == 0 or w.dtype != torch.bfloat16:
        return False
    return not check_cpu_sgl_kernel(w.size(0), w.size(1), w.dtype)  # small router-like weights


def _take_over(layer: nn.Module) -> bool:
    if not _takes(layer):
        return False
    layer.cpu_linear = PluginLinear.apply  # the probe, when installed, wraps it before loading
    layer._vhn_bf16_linear = True
    return True


class Bf16LinearMethod(UnquantizedLinearMethod):
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not _take_over(layer):
            super().process_weights_after_loading(layer)


class Bf16EmbeddingMethod(UnquantizedEmbeddingMethod):
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if not _take_over(layer):
            super().process_weights_after_loading(layer)


def use_bf16_linear(model: nn.Module) -> int:
    """Before weights load: give every unquantised linear layer and LM head of ``model`` the
    plugin's method (where ``linear_choice`` says so). Returns the number of layers."""
    wanted, why = linear_choice()
    if not wanted:
        logger.info("vllm-hybrid-neuron: dense projections stay on vLLM's CPU linear path "
                    "(%s)", why)
        return 0
    swaps = {UnquantizedLinearMethod: Bf16LinearMethod,
             UnquantizedEmbeddingMethod: Bf16EmbeddingMethod}
    count = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        plugin = swaps.get(type(method))
        if plugin is not None and _is_projection(module):
            method.__class__ = plugin
            count += 1
    logger.info("vllm-hybrid-neuron: %d linear layers / LM head run bf16_linear (%s kernel) "
                "when their weights are bf16 (%s)", count, kernel_isa(), why)
    return count


def _is_projection(module: nn.Module) -> bool:
    """Linear layers and vocabulary embeddings (the LM head, or the input embedding it is tied
    to: its lookups do not use the method's GEMM)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    return isinstance(module, (LinearBase, VocabParallelEmbedding))
