// Entry points shared between kernel files (the fused ops call the single ones).
#pragma once

#include <ATen/ATen.h>

namespace vhn {

void causal_conv1d_update(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, bool silu,
                          const c10::optional<at::Tensor>& conv_state_indices,
                          const c10::optional<at::Tensor>& num_accepted_tokens,
                          const c10::optional<at::Tensor>& query_start_loc, int64_t max_query_len,
                          int64_t null_block_id, at::Tensor& out);

void selective_state_update(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                            bool dt_softplus, const c10::optional<at::Tensor>& state_batch_indices,
                            const c10::optional<at::Tensor>& dst_state_batch_indices, int64_t null_block_id,
                            at::Tensor& out, const c10::optional<at::Tensor>& num_accepted_tokens,
                            const c10::optional<at::Tensor>& cu_seqlens);

}  // namespace vhn
