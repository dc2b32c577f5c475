// Mamba2 selective_state_update (decode and speculative decode).
// One work item = (sequence b, head h). Its state block (P x N) is streamed once, row by row:
// row p is loaded, all L tokens of the sequence are applied while it sits in registers, and the
// row after token t is stored to token t's destination slot (plain decode: one slot, in place).
#include <c10/core/InferenceMode.h>
#include "common.h"
#include "ops.h"
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>  // streaming stores and their fence (x86 builds only)
#endif

namespace vhn {
namespace {

constexpr int64_t kMaxP = 256;    // headdim limit
constexpr int64_t kMaxN = 256;    // dstate limit

// One state row through L tokens (general path: any dstate, per-element A):
//   s = s * dA[t] + bx[t] * B[t];  y[t] = s . C[t];  row after token t -> dst[t] (if not null)
// src: (N,) or null (zero state); B[t], C[t]: (N,) fp32; Arow: (N,) per-element A or null.
template <typename S>
inline void row_update(const S* src, S* const* dst, const float* const* B, const float* const* C,
                       const float* dA, const float* dt, const float* bx, const float* Arow,
                       int64_t L, int64_t N, float* y) {
  fVec acc[kMaxTok];
  for (int64_t t = 0; t < L; ++t) acc[t] = fVec(0.f);
  for (int64_t n = 0; n < N; n += kVecF) {
    const int64_t cnt = std::min(kVecF, N - n);
    fVec s = src ? vload(src + n, cnt) : fVec(0.f);
    const fVec a = Arow ? fVec::loadu(Arow + n, cnt) : fVec(0.f);
    for (int64_t t = 0; t < L; ++t) {
      const fVec da = Arow ? (a * fVec(dt[t])).exp() : fVec(dA[t]);
      s = at::vec::fmadd(fVec::loadu(B[t] + n, cnt), fVec(bx[t]), s * da);
      acc[t] = at::vec::fmadd(s, fVec::loadu(C[t] + n, cnt), acc[t]);
      if (dst[t]) vstore(dst[t] + n, s, cnt);
      s = rounded<S>(s);  // the next token starts from the state as stored
    }
  }
  for (int64_t t = 0; t < L; ++t) y[t] = hsum(acc[t]);
}

// Plain decode of a whole head block with dstate = NV vectors, B and C held in registers (so the
// loop issues only the state's own loads and stores):
//   s[p] = s[p] * dA[p] + bx[p] * B;  y[p] = s[p] . C.   src/dst: row p at p * s2 (null: zeros / no write).
template <typename S, int NV>
inline void plain_block(const S* src, S* dst, int64_t s2, const float* B, const float* C,
                        const float* dA, const float* bx, int64_t P, float* y) {
  fVec bv[NV], cv[NV];
  for (int v = 0; v < NV; ++v) {
    bv[v] = fVec::loadu(B + v * kVecF);
    cv[v] = fVec::loadu(C + v * kVecF);
  }
  for (int64_t p = 0; p < P; ++p) {
    const S* sr = src ? src + p * s2 : nullptr;
    S* dr = dst ? dst + p * s2 : nullptr;
    const fVec da(dA[p]), b(bx[p]);
    fVec acc(0.f);
    for (int v = 0; v < NV; ++v) {
      fVec s = sr ? vload(sr + v * kVecF, kVecF) : fVec(0.f);
      s = at::vec::fmadd(bv[v], b, s * da);
      acc = at::vec::fmadd(s, cv[v], acc);
      if (dr) vstore(dr + v * kVecF, s, kVecF);
    }
    y[p] = hsum(acc);
  }
}

// Non-temporal store of one vector (64-byte aligned fp32 destination).
inline void stream_store(float* p, const fVec& v) {
#ifdef CPU_CAPABILITY_AVX512
  _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  _mm256_stream_ps(p, v);
#else
  v.store(p);
#endif
}
inline void stream_store(BFloat16* p, const fVec& v) { vstore(p, v, kVecF); }

// Orders streaming stores before later reads of the slots (a no-op where none were issued).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Calls f(std::integral_constant<int, NV>) for dstate N = NV vectors, NV in {1, 2, 4, 8, 16};
// returns false (nothing called) for other N.
template <typename F>
inline bool with_nv(int64_t N, F&& f) {
  switch (N / kVecF * (N % kVecF == 0)) {
    case 1: f(std::integral_constant<int, 1>()); return true;
    case 2: f(std::integral_constant<int, 2>()); return true;
    case 4: f(std::integral_constant<int, 4>()); return true;
    case 8: f(std::integral_constant<int, 8>()); return true;
    case 16: f(std::integral_constant<int, 16>()); return true;
    default: return false;
  }
}

// Speculative decode of a whole head block (L tokens, dstate = NV vectors): each row is kept in
// registers across the tokens; after token t it goes to dst[t] (a fresh slot, so fp32 rows are
// written with streaming stores when aligned: no read-for-ownership of the destination lines).
template <typename S, int NV>
inline void spec_block(const S* src, S* const* dst, int64_t s2, const float* const* B, const float* const* C,
                       const float (*dA)[kMaxP], const float (*bx)[kMaxP], int64_t L, int64_t P,
                       float (*y)[kMaxP]) {
  bool stream = std::is_same<S, float>::value && (s2 * sizeof(S)) % 64 == 0;
  for (int64_t t = 0; t < L; ++t) stream = stream && reinterpret_cast<uintptr_t>(dst[t]) % 64 == 0;
  for (int64_t p = 0; p < P; ++p) {
    fVec s[NV];
    for (int v = 0; v < NV; ++v) s[v] = src ? vload(src + p * s2 + v * kVecF, kVecF) : fVec(0.f);
    for (int64_t t = 0; t < L; ++t) {
      const fVec da(dA[t][p]), b(bx[t][p]);
      fVec acc(0.f);
      S* dr = dst[t] ? dst[t] + p * s2 : nullptr;
      for (int v = 0; v < NV; ++v) {
        s[v] = at::vec::fmadd(fVec::loadu(B[t] + v * kVecF), b, s[v] * da);
        acc = at::vec::fmadd(s[v], fVec::loadu(C[t] + v * kVecF), acc);
      }
      if (dr) {
        if (stream) {
          for (int v = 0; v < NV; ++v) stream_store(dr + v * kVecF, s[v]);
        } else {
          for (int v = 0; v < NV; ++v) vstore(dr + v * kVecF, s[v], kVecF);
        }
      }
      for (int v = 0; v < NV; ++v) s[v] = rounded<S>(s[v]);  // the next token starts from the state as stored
      y[t][p] = hsum(acc);
    }
  }
  if (stream) stream_fence();  // order the streaming stores before the caller reads the slots
}

template <typename S, typename X>
void ssu_impl(at::Tensor& state, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
              const at::Tensor& B, const at::Tensor& C, const c10::optional<at::Tensor>& D,
              const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias, bool dt_softplus,
              const c10::optional<at::Tensor>& sbi, const c10::optional<at::Tensor>& dsbi, int64_t null_id,
              at::Tensor& out, const c10::optional<at::Tensor>& nacc, const c10::optional<at::Tensor>& cu) {
  // state: (slots, H, P, N); x, dt, z, out: (T, H, P); A: (H, P, N); B, C: (T, G, N); D, dt_bias: (H, P)
  const int64_t H = state.size(1), P = state.size(2), N = state.size(3), G = B.size(1);
  const int64_t batch = cu.has_value() ? cu->size(0) - 1 : x.size(0);
  const int64_t ratio = H / G;
  const bool spec = nacc.has_value();
  const bool a_per_elem = A.stride(2) != 0;
  const bool tied = dt.stride(2) == 0 && A.stride(1) == 0 && (!dt_bias.has_value() || dt_bias->stride(1) == 0);
  TORCH_CHECK(state.stride(3) == 1, "selective_state_update: state must be contiguous in dstate");
  TORCH_CHECK(N <= kMaxN && P <= kMaxP, "selective_state_update: dstate and headdim must be <= 256");

  // B, C once in fp32: (T, G, N) contiguous, a few KiB.
  const at::Tensor Bf = B.to(at::kFloat).contiguous(), Cf = C.to(at::kFloat).contiguous();
  const float* Bp = Bf.const_data_ptr<float>();
  const float* Cp = Cf.const_data_ptr<float>();
  const float* Ap = a_per_elem ? A.const_data_ptr<float>() : nullptr;
  S* sp = state.mutable_data_ptr<S>();
  const X* xp = x.const_data_ptr<X>();
  const X* zp = z.has_value() ? z->const_data_ptr<X>() : nullptr;
  X* op = out.mutable_data_ptr<X>();
  const int64_t s0 = state.stride(0), s1 = state.stride(1), s2 = state.stride(2);
  const int64_t x0 = x.stride(0), x1 = x.stride(1), x2 = x.stride(2);
  const int64_t o0 = out.stride(0), o1 = out.stride(1), o2 = out.stride(2);
  const int64_t z0 = zp ? z->stride(0) : 0, z1 = zp ? z->stride(1) : 0, z2 = zp ? z->stride(2) : 0;
  const int64_t t0 = dt.stride(0), t1 = dt.stride(1), t2 = dt.stride(2);
  const int64_t a0 = A.stride(0), a1 = A.stride(1);
  const int64_t d0 = D.has_value() ? D->stride(0) : 0, d1 = D.has_value() ? D->stride(1) : 0;
  const int64_t b0 = dt_bias.has_value() ? dt_bias->stride(0) : 0, b1 = dt_bias.has_value() ? dt_bias->stride(1) : 0;
  const auto& dsb = dsbi.has_value() ? dsbi : sbi;
  const int64_t sb0 = sbi.has_value() ? sbi->stride(0) : 0, sb1 = sbi.has_value() ? sbi->stride(1) : 0;
  const int64_t db0 = dsb.has_value() ? dsb->stride(0) : 0, db1 = dsb.has_value() ? dsb->stride(1) : 0;
  const FAcc fD(D), fbias(dt_bias), fA(A), fdt(dt);

  at::parallel_for(0, batch * H, 1, [&](int64_t begin, int64_t end) {
    // vLLM runs models under InferenceMode; pool threads don't inherit it.
    c10::InferenceMode inference_guard;
    float dtv[kMaxTok][kMaxP], dAv[kMaxTok][kMaxP], xv[kMaxTok][kMaxP];  // per token, per row
    const float* Bt[kMaxTok];
    const float* Ct[kMaxTok];
    S* dst[kMaxTok];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / H, h = it % H, g = h / ratio;
      int64_t bos = b, L = 1;
      if (cu.has_value()) {
        bos = geti(*cu, b);
        L = geti(*cu, b + 1) - bos;
      }
      if (L <= 0) continue;
      TORCH_CHECK(L <= kMaxTok, "selective_state_update: at most 16 tokens per sequence");
      // source slot (speculative: column num_accepted - 1); null -> zero state, nothing written
      const int64_t col = spec ? std::max<int64_t>(geti(*nacc, b * nacc->stride(0)) - 1, 0) : 0;
      const int64_t src = sbi.has_value() ? geti(*sbi, b * sb0 + col * sb1) : b;
      const bool valid = !(sbi.has_value() && (src == null_id || src < 0));
      for (int64_t t = 0; t < L; ++t) {
        int64_t d = -1;
        if (valid && (spec || t == L - 1)) {
          d = dsb.has_value() ? geti(*dsb, b * db0 + (spec ? t : 0) * db1) : b;
          if (dsb.has_value() && (d == null_id || d < 0)) d = -1;
        }
        dst[t] = d >= 0 ? sp + d * s0 + h * s1 : nullptr;
        const int64_t tok = bos + t;
        Bt[t] = Bp + (tok * G + g) * N;
        Ct[t] = Cp + (tok * G + g) * N;
        // dt, dA, x per row (dt and dA computed once when tied across the head's rows)
        for (int64_t p = 0; p < P; ++p) {
          xv[t][p] = tof(xp[tok * x0 + h * x1 + p * x2]);
          if (tied && p > 0) {
            dtv[t][p] = dtv[t][0];
            dAv[t][p] = dAv[t][0];
            continue;
          }
          float dtt = fdt(tok * t0 + h * t1 + p * t2) + (dt_bias.has_value() ? fbias(h * b0 + p * b1) : 0.f);
          if (dt_softplus) dtt = softplus(dtt);
          dtv[t][p] = dtt;
          dAv[t][p] = a_per_elem ? 0.f : std::exp(fA(h * a0 + p * a1) * dtt);
        }
      }
      const S* src0 = valid ? sp + src * s0 + h * s1 : nullptr;
      float bx[kMaxTok][kMaxP], y[kMaxTok][kMaxP];
      for (int64_t t = 0; t < L; ++t)
        for (int64_t p = 0; p < P; ++p) bx[t][p] = dtv[t][p] * xv[t][p];
      // fast paths (dstate a multiple of the vector width, scalar A per row)
      const bool done = !Ap && with_nv(N, [&](auto nv) {
        if (L == 1) plain_block<S, decltype(nv)::value>(src0, dst[0], s2, Bt[0], Ct[0], dAv[0], bx[0], P, y[0]);
        else spec_block<S, decltype(nv)::value>(src0, dst, s2, Bt, Ct, dAv, bx, L, P, y);
      });
      for (int64_t p = 0; !done && p < P; ++p) {  // general path: one row at a time
        float dA[kMaxTok], dtp[kMaxTok], bxp[kMaxTok], yp[kMaxTok];
        S* drow[kMaxTok];
        for (int64_t t = 0; t < L; ++t) {
          dA[t] = dAv[t][p];
          dtp[t] = dtv[t][p];
          bxp[t] = bx[t][p];
          drow[t] = dst[t] ? dst[t] + p * s2 : nullptr;
        }
        row_update<S>(src0 ? src0 + p * s2 : nullptr, drow, Bt, Ct, dA, dtp, bxp,
                      Ap ? Ap + h * a0 + p * a1 : nullptr, L, N, yp);
        for (int64_t t = 0; t < L; ++t) y[t][p] = yp[t];
      }
      // out = (y + D x) * silu(z)
      for (int64_t t = 0; t < L; ++t) {
        const int64_t tok = bos + t;
        for (int64_t p = 0; p < P; ++p) {
          float o = y[t][p] + (D.has_value() ? fD(h * d0 + p * d1) : 0.f) * xv[t][p];
          if (zp) o *= silu(tof(zp[tok * z0 + h * z1 + p * z2]));
          op[tok * o0 + h * o1 + p * o2] = X(o);
        }
      }
    }
  });
}

}  // namespace

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

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("selective_state_update", &selective_state_update);
}

}  // namespace vhn
