// One Gated DeltaNet decode step (one token per sequence) in a single op:
//  1. causal conv update of the packed [q | k | v] row (written back in place, as vLLM's conv
//     update does), SiLU;
//  2. gates: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b);
//  3. q, k l2-normalised (q scaled), then per value head, state S (V x K) in place:
//       S <- exp(g) S;  u = beta (v - S k);  S <- S + u k^T;  o = S q.
// Why: the two-op path (conv update, then the recurrence after torch-side gating, splits and
// l2 norms) reached 32-37% of the state's read+write bandwidth. Here each state row is
// read once and written once, two rows interleaved, with q and k held in registers for the
// head dims the models use (K = 64, 128); other K take a generic loop. Rows whose slot is
// <= 0 (vLLM's null block, padding) are skipped: state untouched, output zero.
#include <c10/core/InferenceMode.h>

#include "common.h"
#include "ops.h"

namespace vhn {
namespace {

constexpr int64_t kMaxK = 256;

// With h = exp(g) S_r (row r decayed): u = beta (v_r - h.k), S_r <- h + u k, and
// o_r = S_r.q = h.q + u (k.q). Both dots come from one pass over h (two independent
// accumulator chains, no reduction between passes); the second pass only updates and stores.

// Two state rows of one head, K = NV * kVecF fixed: s0, s1 in place; kq = k.q.
template <int NV, typename S>
inline void two_rows_fixed(S* s0, S* s1, const fVec* kv, const fVec* qv, float kq, float eg,
                           float beta, float v0, float v1, float& o0, float& o1) {
  fVec h0[NV], h1[NV];
  fVec dk0(0.f), dk1(0.f), dq0(0.f), dq1(0.f);
  const fVec e(eg);
  for (int i = 0; i < NV; ++i) {
    h0[i] = vload(s0 + i * kVecF, kVecF) * e;
    h1[i] = vload(s1 + i * kVecF, kVecF) * e;
    dk0 = at::vec::fmadd(h0[i], kv[i], dk0);
    dk1 = at::vec::fmadd(h1[i], kv[i], dk1);
    dq0 = at::vec::fmadd(h0[i], qv[i], dq0);
    dq1 = at::vec::fmadd(h1[i], qv[i], dq1);
  }
  const float u0 = beta * (v0 - hsum(dk0)), u1 = beta * (v1 - hsum(dk1));
  o0 = std::fma(u0, kq, hsum(dq0));  // explicit fma: the same rounding in every path
  o1 = std::fma(u1, kq, hsum(dq1));
  const fVec uv0(u0), uv1(u1);
  for (int i = 0; i < NV; ++i) {
    vstore(s0 + i * kVecF, at::vec::fmadd(uv0, kv[i], h0[i]), kVecF);
    vstore(s1 + i * kVecF, at::vec::fmadd(uv1, kv[i], h1[i]), kVecF);
  }
}

// One state row, any K (kb, qb: K floats).
template <typename S>
inline float one_row_any(S* s, const float* kb, const float* qb, int64_t K, float kq, float eg,
                         float beta, float v) {
  alignas(64) float h[kMaxK];
  const fVec e(eg);
  fVec dk(0.f), dq(0.f);
  for (int64_t i = 0; i < K; i += kVecF) {
    const int64_t c = std::min(kVecF, K - i);
    const fVec x = vload(s + i, c) * e;
    x.store(h + i, c);
    dk = at::vec::fmadd(x, fVec::loadu(kb + i, c), dk);
    dq = at::vec::fmadd(x, fVec::loadu(qb + i, c), dq);
  }
  const float u = beta * (v - hsum(dk));
  const fVec uv(u);
  for (int64_t i = 0; i < K; i += kVecF) {
    const int64_t c = std::min(kVecF, K - i);
    vstore(s + i, at::vec::fmadd(uv, fVec::loadu(kb + i, c), fVec::loadu(h + i, c)), c);
  }
  return std::fma(u, kq, hsum(dq));
}

// One state row through the L tokens of a speculative verification step, any K. Token t does
// one_row_any's arithmetic on the row as plain decode would have stored it after token t - 1
// (carried in fp32, rounded to S), so it gives bit for bit what the t-th of L plain decode
// steps gives. src: the row before token 0 (null: zeros); dst[t]: where the row after token t
// goes (null: not stored); kb[t], qb[t]: K floats; o[t]: the row's output for token t.
// (Bandwidth bound, not latency bound: the L per-token states written dominate; two rows per
// pass measured no faster.)
template <typename S>
inline void row_tokens(const S* src, S* const* dst, int64_t L, const float (*kb)[kMaxK],
                       const float (*qb)[kMaxK], const float* kq, const float* eg,
                       const float* beta, const float* v, int64_t K, float* o) {
  alignas(64) float row[kMaxK], h[kMaxK];
  for (int64_t i = 0; i < K; i += kVecF) {
    const int64_t c = std::min(kVecF, K - i);
    (src ? vload(src + i, c) : fVec(0.f)).store(row + i, c);
  }
  for (int64_t t = 0; t < L; ++t) {
    const fVec e(eg[t]);
    fVec dk(0.f), dq(0.f);
    for (int64_t i = 0; i < K; i += kVecF) {
      const int64_t c = std::min(kVecF, K - i);
      const fVec x = fVec::loadu(row + i, c) * e;
      x.store(h + i, c);
      dk = at::vec::fmadd(x, fVec::loadu(kb[t] + i, c), dk);
      dq = at::vec::fmadd(x, fVec::loadu(qb[t] + i, c), dq);
    }
    const float u = beta[t] * (v[t] - hsum(dk));
    const fVec uv(u);
    for (int64_t i = 0; i < K; i += kVecF) {
      const int64_t c = std::min(kVecF, K - i);
      const fVec n = at::vec::fmadd(uv, fVec::loadu(kb[t] + i, c), fVec::loadu(h + i, c));
      if (dst[t]) vstore(dst[t] + i, n, c);
      rounded<S>(n).store(row + i, c);
    }
    o[t] = std::fma(u, kq[t], hsum(dq));
  }
}

template <int NV, typename T, typename S>
void head_rows(S* state, int64_t sr, const float* kb, const float* qb, float kq, const T* v,
               int64_t V, float eg, float beta, T* o) {
  // state: (V, K) rows with row stride sr, K = NV * kVecF; v, o: (V,)
  fVec kv[NV], qv[NV];
  for (int i = 0; i < NV; ++i) {
    kv[i] = fVec::loadu(kb + i * kVecF);
    qv[i] = fVec::loadu(qb + i * kVecF);
  }
  int64_t r = 0;
  for (; r + 2 <= V; r += 2) {
    float o0, o1;
    two_rows_fixed<NV>(state + r * sr, state + (r + 1) * sr, kv, qv, kq, eg, beta, tof(v[r]),
                       tof(v[r + 1]), o0, o1);
    o[r] = T(o0);
    o[r + 1] = T(o1);
  }
  if (r < V) o[r] = T(one_row_any(state + r * sr, kb, qb, NV * kVecF, kq, eg, beta, tof(v[r])));
}

template <typename T, typename S>
void head_rows_any(S* state, int64_t sr, const float* kb, const float* qb, float kq, int64_t K,
                   const T* v, int64_t V, float eg, float beta, T* o) {
  for (int64_t r = 0; r < V; ++r)
    o[r] = T(one_row_any(state + r * sr, kb, qb, K, kq, eg, beta, tof(v[r])));
}

// l2-normalised copy of x (K) into dst, times mul.
template <typename T>
inline void l2_into(const T* x, int64_t K, float mul, float* dst) {
  float ss = 0.f;
  for (int64_t i = 0; i < K; ++i) {
    dst[i] = tof(x[i]);
    ss += dst[i] * dst[i];
  }
  const float f = mul / std::sqrt(ss + 1e-6f);
  for (int64_t i = 0; i < K; ++i) dst[i] *= f;
}

// One token's inputs to value head hv's rows: q (scaled) and k l2-normalised into qb / kb, and
// the head's decay exp(g), beta and k.q. Shared by plain and speculative decode and kept out of
// line, so both compile it once and compute the same bits.
struct Gates {
  float eg, beta, kq;
};
template <typename T>
[[gnu::noinline]] Gates token_inputs(const T* row, int64_t H, int64_t K, int64_t hk, float scale,
                                     float A_log, float a, float dt_bias, float b, float* qb,
                                     float* kb) {
  l2_into(row + hk * K, K, scale, qb);
  l2_into(row + H * K + hk * K, K, 1.f, kb);
  Gates gt;
  gt.eg = std::exp(-std::exp(A_log) * softplus(a + dt_bias));
  gt.beta = 1.f / (1.f + std::exp(-b));
  gt.kq = 0.f;  // k.q, shared by all rows of the head
  for (int64_t i = 0; i < K; ++i) gt.kq = std::fma(kb[i], qb[i], gt.kq);
  return gt;
}

// What both recurrences read and write, as pointers and strides: qkv (tokens, 2*H*K + HV*V),
// a, b (tokens, HV), A_log, dt_bias (HV,), the state (slots, HV, V, K), out (tokens, HV, V).
template <typename T, typename S>
struct Step {
  const T* x;
  S* state;
  T* out;
  FAcc fa, fb, fA, fdb;
  int64_t xs, s0, s1, s2, o0, o1, as0, as1, bs0, bs1, As, dbs, H, K, HV, V, ratio;
  float scale;
  Step(const at::Tensor& qkv, const at::Tensor& a, const at::Tensor& b, at::Tensor& ssm_state,
       const at::Tensor& A_log, const at::Tensor& dt_bias, int64_t H_, int64_t K_,
       double scale_, at::Tensor& out_)
      : x(qkv.const_data_ptr<T>()), state(ssm_state.mutable_data_ptr<S>()),
        out(out_.mutable_data_ptr<T>()), fa(a), fb(b), fA(A_log), fdb(dt_bias),
        xs(qkv.stride(0)), s0(ssm_state.stride(0)), s1(ssm_state.stride(1)),
        s2(ssm_state.stride(2)), o0(out_.stride(0)), o1(out_.stride(1)), as0(a.stride(0)),
        as1(a.stride(1)), bs0(b.stride(0)), bs1(b.stride(1)), As(A_log.stride(0)),
        dbs(dt_bias.stride(0)), H(H_), K(K_), HV(out_.size(1)), V(out_.size(2)),
        ratio(out_.size(1) / H_), scale(static_cast<float>(scale_)) {}
  // Token tok's gates for value head hv; its normalised q (scaled) and k into qb, kb.
  Gates inputs(int64_t tok, int64_t hv, float* qb, float* kb) const {
    return token_inputs(x + tok * xs, H, K, hv / ratio, scale, fA(hv * As),
                        fa(tok * as0 + hv * as1), fdb(hv * dbs), fb(tok * bs0 + hv * bs1), qb,
                        kb);
  }
  const T* v(int64_t tok, int64_t hv) const { return x + tok * xs + 2 * H * K + hv * V; }
  S* head_state(int64_t slot, int64_t hv) const { return state + slot * s0 + hv * s1; }
  T* head_out(int64_t tok, int64_t hv) const { return out + tok * o0 + hv * o1; }
};

template <typename T, typename S>
void recurrence(const Step<T, S>& st, const at::Tensor& slots, int64_t batch) {
  const int64_t HV = st.HV, V = st.V, K = st.K;
  at::parallel_for(0, batch * HV, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;  // pool threads don't inherit vLLM's InferenceMode
    alignas(64) float qb[kMaxK], kb[kMaxK];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / HV, hv = it % HV;
      T* o = st.head_out(n, hv);
      const int64_t slot = geti(slots, n * slots.stride(0));
      if (slot <= 0) {
        for (int64_t r = 0; r < V; ++r) o[r] = T(0.f);
        continue;
      }
      const Gates gt = st.inputs(n, hv, qb, kb);
      const T* v = st.v(n, hv);
      S* s = st.head_state(slot, hv);
      if (K == 128 && 128 % kVecF == 0)
        head_rows<128 / kVecF>(s, st.s2, kb, qb, gt.kq, v, V, gt.eg, gt.beta, o);
      else if (K == 64 && 64 % kVecF == 0)
        head_rows<64 / kVecF>(s, st.s2, kb, qb, gt.kq, v, V, gt.eg, gt.beta, o);
      else
        head_rows_any(s, st.s2, kb, qb, gt.kq, K, v, V, gt.eg, gt.beta, o);
    }
  });
}

