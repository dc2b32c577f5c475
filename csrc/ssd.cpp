// Mamba2 chunked SSD prefill (Dao & Gu 2024, "state space duality"), built on a few large GEMMs.
// Each of vLLM's chunks (which never span two sequences) is processed in sub-chunks of at most
// kSub tokens, sequentially, carrying the fp32 state S (H, P, N). For a sub-chunk of L tokens
// with cum[i, h] = sum_{l<=i} A_h dt[l, h] (cum is non-increasing, so every exp below is <= 1):
//   Y_h    = M_h X_h + diag(exp(cum[:, h])) C_g S_h^T,   M_h[i, j] = (C_g B_g^T)[i, j]
//                                                                  * exp(cum_i - cum_j) dt_j [j <= i]
//   S_h   <- exp(cum[L-1, h]) S_h + (X_h o w_h)^T B_g,   w_h[j] = exp(cum[L-1, h] - cum[j, h]) dt_j
// The inter-chunk term and the state update are one GEMM per group over all its heads
// ((L, N) x (N, heads*P) and (heads*P, L) x (L, N)), the intra-chunk term one batched GEMM over
// heads; a short sub-chunk keeps the quadratic part (and its exps) small, so the work is close to
// the 2 T H P N multiply-adds of the linear recurrence, but at GEMM speed.
#include <c10/core/InferenceMode.h>
#include "common.h"

