"""CPU ops for hybrid SSM / linear-attention layers (C++ kernels + plain-torch references)."""

from vllm_hybrid_neuron.ops.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_fn_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from vllm_hybrid_neuron.ops.gated_delta_rule import (
    chunk_gated_delta_rule,
    chunk_gated_delta_rule_ref,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_ref,
    fused_sigmoid_gating_delta_rule_update,
    fused_sigmoid_gating_delta_rule_update_ref,
    sigmoid_gating,
)
from vllm_hybrid_neuron.ops.bf16_linear import bf16_linear, bf16_linear_ref
from vllm_hybrid_neuron.ops.gdn_decode import (
    gdn_decode,
    gdn_decode_ref,
    gdn_spec_decode,
    gdn_spec_decode_ref,
)
from vllm_hybrid_neuron.ops.mamba2_decode import mamba2_decode, mamba2_decode_ref
from vllm_hybrid_neuron.ops.selective_state_update import (
    selective_state_update,
    selective_state_update_ref,
)
from vllm_hybrid_neuron.ops.ssd import (
    mamba_chunk_scan_combined_varlen,
    mamba_chunk_scan_combined_varlen_ref,
)

__all__ = [
    "causal_conv1d_fn", "causal_conv1d_fn_ref", "causal_conv1d_update", "causal_conv1d_update_ref",
    "selective_state_update", "selective_state_update_ref", "mamba2_decode", "mamba2_decode_ref",
    "mamba_chunk_scan_combined_varlen", "mamba_chunk_scan_combined_varlen_ref",
    "chunk_gated_delta_rule", "chunk_gated_delta_rule_ref",
    "fused_recurrent_gated_delta_rule", "fused_recurrent_gated_delta_rule_ref",
    "fused_sigmoid_gating_delta_rule_update", "fused_sigmoid_gating_delta_rule_update_ref",
    "sigmoid_gating", "gdn_decode", "gdn_decode_ref", "gdn_spec_decode", "gdn_spec_decode_ref",
    "bf16_linear", "bf16_linear_ref",
]