// Speculative verification: sequence n's tokens cu_seqlens[n] .. cu_seqlens[n + 1] (qkv rows,
// conv already applied); its state is read from slots[n, num_accepted[n] - 1] and the state after
// its token t is written to slots[n, t] (<= 0: not stored). A sequence whose source slot is <= 0
// is skipped (outputs zero), as plain decode skips it.
template <typename T, typename S>
void spec_recurrence(const Step<T, S>& st, const at::Tensor& slots,
                     const at::Tensor& num_accepted, const at::Tensor& cu_seqlens) {
  const int64_t seqs = cu_seqlens.numel() - 1, HV = st.HV, V = st.V, K = st.K;
  const int64_t ss0 = slots.stride(0), ss1 = slots.stride(1);
  at::parallel_for(0, seqs * HV, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;  // pool threads don't inherit vLLM's InferenceMode
    alignas(64) float qb[kMaxTok][kMaxK], kb[kMaxTok][kMaxK];
    float eg[kMaxTok], beta[kMaxTok], kq[kMaxTok], vr[kMaxTok], o[kMaxTok];
    S* dst[kMaxTok];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / HV, hv = it % HV;
      const int64_t bos = geti(cu_seqlens, n), L = geti(cu_seqlens, n + 1) - bos;
      if (L <= 0) continue;
      const int64_t src = geti(slots, n * ss0 + (geti(num_accepted, n) - 1) * ss1);
      if (src <= 0) {
        for (int64_t t = 0; t < L; ++t)
          for (int64_t r = 0; r < V; ++r) st.head_out(bos + t, hv)[r] = T(0.f);
        continue;
      }
      for (int64_t t = 0; t < L; ++t) {
        const Gates gt = st.inputs(bos + t, hv, qb[t], kb[t]);
        eg[t] = gt.eg, beta[t] = gt.beta, kq[t] = gt.kq;
        const int64_t d = geti(slots, n * ss0 + t * ss1);
        dst[t] = d > 0 ? st.head_state(d, hv) : nullptr;
      }
      const S* from = st.head_state(src, hv);
      for (int64_t r = 0; r < V; ++r) {
        S* to[kMaxTok];
        for (int64_t t = 0; t < L; ++t) {
          to[t] = dst[t] ? dst[t] + r * st.s2 : nullptr;
          vr[t] = tof(st.v(bos + t, hv)[r]);
        }
        row_tokens(from + r * st.s2, to, L, kb, qb, kq, eg, beta, vr, K, o);
        for (int64_t t = 0; t < L; ++t) st.head_out(bos + t, hv)[r] = T(o[t]);
      }
    }
  });
}

