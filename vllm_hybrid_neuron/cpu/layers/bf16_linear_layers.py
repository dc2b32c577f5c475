"""Dense projections (and the LM head) on ``bf16_linear`` where vLLM's CPU path is slow.

vLLM's CPU linear layers run oneDNN's matmul with a prepacked weight. Where oneDNN cannot
build a bf16 matmul (CPUs without AVX512-BF16, such as this project's AVX2 machines) vLLM falls
back to ``torch.nn.functional.linear``, whose bf16 path is slow at every size there: it
re-reads the weight for every row at decode sizes (M = 4 rows - batched decode, a speculative
verification step - runs at ~19% of the read bandwidth, ~4x the cost of M = 1) and reaches
~7 GFLOP/s at prefill sizes (benchmarks/bench_linear.py). On such CPUs the plugin's model
classes give their bf16 linear layers and LM head ``bf16_linear`` (``ops/bf16_linear.py``).
Where oneDNN bf16 works, vLLM's path stays.

Hooked by switching the class of each layer's quantisation method to a state-free subclass
whose ``process_weights_after_loading`` lets vLLM dispatch first, then replaces the
``cpu_linear`` callable vLLM's ``cpu_unquantized_gemm`` calls.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

from vllm_hybrid_neuron.cpu import vllm_seam
from vllm_hybrid_neuron.ops.bf16_linear import bf16_linear

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


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return bf16_linear(x, weight, bias)


def _take_over(layer: nn.Module) -> None:
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel

    w = getattr(layer, "weight", None)
    if w is None or w.dim() != 2 or w.numel() == 0 or w.dtype != torch.bfloat16:
        return  # fp32, or vLLM moved the weight into a packed kernel of its own
    if check_cpu_sgl_kernel(w.size(0), w.size(1), w.dtype):
        return  # small router-like weights: vLLM's sgl-kernel path
    layer.cpu_linear = _bf16_linear
    layer._vhn_bf16_linear = True


class Bf16LinearMethod(UnquantizedLinearMethod):
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        _take_over(layer)


class Bf16EmbeddingMethod(UnquantizedEmbeddingMethod):
    def process_weights_after_loading(self, layer: nn.Module) -> None:
        super().process_weights_after_loading(layer)
        _take_over(layer)


def use_bf16_linear(model: nn.Module) -> int:
    """Before weights load: give every unquantised linear layer and LM head of ``model`` the
    plugin's method (where oneDNN bf16 is unavailable). Returns the number of layers."""
    if not onednn_bf16_matmul_available():
        swaps = {UnquantizedLinearMethod: Bf16LinearMethod,
                 UnquantizedEmbeddingMethod: Bf16EmbeddingMethod}
        count = 0
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            plugin = swaps.get(type(method))
            if plugin is not None and _is_projection(module):
                method.__class__ = plugin
                count += 1
        logger.info("vllm-hybrid-neuron: %d linear layers / LM head run bf16_linear when "
                    "their weights are bf16 (oneDNN has no bf16 matmul on this CPU)", count)
        return count
    logger.info("vllm-hybrid-neuron: dense projections stay on vLLM's oneDNN bf16 matmul")
    return 0


def _is_projection(module: nn.Module) -> bool:
    """Linear layers and vocabulary embeddings (the LM head, or the input embedding it is tied
    to: its lookups do not use the method's GEMM)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    return isinstance(module, (LinearBase, VocabParallelEmbedding))