namespace vhn {
namespace {

constexpr int64_t kSub = 64;  // sub-chunk length (tokens)

template <typename X>
void ssd_impl(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
              const c10::optional<at::Tensor>& dt_bias, const c10::optional<at::Tensor>& init,
              const at::Tensor& cu_chunk, const at::Tensor& seq_idx, bool dt_softplus, double dt_min,
              double dt_max, at::Tensor& out, at::Tensor& states) {
  const int64_t T = x.size(0), H = x.size(1), P = x.size(2), G = B.size(1), N = B.size(2);
  const int64_t R = H / G, HP = H * P, RP = R * P, PN = P * N;
  TORCH_CHECK(H % G == 0, "ssd_chunk_scan: heads must be a multiple of groups");
  const int64_t nchunks = cu_chunk.size(0) - 1;
  const auto fopt = at::TensorOptions().dtype(at::kFloat);

  // fp32 token-major copies (no copy when already fp32 and contiguous)
  const at::Tensor xf = x.to(at::kFloat).contiguous().view({T, HP});  // (T, H*P)
  const at::Tensor Bf = B.to(at::kFloat).contiguous();                // (T, G, N)
  const at::Tensor Cf = C.to(at::kFloat).contiguous();                // (T, G, N)
  at::Tensor dtf = dt.to(at::kFloat).contiguous();                    // (T, H), processed below
  if (dt_bias.has_value()) dtf = dtf + dt_bias->to(at::kFloat).reshape({1, H});
  if (dt_softplus) dtf = at::where(dtf <= 20.f, at::log1p(at::exp(dtf)), dtf);
  dtf = dtf.clamp(dt_min, dt_max).contiguous();
  const at::Tensor Af = A.to(at::kFloat).contiguous();                // (H,)
  at::Tensor Df;                                                       // (H, P) or undefined
  if (D.has_value()) Df = (D->dim() == 1 ? D->reshape({H, 1}) : *D).to(at::kFloat).expand({H, P}).contiguous();
  at::Tensor zf;                                                       // (T, H*P) or undefined
  if (z.has_value()) zf = z->to(at::kFloat).contiguous().view({T, HP});
  const bool direct_out = out.stride(2) == 1 && out.stride(1) == P && out.stride(0) == HP;
  at::Tensor outc = direct_out ? out : at::empty({T, H, P}, out.options());

  // per-sub-chunk work buffers
  at::Tensor cum = at::empty({H, kSub}, fopt);          // head-major cumulative A dt
  at::Tensor dth = at::empty({H, kSub}, fopt);          // head-major dt
  at::Tensor CB = at::empty({G, kSub, kSub}, fopt);     // C B^T per group
  at::Tensor M = at::empty({H, kSub, kSub}, fopt);      // masked, decayed C B^T per head
  at::Tensor Y = at::empty({H, kSub, P}, fopt);         // intra-chunk output, head-major
  at::Tensor Z = at::empty({G, kSub, RP}, fopt);        // C S^T per group, token-major
  at::Tensor Xw = at::empty({kSub, HP}, fopt);          // X o w, token-major

  const float* dtp = dtf.const_data_ptr<float>();
  const float* ap = Af.const_data_ptr<float>();
  const float* xp = xf.const_data_ptr<float>();
  const float* Dp = Df.defined() ? Df.const_data_ptr<float>() : nullptr;
  const float* zp = zf.defined() ? zf.const_data_ptr<float>() : nullptr;
  float* cump = cum.mutable_data_ptr<float>();
  float* dthp = dth.mutable_data_ptr<float>();
  X* op = outc.mutable_data_ptr<X>();

  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t start = geti(cu_chunk, c), end = geti(cu_chunk, c + 1), seq = geti(seq_idx, c);
    at::Tensor S = states[c];  // (H, P, N) working state of this chunk, left as its end state
    if (c > 0 && geti(seq_idx, c - 1) == seq) {
      S.copy_(states[c - 1]);
    } else if (init.has_value()) {
      S.copy_((*init)[seq]);
    } else {
      S.zero_();
    }
    float* sp = S.mutable_data_ptr<float>();
    for (int64_t s0 = start; s0 < end; s0 += kSub) {
      const int64_t L = std::min(kSub, end - s0);
      // cumulative A dt (sequential over tokens, independent per head)
      for (int64_t h = 0; h < H; ++h) {
        float acc = 0.f;
        for (int64_t l = 0; l < L; ++l) {
          const float d = dtp[(s0 + l) * H + h];
          acc += ap[h] * d;
          cump[h * kSub + l] = acc;
          dthp[h * kSub + l] = d;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // C B^T: (L, N) x (N, L)
        at::Tensor Cg = Cf.narrow(0, s0, L).select(1, g), Bg = Bf.narrow(0, s0, L).select(1, g);
        at::Tensor CBg = CB[g].narrow(0, 0, L).narrow(1, 0, L);
        at::mm_out(CBg, Cg, Bg.t());
      }
      // M_h and X o w_h, then decay the carried state; parallel over heads
      at::parallel_for(0, H, 1, [&](int64_t hb, int64_t he) {
        c10::InferenceMode inference_guard;  // pool threads don't inherit vLLM's InferenceMode
        for (int64_t h = hb; h < he; ++h) {
          const float* cu = cump + h * kSub;
          const float* dd = dthp + h * kSub;
          const float* cb = CB.const_data_ptr<float>() + (h / R) * kSub * kSub;
          float* m = M.mutable_data_ptr<float>() + h * kSub * kSub;
          for (int64_t i = 0; i < L; ++i) {  // M[i, j] = CB[i, j] exp(cum_i - cum_j) dt_j, j <= i
            const fVec ci(cu[i]);
            for (int64_t j = 0; j <= i; j += kVecF) {
              const int64_t cnt = std::min(kVecF, i + 1 - j);
              const fVec v = fVec::loadu(cb + i * kSub + j, cnt) * (ci - fVec::loadu(cu + j, cnt)).exp() *
                             fVec::loadu(dd + j, cnt);
              v.store(m + i * L + j, cnt);
            }
            std::fill(m + i * L + i + 1, m + (i + 1) * L, 0.f);
          }
          const float last = cu[L - 1];
          float* xw = Xw.mutable_data_ptr<float>();
          for (int64_t j = 0; j < L; ++j) {  // (X o w)[j, h, :]
            const fVec w(std::exp(last - cu[j]) * dd[j]);
            const float* xs = xp + (s0 + j) * HP + h * P;
            float* xd = xw + j * HP + h * P;
            for (int64_t p = 0; p < P; p += kVecF) {
              const int64_t cnt = std::min(kVecF, P - p);
              (fVec::loadu(xs + p, cnt) * w).store(xd + p, cnt);
            }
          }
        }
      });
      for (int64_t g = 0; g < G; ++g) {
        // intra-chunk: Y_h = M_h X_h for the heads of the group, one batched GEMM
        at::Tensor Mg = M.narrow(0, g * R, R).view({R, kSub * kSub}).narrow(1, 0, L * L).view({R, L, L});
        at::Tensor Xg = xf.narrow(0, s0, L).view({L, H, P}).narrow(1, g * R, R).permute({1, 0, 2});
        at::Tensor Yg = Y.narrow(0, g * R, R).narrow(1, 0, L);
        at::bmm_out(Yg, Mg, Xg);
        // inter-chunk: Z = C_g S_g^T, (L, N) x (N, R*P), before the state moves on
        at::Tensor Sg = S.narrow(0, g * R, R).view({RP, N});
        at::Tensor Cg = Cf.narrow(0, s0, L).select(1, g);
        at::Tensor Zg = Z[g].narrow(0, 0, L);
        at::mm_out(Zg, Cg, Sg.t());
      }
      at::parallel_for(0, H, 1, [&](int64_t hb, int64_t he) {  // S_h *= exp(cum[L-1, h])
        c10::InferenceMode inference_guard;
        for (int64_t h = hb; h < he; ++h) {
          const fVec dec(std::exp(cump[h * kSub + L - 1]));
          float* s = sp + h * PN;
          for (int64_t i = 0; i < PN; i += kVecF) {
            const int64_t cnt = std::min(kVecF, PN - i);
            (fVec::loadu(s + i, cnt) * dec).store(s + i, cnt);
          }
        }
      });
      for (int64_t g = 0; g < G; ++g) {  // S_g += (X o w)_g^T B_g: (R*P, L) x (L, N)
        at::Tensor Sg = S.narrow(0, g * R, R).view({RP, N});
        at::Tensor XwT = Xw.narrow(0, 0, L).narrow(1, g * RP, RP).t();
        Sg.addmm_(XwT, Bf.narrow(0, s0, L).select(1, g));
      }
      // out = (Y + exp(cum) Z + D x) * silu(z)
      at::parallel_for(0, L, 1, [&](int64_t ib, int64_t ie) {
        c10::InferenceMode inference_guard;
        const float* yp = Y.const_data_ptr<float>();
        const float* zz = Z.const_data_ptr<float>();
        for (int64_t i = ib; i < ie; ++i) {
          const int64_t tok = s0 + i;
          for (int64_t h = 0; h < H; ++h) {
            const fVec e(std::exp(cump[h * kSub + i]));
            const float* yr = yp + (h * kSub + i) * P;
            const float* zr = zz + ((h / R) * kSub + i) * RP + (h % R) * P;
            const float* xr = xp + tok * HP + h * P;
            X* o = op + tok * HP + h * P;
            for (int64_t p = 0; p < P; p += kVecF) {
              const int64_t cnt = std::min(kVecF, P - p);
              fVec y = at::vec::fmadd(fVec::loadu(zr + p, cnt), e, fVec::loadu(yr + p, cnt));
              if (Dp != nullptr) y = at::vec::fmadd(fVec::loadu(Dp + h * P + p, cnt), fVec::loadu(xr + p, cnt), y);
              if (zp != nullptr) {
                const fVec zv = fVec::loadu(zp + tok * HP + h * P + p, cnt);
                y = y * zv / (fVec(1.f) + zv.neg().exp());
              }
              vstore(o + p, y, cnt);
            }
          }
        }
      });
    }
  }
  if (!direct_out) out.copy_(outc);
}

void ssd_chunk_scan(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                    const c10::optional<at::Tensor>& dt_bias, const c10::optional<at::Tensor>& initial_states,
                    const at::Tensor& cu_chunk_seqlens, const at::Tensor& seq_idx, bool dt_softplus,
                    double dt_min, double dt_max, at::Tensor& out, at::Tensor& chunk_states) {
  TORCH_CHECK(x.dim() == 3 && B.dim() == 3 && C.sizes() == B.sizes() && dt.dim() == 2,
              "ssd_chunk_scan: x (T,H,P), dt (T,H), B/C (T,G,N)");
  TORCH_CHECK(chunk_states.scalar_type() == at::kFloat && chunk_states.is_contiguous(),
              "ssd_chunk_scan: chunk_states must be contiguous fp32");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.sizes() == x.sizes(), "ssd_chunk_scan: out");
  auto cuc = cu_chunk_seqlens.contiguous();
  auto sidx = seq_idx.contiguous();
  VHN_DISPATCH_FB(x.scalar_type(), T, [&] {
    ssd_impl<T>(x, dt, A, B, C, D, z, dt_bias, initial_states, cuc, sidx, dt_softplus, dt_min, dt_max, out,
                chunk_states);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("ssd_chunk_scan", &ssd_chunk_scan);
}

}  // namespace vhn