// The checks both ops share; batch: qkv rows (tokens).
void check_args(const char* op, const at::Tensor& qkv, const at::Tensor& a, const at::Tensor& b,
                const at::Tensor& conv_state, const at::Tensor& ssm_state,
                const at::Tensor& A_log, const at::Tensor& dt_bias, int64_t H, int64_t K,
                const at::Tensor& out) {
  const int64_t batch = qkv.size(0);
  TORCH_CHECK(out.dim() == 3 && out.size(0) == batch, op, ": out must be (tokens, HV, V)");
  const int64_t HV = out.size(1), V = out.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == 2 * H * K + HV * V && qkv.stride(1) == 1, op,
              ": qkv must be (tokens, 2*num_k_heads*head_k_dim + HV*V), channels contiguous; "
              "got ", qkv.sizes());
  TORCH_CHECK(H > 0 && HV % H == 0 && K > 0 && K <= kMaxK, op,
              ": value heads must be a multiple of key heads and head_k_dim <= 256");
  TORCH_CHECK(ssm_state.dim() == 4 && ssm_state.size(1) == HV && ssm_state.size(2) == V &&
              ssm_state.size(3) == K && ssm_state.stride(3) == 1, op,
              ": ssm_state must be (slots, HV, V, K), contiguous in K; got ", ssm_state.sizes());
  TORCH_CHECK(a.dim() == 2 && a.size(0) == batch && a.size(1) == HV && b.sizes() == a.sizes(),
              op, ": a and b must be (tokens, HV)");
  TORCH_CHECK(A_log.numel() == HV && dt_bias.numel() == HV, op, ": A_log, dt_bias (HV,)");
  TORCH_CHECK(conv_state.scalar_type() == qkv.scalar_type() &&
              out.scalar_type() == qkv.scalar_type(),
              op, ": qkv, conv_state and out must share one dtype");
}

