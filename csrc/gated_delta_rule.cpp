// Gated delta rule (Gated DeltaNet, Yang et al. 2024): recurrent decode and chunked prefill.
// State S (V x K) per value head; per token (g in log space):
//   S <- exp(g) S;  u = beta (v - S k);  S <- S + u k^T;  o = S (scale q)
// Each row of S evolves independently, so decode streams the state once, row by row.
#include <c10/core/InferenceMode.h>
#include "common.h"

namespace vhn {
namespace {

constexpr int64_t kMaxK = 256;

// q, k of one token into float buffers, optional l2-normalised, q scaled.
template <typename T>
inline void load_qk(const T* q, const T* k, int64_t K, bool l2, float scale, float* qo, float* ko) {
  float sq = 0.f, sk = 0.f;
  for (int64_t i = 0; i < K; ++i) {
    qo[i] = tof(q[i]);
    ko[i] = tof(k[i]);
    sq += qo[i] * qo[i];
    sk += ko[i] * ko[i];
  }
  const float fq = l2 ? scale / std::sqrt(sq + 1e-6f) : scale, fk = l2 ? 1.f / std::sqrt(sk + 1e-6f) : 1.f;
  for (int64_t i = 0; i < K; ++i) { qo[i] *= fq; ko[i] *= fk; }
}

template <typename T, typename S>
void recurrent_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                    const at::Tensor& beta, double scale, const c10::optional<at::Tensor>& h0,
                    at::Tensor& ht, const c10::optional<at::Tensor>& cu, const c10::optional<at::Tensor>& idx,
                    const c10::optional<at::Tensor>& nacc, bool inplace, bool l2, at::Tensor& out) {
  // q, k: (T, H, K); v, out: (T, HV, V); g, beta: (T, HV)
  const int64_t Ttot = q.size(0), H = q.size(1), K = q.size(2), HV = v.size(1), V = v.size(2);
  const int64_t nseq = cu.has_value() ? cu->size(0) - 1 : Ttot;
  const int64_t ratio = HV / H;
  const at::Tensor& src_t = h0.has_value() ? *h0 : ht;
  const S* srcp = src_t.const_data_ptr<S>();
  S* dstp = ht.mutable_data_ptr<S>();
  const int64_t ss0 = src_t.stride(0), ss1 = src_t.stride(1), ss2 = src_t.stride(2);
  const int64_t ds0 = ht.stride(0), ds1 = ht.stride(1), ds2 = ht.stride(2);
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const FAcc fg(g), fbeta(beta);
  at::parallel_for(0, nseq * HV, 1, [&](int64_t begin, int64_t end) {
    // vLLM runs models under InferenceMode; pool threads don't inherit it.
    c10::InferenceMode inference_guard;
    alignas(64) float qb[kMaxTok][kMaxK], kb[kMaxTok][kMaxK], row[kMaxK];
    float eg[kMaxTok], bt[kMaxTok];
    int64_t dst[kMaxTok];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / HV, hv = it % HV, hk = hv / ratio;
      const int64_t bos = cu.has_value() ? geti(*cu, n) : n;
      const int64_t L = cu.has_value() ? geti(*cu, n + 1) - bos : 1;
      if (L <= 0) continue;
      TORCH_CHECK(L <= kMaxTok, "gdn_recurrent: at most 16 tokens per sequence");
      int64_t src = n;
      if (idx.has_value()) {
        const int64_t col = nacc.has_value() ? geti(*nacc, n * nacc->stride(0)) - 1 : 0;
        src = geti(*idx, n * idx->stride(0) + col * (idx->dim() > 1 ? idx->stride(1) : 0));
        if (src <= 0) {  // null block / padding: nothing computed, output zeroed
          for (int64_t t = 0; t < L; ++t)
            for (int64_t r = 0; r < V; ++r) op[(bos + t) * out.stride(0) + hv * out.stride(1) + r * out.stride(2)] = T(0.f);
          continue;
        }
      }
      for (int64_t t = 0; t < L; ++t) {
        const int64_t tok = bos + t;
        load_qk(qp + tok * q.stride(0) + hk * q.stride(1), kp + tok * k.stride(0) + hk * k.stride(1), K, l2,
                (float)scale, qb[t], kb[t]);
        eg[t] = std::exp(fg( tok * g.stride(0) + hv * g.stride(1)));
        bt[t] = fbeta( tok * beta.stride(0) + hv * beta.stride(1));
        if (inplace) {
          const int64_t d = idx.has_value()
              ? geti(*idx, n * idx->stride(0) + t * (idx->dim() > 1 ? idx->stride(1) : 0)) : n;
          dst[t] = (idx.has_value() && d <= 0) ? -1 : d;
        } else {
          dst[t] = tok;
        }
      }
      for (int64_t r = 0; r < V; ++r) {
        const S* s = srcp + src * ss0 + hv * ss1 + r * ss2;
        for (int64_t i = 0; i < K; i += kVecF) vstore(row + i, vload(s + i, std::min(kVecF, K - i)), std::min(kVecF, K - i));
        for (int64_t t = 0; t < L; ++t) {
          const int64_t tok = bos + t;
          const float vr = tof(vp[tok * v.stride(0) + hv * v.stride(1) + r * v.stride(2)]);
          const fVec e(eg[t]);
          fVec acc(0.f);
          for (int64_t i = 0; i < K; i += kVecF) {
            const int64_t c = std::min(kVecF, K - i);
            fVec h = fVec::loadu(row + i, c) * e;
            h.store(row + i, c);
            acc = at::vec::fmadd(h, fVec::loadu(kb[t] + i, c), acc);
          }
          const fVec u(bt[t] * (vr - hsum(acc)));
          fVec o(0.f);
          S* d = dst[t] >= 0 ? dstp + dst[t] * ds0 + hv * ds1 + r * ds2 : nullptr;
          for (int64_t i = 0; i < K; i += kVecF) {
            const int64_t c = std::min(kVecF, K - i);
            fVec h = at::vec::fmadd(u, fVec::loadu(kb[t] + i, c), fVec::loadu(row + i, c));
            rounded<S>(h).store(row + i, c);  // the next token starts from the state as stored
            o = at::vec::fmadd(h, fVec::loadu(qb[t] + i, c), o);
            if (d) vstore(d + i, h, c);
          }
          op[tok * out.stride(0) + hv * out.stride(1) + r * out.stride(2)] =
              T(hsum(o));
        }
      }
    }
  });
}

