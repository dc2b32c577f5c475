// Mamba2 selective_state_update (decode and speculative decode).
// Every (sequence, head) is one work item; the state is streamed once, row by row:
// for each row d all tokens of the sequence are applied while the row sits in registers,
// and the row is written to the destination slot(s) right away.
#include "common.h"

namespace vhn {
namespace {

constexpr int64_t kMaxTok = 16;
constexpr int64_t kMaxN = 256;  // dstate limit

template <typename S, typename X>
void ssu_impl(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
              const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
              const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias, bool dt_softplus,
              const c10::optional<at::Tensor>& sbi, const c10::optional<at::Tensor>& dsbi, int64_t null_id,
              at::Tensor& out, const c10::optional<at::Tensor>& nacc, const c10::optional<at::Tensor>& cu) {
  const int64_t H = state.size(1), P = state.size(2), N = state.size(3), G = B.size(1);
  const int64_t batch = cu.has_value() ? cu->size(0) - 1 : x.size(0);
  const int64_t ratio = H / G;
  const bool spec = nacc.has_value();
  const bool a_per_elem = A.stride(2) != 0;
  const bool tied = dt.stride(2) == 0 && A.stride(1) == 0 && !a_per_elem &&
                    (!dt_bias.has_value() || dt_bias->stride(1) == 0);
  S* sp = state.mutable_data_ptr<S>();
  const X* xp = x.const_data_ptr<X>();
  X* op = out.mutable_data_ptr<X>();
  const X* zp = z.has_value() ? z->const_data_ptr<X>() : nullptr;
  const int64_t s0 = state.stride(0), s1 = state.stride(1), s2 = state.stride(2);
  TORCH_CHECK(state.stride(3) == 1, "selective_state_update: state must be contiguous in dstate");
  TORCH_CHECK(N <= kMaxN, "selective_state_update: dstate > 256");
  const auto& dsb = dsbi.has_value() ? dsbi : sbi;

  const FAcc fB(B), fC(C), fD(D), fbias(dt_bias), fA(A), fdt(dt);
  at::parallel_for(0, batch * H, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float Bv[kMaxTok][kMaxN], Cv[kMaxTok][kMaxN];
    float dtv[kMaxTok], xv[kMaxTok], dA[kMaxTok], outv[kMaxTok];
    int64_t dst[kMaxTok];
    fVec acc[kMaxTok];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / H, h = it % H, g = h / ratio;
      int64_t bos = b, L = 1;
      if (cu.has_value()) {
        bos = geti(*cu, b);
        L = geti(*cu, b + 1) - bos;
      }
      if (L <= 0) continue;
      TORCH_CHECK(L <= kMaxTok, "selective_state_update: at most 16 tokens per sequence");
      // source slot: column num_accepted-1 in speculative mode
      int64_t src = b;
      const int64_t init_col = spec ? std::max<int64_t>(geti(*nacc, b * nacc->stride(0)) - 1, 0) : 0;
      if (sbi.has_value()) src = geti(*sbi, b * sbi->stride(0) + init_col * sbi->stride(1));
      const bool valid = !(sbi.has_value() && (src == null_id || src < 0));
      // destination slots: per token (spec) or one after the last token
      for (int64_t t = 0; t < L; ++t) {
        dst[t] = -1;
        if (!valid) continue;
        if (spec) {
          const int64_t d = geti(*dsb, b * dsb->stride(0) + t * dsb->stride(1));
          dst[t] = (d == null_id || d < 0) ? -1 : d;
        } else if (t == L - 1) {
          dst[t] = dsb.has_value() ? geti(*dsb, b * dsb->stride(0)) : b;
          if (dst[t] == null_id && dsb.has_value()) dst[t] = -1;
        }
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t tok = bos + t;
        for (int64_t n = 0; n < N; ++n) {
          Bv[t][n] = fB( tok * B.stride(0) + g * B.stride(1) + n * B.stride(2));
          Cv[t][n] = fC( tok * C.stride(0) + g * C.stride(1) + n * C.stride(2));
        }
        for (int64_t n = N; n < kMaxN && n < N + kVecF; ++n) Bv[t][n] = Cv[t][n] = 0.f;  // vector tail
      }
      const S* srow0 = sp + src * s0 + h * s1;
      for (int64_t d = 0; d < P; ++d) {
        const float Dd = D.has_value() ? fD( h * D->stride(0) + d * D->stride(1)) : 0.f;
        const float bias = dt_bias.has_value() ? fbias( h * dt_bias->stride(0) + d * dt_bias->stride(1)) : 0.f;
        const float Ahd = fA( h * A.stride(0) + d * A.stride(1));
        for (int64_t t = 0; t < L; ++t) {
          const int64_t tok = bos + t;
          xv[t] = tof(xp[tok * x.stride(0) + h * x.stride(1) + d * x.stride(2)]);
          if (tied && d > 0) continue;  // dt, dA identical for every row of the head
          float dtt = fdt( tok * dt.stride(0) + h * dt.stride(1) + d * dt.stride(2)) + bias;
          if (dt_softplus) dtt = softplus(dtt);
          dtv[t] = dtt;
          dA[t] = std::exp(Ahd * dtt);
        }
        const S* srow = srow0 + d * s2;
        for (int64_t t = 0; t < L; ++t) acc[t] = fVec(0.f);
        if (L == 1 && !a_per_elem) {  // plain decode: one fused read-update-write pass
          fVec a0(0.f);
          const fVec da(dA[0]), bx(dtv[0] * xv[0]);
          S* drow = dst[0] >= 0 ? sp + dst[0] * s0 + h * s1 + d * s2 : nullptr;
          for (int64_t n = 0; n < N; n += kVecF) {
            const int64_t cnt = std::min(kVecF, N - n);
            fVec s = valid ? vload(srow + n, cnt) : fVec(0.f);
            s = at::vec::fmadd(s, da, fVec::loadu(Bv[0] + n) * bx);
            a0 = at::vec::fmadd(s, fVec::loadu(Cv[0] + n), a0);
            if (drow) vstore(drow + n, s, cnt);
          }
          acc[0] = a0;
        } else
        for (int64_t n = 0; n < N; n += kVecF) {
          const int64_t cnt = std::min(kVecF, N - n);
          fVec s = valid ? vload(srow + n, cnt) : fVec(0.f);
          for (int64_t t = 0; t < L; ++t) {
            fVec da = a_per_elem
                ? (vload(A.const_data_ptr<float>() + h * A.stride(0) + d * A.stride(1) + n, cnt) * fVec(dtv[t])).exp()
                : fVec(dA[t]);
            s = at::vec::fmadd(s, da, fVec::loadu(Bv[t] + n) * fVec(dtv[t] * xv[t]));
            acc[t] = at::vec::fmadd(s, fVec::loadu(Cv[t] + n), acc[t]);
            if (dst[t] >= 0) vstore(sp + dst[t] * s0 + h * s1 + d * s2 + n, s, cnt);
          }
        }
        for (int64_t t = 0; t < L; ++t) {
          const int64_t tok = bos + t;
          float o = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc[t]) + Dd * xv[t];
          if (zp) o *= silu(tof(zp[tok * z->stride(0) + h * z->stride(1) + d * z->stride(2)]));
          op[tok * out.stride(0) + h * out.stride(1) + d * out.stride(2)] = X(o);
        }
      }
    }
  });
}