void gdn_decode(at::Tensor& qkv, const at::Tensor& a, const at::Tensor& b, at::Tensor& conv_state,
                const at::Tensor& conv_weight, const c10::optional<at::Tensor>& conv_bias,
                bool silu, at::Tensor& ssm_state, const at::Tensor& A_log,
                const at::Tensor& dt_bias, const at::Tensor& slots, int64_t num_k_heads,
                int64_t head_k_dim, double scale, at::Tensor& out) {
  // qkv: (batch, 2*H*K + HV*V); a, b: (batch, HV); ssm_state: (slots, HV, V, K); out: (batch, HV, V)
  const int64_t batch = qkv.size(0), H = num_k_heads, K = head_k_dim;
  check_args("gdn_decode", qkv, a, b, conv_state, ssm_state, A_log, dt_bias, H, K, out);
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == batch, "gdn_decode: slots must be (batch,)");
  if (batch == 0) return;
  at::Tensor x3 = qkv.unsqueeze(-1);  // (batch, dim, 1): conv output written in place
  causal_conv1d_update(x3, conv_state, conv_weight, conv_bias, silu, slots, c10::nullopt,
                       c10::nullopt, 1, 0, x3);
  VHN_DISPATCH_FB(qkv.scalar_type(), T, [&] {
    VHN_DISPATCH_FB(ssm_state.scalar_type(), S, [&] {
      recurrence<T, S>(Step<T, S>(qkv, a, b, ssm_state, A_log, dt_bias, H, K, scale, out), slots,
                       batch);
    });
  });
}

