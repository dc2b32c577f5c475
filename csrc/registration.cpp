// Operator schemas of the vllm_hybrid_neuron library. Each op is implemented
// for CPU in its own file (TORCH_LIBRARY_IMPL). Mutated tensors are Tensor(x!).
#include <Python.h>
#include <torch/library.h>

// Importing vllm_hybrid_neuron._C loads this shared library and registers the ops.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(vllm_hybrid_neuron, m) {
  // x/out: (dim, tokens); conv_states: (slots, dim, state_len).
  m.def(
      "causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor(a!) conv_states, "
      "Tensor query_start_loc, Tensor? cache_indices, Tensor? has_initial_state, bool silu, "
      "int pad_slot_id, Tensor(b!) out) -> ()");
  // x/out: (batch, dim, seqlen), or (1, dim, tokens) with query_start_loc.
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
      "bool silu, Tensor? conv_state_indices, Tensor? num_accepted_tokens, "
      "Tensor? query_start_loc, int max_query_len, int null_block_id, Tensor(b!) out) -> ()");
  // state: (slots, nheads, dim, dstate); x/dt/z/out: (tokens, nheads, dim).
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, "
      "Tensor? state_batch_indices, Tensor? dst_state_batch_indices, int null_block_id, "
      "Tensor(b!) out, Tensor? num_accepted_tokens, Tensor? cu_seqlens) -> ()");
  // One Mamba2 decode step: conv update of xbc (batch, H*P + 2*G*N) in place, then
  // selective_state_update with softplus(dt + dt_bias); out: (batch, nheads, headdim).
  m.def(
      "mamba2_decode(Tensor(a!) xbc, Tensor dt, Tensor(b!) conv_state, Tensor conv_weight, "
      "Tensor? conv_bias, bool silu, Tensor(c!) ssm_state, Tensor A, Tensor? D, Tensor? dt_bias, "
      "Tensor slots, int ngroups, int null_block_id, Tensor(d!) out) -> ()");
  // One Gated DeltaNet decode step: conv update of qkv (batch, 2*H*K + HV*V) in place, gates
  // from A_log / a / dt_bias / b, l2-normed q (scaled) and k, recurrence on ssm_state
  // (slots, HV, V, K) in place; out: (batch, HV, V). Slots <= 0 skipped (output zero).
  m.def(
      "gdn_decode(Tensor(a!) qkv, Tensor a, Tensor b, Tensor(b!) conv_state, Tensor conv_weight, "
      "Tensor? conv_bias, bool silu, Tensor(c!) ssm_state, Tensor A_log, Tensor dt_bias, "
      "Tensor slots, int num_k_heads, int head_k_dim, float scale, Tensor(d!) out) -> ()");
  // gdn_decode for a speculative verification step: qkv (tokens, ...) holds each sequence's
  // 1 + drafts tokens (cu_seqlens); the state is read from slots[n, num_accepted[n] - 1] and the
  // state after token t written to slots[n, t]; bit for bit the same as one gdn_decode per token.
  m.def(
      "gdn_spec_decode(Tensor(a!) qkv, Tensor a, Tensor b, Tensor(b!) conv_state, "
      "Tensor conv_weight, Tensor? conv_bias, bool silu, Tensor(c!) ssm_state, Tensor A_log, "
      "Tensor dt_bias, Tensor slots, Tensor num_accepted, Tensor cu_seqlens, int num_k_heads, "
      "int head_k_dim, float scale, Tensor(d!) out) -> ()");
  // Chunked SSD (Mamba2) prefill; chunk_states: (nchunks, nheads, headdim, dstate) fp32.
  m.def(
      "ssd_chunk_scan(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? dt_bias, Tensor? initial_states, Tensor cu_chunk_seqlens, "
      "Tensor seq_idx, bool dt_softplus, float dt_min, float dt_max, "
      "Tensor(a!) out, Tensor(b!) chunk_states) -> ()");
  // Recurrent gated delta rule. state: (slots, HV, V, K).
  m.def(
      "gdn_recurrent(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, "
      "Tensor? initial_state, Tensor(a!) final_state, Tensor? cu_seqlens, "
      "Tensor? ssm_state_indices, Tensor? num_accepted_tokens, bool inplace_final_state, "
      "bool use_qk_l2norm, Tensor(b!) out) -> ()");
  // Chunked gated delta rule prefill. state: (N or slots, HV, V, K) fp32-or-bf16.
  m.def(
      "gdn_chunk(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta, float scale, "
      "Tensor(a!) state, Tensor cu_seqlens, Tensor? state_indices, bool use_qk_l2norm, "
      "int chunk_size, Tensor(b!) out) -> ()");
  // out (..., N) = x (..., K) @ weight (N, K)^T + bias; bf16 weight streamed once when
  // M = x.numel() / K <= 8 (decode), at::linear otherwise. Functional (returns out).
  m.def("bf16_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Routed MoE experts: out (M, K) = sum_j topk_weights[:, j] * expert_{topk_ids[:, j]}(x) on
  // weights packed by ops/moe.py's pack_moe_weights (layout: csrc/moe_experts.cpp); inter = I;
  // activation 0 silu, 1 gelu_tanh, 2 gelu.
  m.def(
      "moe_experts_packed(Tensor(a!) out, Tensor x, Tensor w13p, Tensor w2p, "
      "Tensor topk_weights, Tensor topk_ids, int inter, int activation) -> ()");
}