void selective_state_update(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                            const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
                            const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                            bool dt_softplus, const c10::optional<at::Tensor>& state_batch_indices,
                            const c10::optional<at::Tensor>& dst_state_batch_indices, int64_t null_block_id,
                            at::Tensor& out, const c10::optional<at::Tensor>& num_accepted_tokens,
                            const c10::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK(state.dim() == 4 && x.dim() == 3 && dt.dim() == 3 && A.dim() == 3 && B.dim() == 3,
              "selective_state_update: expected 4-D state and 3-D x/dt/A/B/C");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "selective_state_update: out dtype must match x");
  TORCH_CHECK(!z.has_value() || z->scalar_type() == x.scalar_type(), "selective_state_update: z dtype");
  TORCH_CHECK(A.stride(2) == 0 || (A.scalar_type() == at::kFloat && A.stride(2) == 1),
              "selective_state_update: per-element A must be fp32 and contiguous in dstate");
  TORCH_CHECK(!num_accepted_tokens.has_value() || (state_batch_indices.has_value() && state_batch_indices->dim() == 2),
              "selective_state_update: speculative mode needs 2-D state_batch_indices");
  VHN_DISPATCH_FB(state.scalar_type(), S, [&] {
    VHN_DISPATCH_FB(x.scalar_type(), X, [&] {
      ssu_impl<S, X>(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
                     dst_state_batch_indices, null_block_id, out, num_accepted_tokens, cu_seqlens);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("selective_state_update", &selective_state_update);
}

}  // namespace vhn
