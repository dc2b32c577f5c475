"""Routed MoE experts on the plugin's ``moe_experts`` op (``ops/moe.py``).

vLLM's CPU experts (``CPUUnquantizedExperts``, the portable "vec" kernel every CPU without AMX
gets) cost in proportion to the tokens of a step, not to the distinct experts they hit, so
batched decode, speculative verification and prefill pay for each token what a lone token
pays (benchmarks/bench_moe.py). The plugin's op groups tokens by expert and reads each routed
expert's weights once per step.

The default (``VLLM_HYBRID_NEURON_MOE`` unset, "auto", or "plugin"; "vllm" keeps vLLM's kernel).
With the weights packed once at load (``pack_moe_weights``: one contiguous stream per work item)
the op is at vLLM's time at decode sizes (weight-streaming bound, within the machines'
run-to-run noise) and 1.1-1.9x faster from 64 tokens per call - prefill, and tokens sharing
experts in a speculative verification step (benchmarks/results/moe.md, 2026-12-07, AVX2);
2.1-2.4x from 64 tokens per expert where VDPBF16PS runs it (benchmarks/results/zen4/moe.md). A
token's result is bitwise independent of the other tokens in the call, so batching and
speculation cannot move a greedy token through it.

Hooked through vLLM's MoE method's public ``experts_cls`` (the class its modular kernel
instantiates): before weights load, the plugin's model classes swap it for ``PluginCPUExperts``,
a subclass that packs vLLM's (E, 2I, K) / (E, K, I) weights once after loading (in place of
vLLM's own prepacking) and whose ``apply`` calls the op. Routing (softmax / renormalised top-k,
Gemma 4's scales) and the shared expert stay vLLM's. Only that exact class is replaced (vLLM's AMX, ARM,
Power and zentorch kernels stay), and only for activations, layouts and parallel setups the op
covers; anything else keeps vLLM's kernel.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

from vllm_hybrid_neuron import envs
from vllm_hybrid_neuron.cpu import vllm_seam
from vllm_hybrid_neuron.ops.moe import ACTIVATIONS, moe_experts_packed, pack_moe_weights

logger = logging.getLogger("vllm.hybrid_neuron")


class PluginCPUExperts(CPUUnquantizedExperts):
    """vLLM's CPU experts interface, computed by ``moe_experts_packed`` on weights packed once
    here, at load."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        vllm_seam.keep_off_zentorch(self)
        w13, w2 = layer.w13_weight, layer.w2_weight  # (E, 2I, K), (E, K, I) as loaded
        self.inter = w13.shape[1] // 2
        # Packed copies replace the loaded tensors (vLLM's own CPU experts replace them with
        # their prepacked form the same way); apply() receives these.
        w13.data, w2.data = pack_moe_weights(w13.data, w2.data)

    def apply(self, output: torch.Tensor, hidden_states: torch.Tensor, w1: torch.Tensor,
              w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              activation: MoEActivation, global_num_experts: int,
              expert_map: torch.Tensor | None, a1q_scale, a2_scale, workspace13, workspace2,
              expert_tokens_meta, apply_router_weight_on_input: bool) -> None:
        # apply_router_weight_on_input (top-1 only): vLLM's prepare step already scaled
        # hidden_states, and its CPU kernel then skips the weighting; so must the op.
        if apply_router_weight_on_input:
            topk_weights = torch.ones_like(topk_weights)
        moe_experts_packed(output, hidden_states, w1, w2, topk_weights, topk_ids, self.inter,
                           activation.value)


def _covered(method) -> str | None:
    """Why the op cannot serve this MoE method, or None."""
    moe = method.moe
    if moe.activation.value not in ACTIVATIONS:
        return f"activation {moe.activation.value}"
    if moe.has_bias:
        return "expert biases"
    if moe.moe_parallel_config.use_ep:
        return "expert parallelism"
    return None


def use_plugin_moe(model: nn.Module) -> int:
    """Before weights load, unless ``VLLM_HYBRID_NEURON_MOE=vllm``: route every MoE layer of
    ``model`` on vLLM's portable CPU experts to ``PluginCPUExperts``. Returns the number of
    layers."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
        UnquantizedFusedMoEMethod,
    )

    if envs.moe_kernel() == "vllm":
        logger.info("vllm-hybrid-neuron: MoE layers stay on vLLM's kernels (%s=vllm)",
                    envs.MOE_ENV)
        return 0
    count, kept = 0, set()
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if not isinstance(method, UnquantizedFusedMoEMethod):
            continue
        if method.experts_cls is not CPUUnquantizedExperts:
            kept.add(getattr(method.experts_cls, "__name__", str(method.experts_cls)))
            continue
        reason = _covered(method)
        if reason is not None:
            kept.add(f"CPUUnquantizedExperts ({reason})")
            continue
        method.experts_cls = PluginCPUExperts
        count += 1
    logger.info("vllm-hybrid-neuron: %d MoE layers run the plugin's moe_experts op%s", count,
                f"; vLLM's kernel kept for {', '.join(sorted(kept))}" if kept else "")
    return count