void gdn_spec_decode(at::Tensor& qkv, const at::Tensor& a, const at::Tensor& b,
                     at::Tensor& conv_state, const at::Tensor& conv_weight,
                     const c10::optional<at::Tensor>& conv_bias, bool silu,
                     at::Tensor& ssm_state, const at::Tensor& A_log, const at::Tensor& dt_bias,
                     const at::Tensor& slots, const at::Tensor& num_accepted,
                     const at::Tensor& cu_seqlens, int64_t num_k_heads, int64_t head_k_dim,
                     double scale, at::Tensor& out) {
  // qkv: (tokens, 2*H*K + HV*V); a, b: (tokens, HV); slots: (seqs, >= max tokens per seq);
  // num_accepted: (seqs,); cu_seqlens: (seqs + 1,); out: (tokens, HV, V)
  const int64_t H = num_k_heads, K = head_k_dim, seqs = cu_seqlens.numel() - 1;
  check_args("gdn_spec_decode", qkv, a, b, conv_state, ssm_state, A_log, dt_bias, H, K, out);
  TORCH_CHECK(slots.dim() == 2 && slots.size(0) >= seqs && num_accepted.numel() >= seqs,
              "gdn_spec_decode: slots must be (seqs, 1 + drafts), num_accepted (seqs,)");
  int64_t lmax = 0;
  for (int64_t n = 0; n < seqs; ++n) {
    const int64_t L = geti(cu_seqlens, n + 1) - geti(cu_seqlens, n);
    const int64_t acc = geti(num_accepted, n);
    TORCH_CHECK(L <= slots.size(1) && L <= kMaxTok && acc >= 1 && acc <= slots.size(1),
                "gdn_spec_decode: sequence ", n, " has ", L, " tokens and ", acc,
                " accepted for ", slots.size(1), " slot columns (at most ", kMaxTok, " tokens)");
    lmax = std::max(lmax, L);
  }
  if (seqs <= 0 || qkv.size(0) == 0) return;
  at::Tensor x3 = qkv.t().unsqueeze(0);  // (1, dim, tokens): conv output written in place
  causal_conv1d_update(x3, conv_state, conv_weight, conv_bias, silu, slots.select(1, 0),
                       num_accepted, cu_seqlens, lmax, 0, x3);
  VHN_DISPATCH_FB(qkv.scalar_type(), T, [&] {
    VHN_DISPATCH_FB(ssm_state.scalar_type(), S, [&] {
      spec_recurrence<T, S>(Step<T, S>(qkv, a, b, ssm_state, A_log, dt_bias, H, K, scale, out),
                            slots, num_accepted, cu_seqlens);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("gdn_decode", &gdn_decode);
  m.impl("gdn_spec_decode", &gdn_spec_decode);
}

}  // namespace vhn
