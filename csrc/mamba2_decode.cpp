// One Mamba2 decode step (one token per sequence) in a single op: the causal conv update on the
// projected [x | B | C] row, then selective_state_update on the conv output. It exists to take
// the per-layer Python glue (splits, expands, two wrapper calls) out of the decode loop; the
// math is exactly the two single ops'.
#include "common.h"
#include "ops.h"

namespace vhn {
namespace {

void mamba2_decode(at::Tensor& xbc, const at::Tensor& dt, at::Tensor& conv_state, const at::Tensor& conv_weight,
                   const c10::optional<at::Tensor>& conv_bias, bool silu, at::Tensor& ssm_state,
                   const at::Tensor& A, const c10::optional<at::Tensor>& D,
                   const c10::optional<at::Tensor>& dt_bias, const at::Tensor& slots, int64_t ngroups,
                   int64_t null_block_id, at::Tensor& out) {
  // xbc: (batch, H*P + 2*G*N); dt: (batch, H); out: (batch, H, P); ssm_state: (slots, H, P, N)
  const int64_t batch = xbc.size(0), H = out.size(1), P = out.size(2), N = ssm_state.size(3);
  const int64_t G = ngroups, HP = H * P, GN = G * N;
  TORCH_CHECK(xbc.dim() == 2 && xbc.size(1) == HP + 2 * GN && xbc.stride(1) == 1,
              "mamba2_decode: xbc must be (batch, nheads*headdim + 2*ngroups*dstate), channels contiguous");
  TORCH_CHECK(dt.dim() == 2 && dt.size(0) == batch && dt.size(1) == H, "mamba2_decode: dt must be (batch, nheads)");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == batch && ssm_state.dim() == 4 && ssm_state.size(1) == H &&
                  ssm_state.size(2) == P && A.numel() == H && H % G == 0,
              "mamba2_decode: out (batch, nheads, headdim), ssm_state (slots, nheads, headdim, dstate), A (nheads,)");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == batch, "mamba2_decode: slots must be (batch,)");
  at::Tensor x3 = xbc.unsqueeze(-1);  // (batch, conv_dim, 1), conv output written in place
  causal_conv1d_update(x3, conv_state, conv_weight, conv_bias, silu, slots, c10::nullopt, c10::nullopt, 1,
                       null_block_id, x3);
  const at::Tensor x = xbc.narrow(1, 0, HP).view({batch, H, P});
  const at::Tensor B = xbc.narrow(1, HP, GN).view({batch, G, N});
  const at::Tensor C = xbc.narrow(1, HP + GN, GN).view({batch, G, N});
  const at::Tensor dt3 = dt.unsqueeze(-1).expand({batch, H, P});   // per head, stride 0 over headdim
  const at::Tensor A3 = A.reshape({H, 1, 1}).expand({H, P, N});
  c10::optional<at::Tensor> D2, db2;
  if (D.has_value()) D2 = D->dim() == 1 ? D->reshape({H, 1}).expand({H, P}) : *D;
  if (dt_bias.has_value()) db2 = dt_bias->reshape({H, 1}).expand({H, P});
  const at::Tensor idx = slots.view({batch, 1});
  selective_state_update(ssm_state, x, dt3, A3, B, C, D2, c10::nullopt, db2, true, idx, idx, null_block_id, out,
                         c10::nullopt, c10::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("mamba2_decode", &mamba2_decode);
}

}  // namespace vhn
