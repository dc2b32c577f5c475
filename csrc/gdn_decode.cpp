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
  o0 = hsum(dq0) + u0 * kq;
  o1 = hsum(dq1) + u1 * kq;
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
  return hsum(dq) + u * kq;
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

template <typename T, typename S>
void recurrence(const at::Tensor& qkv, const at::Tensor& a, const at::Tensor& b,
                at::Tensor& ssm_state, const at::Tensor& A_log, const at::Tensor& dt_bias,
                const at::Tensor& slots, int64_t H, int64_t K, double scale, at::Tensor& out) {
  const int64_t batch = qkv.size(0), HV = out.size(1), V = out.size(2), ratio = HV / H;
  const T* xp = qkv.const_data_ptr<T>();
  const int64_t xs = qkv.stride(0);
  S* sp = ssm_state.mutable_data_ptr<S>();
  const int64_t s0 = ssm_state.stride(0), s1 = ssm_state.stride(1), s2 = ssm_state.stride(2);
  T* op = out.mutable_data_ptr<T>();
  const int64_t o0 = out.stride(0), o1 = out.stride(1);
  const FAcc fa(a), fb(b), fA(A_log), fdb(dt_bias);
  const int64_t as0 = a.stride(0), as1 = a.stride(1), bs0 = b.stride(0), bs1 = b.stride(1);
  const int64_t As = A_log.stride(0), dbs = dt_bias.stride(0);
  at::parallel_for(0, batch * HV, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode guard;  // pool threads don't inherit vLLM's InferenceMode
    alignas(64) float qb[kMaxK], kb[kMaxK];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / HV, hv = it % HV, hk = hv / ratio;
      T* o = op + n * o0 + hv * o1;
      const int64_t slot = geti(slots, n * slots.stride(0));
      if (slot <= 0) {
        for (int64_t r = 0; r < V; ++r) o[r] = T(0.f);
        continue;
      }
      const T* row = xp + n * xs;
      l2_into(row + hk * K, K, static_cast<float>(scale), qb);
      l2_into(row + H * K + hk * K, K, 1.f, kb);
      const float eg = std::exp(-std::exp(fA(hv * As)) *
                                softplus(fa(n * as0 + hv * as1) + fdb(hv * dbs)));
      const float beta = 1.f / (1.f + std::exp(-fb(n * bs0 + hv * bs1)));
      float kq = 0.f;  // k.q, shared by all rows of the head
      for (int64_t i = 0; i < K; ++i) kq += kb[i] * qb[i];
      const T* v = row + 2 * H * K + hv * V;
      S* st = sp + slot * s0 + hv * s1;
      if (K == 128 && 128 % kVecF == 0)
        head_rows<128 / kVecF>(st, s2, kb, qb, kq, v, V, eg, beta, o);
      else if (K == 64 && 64 % kVecF == 0)
        head_rows<64 / kVecF>(st, s2, kb, qb, kq, v, V, eg, beta, o);
      else
        head_rows_any(st, s2, kb, qb, kq, K, v, V, eg, beta, o);
    }
  });
}

void gdn_decode(at::Tensor& qkv, const at::Tensor& a, const at::Tensor& b, at::Tensor& conv_state,
                const at::Tensor& conv_weight, const c10::optional<at::Tensor>& conv_bias,
                bool silu, at::Tensor& ssm_state, const at::Tensor& A_log,
                const at::Tensor& dt_bias, const at::Tensor& slots, int64_t num_k_heads,
                int64_t head_k_dim, double scale, at::Tensor& out) {
  // qkv: (batch, 2*H*K + HV*V); a, b: (batch, HV); ssm_state: (slots, HV, V, K); out: (batch, HV, V)
  const int64_t batch = qkv.size(0), H = num_k_heads, K = head_k_dim;
  TORCH_CHECK(out.dim() == 3 && out.size(0) == batch, "gdn_decode: out must be (batch, HV, V)");
  const int64_t HV = out.size(1), V = out.size(2);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == 2 * H * K + HV * V && qkv.stride(1) == 1,
              "gdn_decode: qkv must be (batch, 2*num_k_heads*head_k_dim + HV*V), channels "
              "contiguous; got ", qkv.sizes());
  TORCH_CHECK(H > 0 && HV % H == 0 && K > 0 && K <= kMaxK,
              "gdn_decode: value heads must be a multiple of key heads and head_k_dim <= 256");
  TORCH_CHECK(ssm_state.dim() == 4 && ssm_state.size(1) == HV && ssm_state.size(2) == V &&
              ssm_state.size(3) == K && ssm_state.stride(3) == 1,
              "gdn_decode: ssm_state must be (slots, HV, V, K), contiguous in K; got ",
              ssm_state.sizes());
  TORCH_CHECK(a.dim() == 2 && a.size(0) == batch && a.size(1) == HV && b.sizes() == a.sizes(),
              "gdn_decode: a and b must be (batch, HV)");
  TORCH_CHECK(A_log.numel() == HV && dt_bias.numel() == HV, "gdn_decode: A_log, dt_bias (HV,)");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == batch, "gdn_decode: slots must be (batch,)");
  TORCH_CHECK(conv_state.scalar_type() == qkv.scalar_type() &&
              out.scalar_type() == qkv.scalar_type(),
              "gdn_decode: qkv, conv_state and out must share one dtype");
  if (batch == 0) return;
  at::Tensor x3 = qkv.unsqueeze(-1);  // (batch, dim, 1): conv output written in place
  causal_conv1d_update(x3, conv_state, conv_weight, conv_bias, silu, slots, c10::nullopt,
                       c10::nullopt, 1, 0, x3);
  VHN_DISPATCH_FB(qkv.scalar_type(), T, [&] {
    VHN_DISPATCH_FB(ssm_state.scalar_type(), S, [&] {
      recurrence<T, S>(qkv, a, b, ssm_state, A_log, dt_bias, slots, H, K, scale, out);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("gdn_decode", &gdn_decode);
}

}  // namespace vhn