void gdn_recurrent(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                   const at::Tensor& beta, double scale, const c10::optional<at::Tensor>& initial_state,
                   at::Tensor& final_state, const c10::optional<at::Tensor>& cu_seqlens,
                   const c10::optional<at::Tensor>& ssm_state_indices,
                   const c10::optional<at::Tensor>& num_accepted_tokens, bool inplace_final_state,
                   bool use_qk_l2norm, at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && out.sizes() == v.sizes(),
              "gdn_recurrent: q/k (T,H,K), v/out (T,HV,V)");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && q.size(2) <= kMaxK, "gdn_recurrent: K contiguous, <= 256");
  TORCH_CHECK(final_state.stride(3) == 1, "gdn_recurrent: state must be contiguous in K");
  TORCH_CHECK(!initial_state.has_value() || initial_state->scalar_type() == final_state.scalar_type(),
              "gdn_recurrent: state dtypes differ");
  TORCH_CHECK(!inplace_final_state || ssm_state_indices.has_value() || !num_accepted_tokens.has_value(),
              "gdn_recurrent: num_accepted_tokens needs ssm_state_indices");
  VHN_DISPATCH_FB(q.scalar_type(), T, [&] {
    VHN_DISPATCH_FB(final_state.scalar_type(), S, [&] {
      recurrent_impl<T, S>(q, k, v, g, beta, scale, initial_state, final_state, cu_seqlens, ssm_state_indices,
                           num_accepted_tokens, inplace_final_state, use_qk_l2norm, out);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Chunked prefill (WY form). Chunk of L tokens, gc = inclusive cumsum of g in the chunk, G = exp(gc):
//   A[i,j] = beta_i exp(gc_i - gc_j) k_i.k_j (j < i);  (I + A) [U0 | W] = [beta o V | beta G o K]
//   U = U0 - W S^T                                      (the "new values" u_j)
//   O = diag(G) Q S^T + (Q K^T o exp(gc_i - gc_j)[j <= i]) U
//   S <- G_L S + U^T (exp(gc_L - gc) o K)
template <typename T>
void chunk_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
                const at::Tensor& beta, double scale, at::Tensor& state, const at::Tensor& cu,
                const c10::optional<at::Tensor>& idx, bool l2, int64_t CS, at::Tensor& out) {
  const int64_t H = q.size(1), K = q.size(2), HV = v.size(1), V = v.size(2), ratio = HV / H;
  const int64_t nseq = cu.size(0) - 1;
  const auto fo = at::TensorOptions().dtype(at::kFloat);
  const FAcc fg(g), fbeta(beta);
  at::parallel_for(0, nseq * HV, 1, [&](int64_t begin, int64_t end) {
    // vLLM runs models under InferenceMode; pool threads don't inherit it.
    c10::InferenceMode inference_guard;
    at::Tensor Qc = at::empty({CS, K}, fo), Kc = at::empty({CS, K}, fo), Kd = at::empty({CS, K}, fo);
    at::Tensor RHS = at::empty({CS, V + K}, fo), Amat = at::empty({CS, CS}, fo), QK = at::empty({CS, CS}, fo);
    at::Tensor Sf = at::empty({V, K}, fo), Oc = at::empty({CS, V}, fo);
    std::vector<float> gc(CS), bt(CS);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / HV, hv = it % HV, hk = hv / ratio;
      const int64_t bos = geti(cu, n), eos = geti(cu, n + 1);
      const int64_t slot = idx.has_value() ? geti(*idx, n * idx->stride(0)) : n;
      if (eos <= bos || slot < 0) continue;
      at::Tensor Sslot = state[slot][hv];  // (V, K)
      Sf.copy_(Sslot);
      for (int64_t c0 = bos; c0 < eos; c0 += CS) {
        const int64_t L = std::min(CS, eos - c0);
        float* qcp = Qc.mutable_data_ptr<float>();
        float* kcp = Kc.mutable_data_ptr<float>();
        float acc = 0.f;
        for (int64_t i = 0; i < L; ++i) {
          const int64_t tok = c0 + i;
          load_qk(q.const_data_ptr<T>() + tok * q.stride(0) + hk * q.stride(1),
                  k.const_data_ptr<T>() + tok * k.stride(0) + hk * k.stride(1), K, l2, (float)scale,
                  qcp + i * K, kcp + i * K);
          acc += fg( tok * g.stride(0) + hv * g.stride(1));
          gc[i] = acc;
          bt[i] = fbeta( tok * beta.stride(0) + hv * beta.stride(1));
        }
        at::Tensor Ql = Qc.narrow(0, 0, L), Kl = Kc.narrow(0, 0, L);
        // A = K K^T (strictly lower part used) and Q K^T
        at::Tensor Al = Amat.narrow(0, 0, L).narrow(1, 0, L);
        at::mm_out(Al, Kl, Kl.t());
        at::Tensor QKl = QK.narrow(0, 0, L).narrow(1, 0, L);
        at::mm_out(QKl, Ql, Kl.t());
        float* ap = Amat.mutable_data_ptr<float>();
        float* qkp = QK.mutable_data_ptr<float>();
        for (int64_t i = 0; i < L; ++i) {  // decays exp(g_i - g_j), j <= i; vectorised over j
          const fVec gi(gc[i]), bi(bt[i]);
          float* arow = ap + i * CS;
          float* qrow = qkp + i * CS;
          for (int64_t j = 0; j <= i; j += kVecF) {
            const int64_t cnt = std::min(kVecF, i + 1 - j);
            const fVec dec = (gi - fVec::loadu(gc.data() + j, cnt)).exp();
            (fVec::loadu(arow + j, cnt) * dec * bi).store(arow + j, cnt);  // column i is never read
            (fVec::loadu(qrow + j, cnt) * dec).store(qrow + j, cnt);
          }
          std::fill(qrow + i + 1, qrow + L, 0.f);
        }
        // right-hand sides [beta v | beta exp(g) k]; Kd = exp(g_L - g) k; Q <- diag(exp(g)) Q
        float* rp = RHS.mutable_data_ptr<float>();
        float* kdp = Kd.mutable_data_ptr<float>();
        const T* vp = v.const_data_ptr<T>();
        for (int64_t i = 0; i < L; ++i) {
          const int64_t tok = c0 + i;
          const float G = std::exp(gc[i]), dl = std::exp(gc[L - 1] - gc[i]);
          float* r = rp + i * (V + K);
          const T* vrow = vp + tok * v.stride(0) + hv * v.stride(1);
          if (v.stride(2) == 1) {
            for (int64_t c = 0; c < V; c += kVecF) {
              const int64_t cnt = std::min(kVecF, V - c);
              (vload(vrow + c, cnt) * fVec(bt[i])).store(r + c, cnt);
            }
          } else {
            for (int64_t c = 0; c < V; ++c) r[c] = bt[i] * tof(vrow[c * v.stride(2)]);
          }
          const float* kr = kcp + i * K;
          float* qr = qcp + i * K;
          for (int64_t c = 0; c < K; c += kVecF) {
            const int64_t cnt = std::min(kVecF, K - c);
            const fVec kv = fVec::loadu(kr + c, cnt);
            (kv * fVec(bt[i] * G)).store(r + V + c, cnt);
            (kv * fVec(dl)).store(kdp + i * K + c, cnt);
            (fVec::loadu(qr + c, cnt) * fVec(G)).store(qr + c, cnt);
          }
        }
        // forward substitution with the unit lower-triangular (I + A): X_i = R_i - sum_{j<i} A_ij X_j
        for (int64_t i = 1; i < L; ++i) {
          float* xi = rp + i * (V + K);
          for (int64_t j = 0; j < i; ++j) {
            const fVec a(ap[i * CS + j]);
            const float* xj = rp + j * (V + K);
            int64_t c = 0;
            for (; c + kVecF <= V + K; c += kVecF)
              (fVec::loadu(xi + c) - a * fVec::loadu(xj + c)).store(xi + c);
            for (; c < V + K; ++c) xi[c] -= ap[i * CS + j] * xj[c];
          }
        }
        at::Tensor X = RHS.narrow(0, 0, L);
        at::Tensor U = X.narrow(1, 0, V);
        U.addmm_(X.narrow(1, V, K), Sf.t(), 1.f, -1.f);  // U = U0 - W S^T (in place)
        at::Tensor Ol = Oc.narrow(0, 0, L);
        at::mm_out(Ol, Ql, Sf.t());  // diag(G) Q S^T
        Ol.addmm_(QKl, U);
        Sf.mul_(std::exp(gc[L - 1]));
        Sf.addmm_(U.t(), Kd.narrow(0, 0, L));
        const float* ocp = Oc.const_data_ptr<float>();
        T* op = out.mutable_data_ptr<T>();
        for (int64_t i = 0; i < L; ++i) {
          T* orow = op + (c0 + i) * out.stride(0) + hv * out.stride(1);
          if (out.stride(2) == 1) {
            for (int64_t c = 0; c < V; c += kVecF) vstore(orow + c, fVec::loadu(ocp + i * V + c), std::min(kVecF, V - c));
          } else {
            for (int64_t c = 0; c < V; ++c) orow[c * out.stride(2)] = T(ocp[i * V + c]);
          }
        }
      }
      Sslot.copy_(Sf);
    }
  });
}

void gdn_chunk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& g,
               const at::Tensor& beta, double scale, at::Tensor& state, const at::Tensor& cu_seqlens,
               const c10::optional<at::Tensor>& state_indices, bool use_qk_l2norm, int64_t chunk_size,
               at::Tensor& out) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && out.sizes() == v.sizes(),
              "gdn_chunk: q/k (T,H,K), v/out (T,HV,V)");
  TORCH_CHECK(state.dim() == 4 && state.size(2) == v.size(2) && state.size(3) == q.size(2),
              "gdn_chunk: state must be (N, HV, V, K)");
  auto cu = cu_seqlens.contiguous();
  VHN_DISPATCH_FB(q.scalar_type(), T, [&] {  // any state dtype: rows are copied to fp32 and back
    chunk_impl<T>(q, k, v, g, beta, scale, state, cu, state_indices, use_qk_l2norm, chunk_size, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("gdn_recurrent", &gdn_recurrent);
  m.impl("gdn_chunk", &gdn_chunk);
}

}  // namespace vhn
