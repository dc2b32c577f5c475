// Mamba2 chunked SSD prefill (Dao & Gu 2024, "state space duality"), built on GEMMs.
// For a chunk of L tokens of one head with cum[i] = sum_{l<=i} A*dt[l]:
//   Y      = ((C B^T) o exp(cum_i - cum_j) [j<=i] o dt_j) X        (intra-chunk, "diagonal block")
//          + diag(exp(cum)) C S_prev^T                              (contribution of the carried state)
//   S_end  = exp(cum[L-1]) S_prev + X^T (B o exp(cum[L-1]-cum_j) dt_j)
// Three passes: (1) per (chunk, head) the local chunk state, (2) per (sequence, head) the
// sequential state passing over chunks, (3) per (chunk, head) the outputs.
#include <c10/core/InferenceMode.h>
#include "common.h"

namespace vhn {
namespace {

using at::indexing::Slice;

struct ChunkInfo {
  int64_t start, len, seq;
};

template <typename X>
void ssd_impl(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
              const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
              const c10::optional<at::Tensor>& dt_bias, const c10::optional<at::Tensor>& init,
              const at::Tensor& cu_chunk, const at::Tensor& seq_idx, bool dt_softplus, double dt_min,
              double dt_max, at::Tensor& out, at::Tensor& states) {
  const int64_t H = x.size(1), P = x.size(2), G = B.size(1), N = B.size(2), ratio = H / G;
  const int64_t nchunks = cu_chunk.size(0) - 1;
  std::vector<ChunkInfo> ch(nchunks);
  int64_t maxlen = 1;
  for (int64_t c = 0; c < nchunks; ++c) {
    ch[c] = {geti(cu_chunk, c), geti(cu_chunk, c + 1) - geti(cu_chunk, c), geti(seq_idx, c)};
    maxlen = std::max(maxlen, ch[c].len);
  }
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  // fp32 copies in (head-major) GEMM-friendly layouts
  at::Tensor xf = x.to(at::kFloat).permute({1, 0, 2}).contiguous();  // (H, T, P)
  at::Tensor Bf = B.to(at::kFloat).permute({1, 0, 2}).contiguous();  // (G, T, N)
  at::Tensor Cf = C.to(at::kFloat).permute({1, 0, 2}).contiguous();  // (G, T, N)
  // processed dt (softplus, bias, clamp) and per-chunk cumulative A*dt: (H, T)
  at::Tensor dtf = dt.to(at::kFloat).t().contiguous();
  if (dt_bias.has_value()) dtf.add_(dt_bias->to(at::kFloat).reshape({H, 1}));
  if (dt_softplus) dtf = at::where(dtf <= 20.f, at::log1p(at::exp(dtf)), dtf);
  dtf.clamp_(dt_min, dt_max);
  at::Tensor Af = A.to(at::kFloat).contiguous();
  at::Tensor cum = at::empty_like(dtf);
  {
    const float* dp = dtf.const_data_ptr<float>();
    float* cp = cum.mutable_data_ptr<float>();
    const float* ap = Af.const_data_ptr<float>();
    const int64_t T = dtf.size(1);
    at::parallel_for(0, H, 1, [&](int64_t b, int64_t e) {
      // vLLM runs models under InferenceMode; pool threads don't inherit it.
      c10::InferenceMode inference_guard;
      for (int64_t h = b; h < e; ++h)
        for (const auto& c : ch) {
          float s = 0.f;
          for (int64_t l = 0; l < c.len; ++l) {
            s += ap[h] * dp[h * T + c.start + l];
            cp[h * T + c.start + l] = s;
          }
        }
    });
  }
  const float* dtp = dtf.const_data_ptr<float>();
  const float* cump = cum.const_data_ptr<float>();
  const int64_t T = dtf.size(1);
  float* stp = states.mutable_data_ptr<float>();
  const int64_t PN = P * N;

  // (1) local chunk states: S_loc = X^T (B o w), w_j = exp(cum_last - cum_j) dt_j
  at::parallel_for(0, nchunks * H, 1, [&](int64_t b, int64_t e) {
    // vLLM runs models under InferenceMode; pool threads don't inherit it.
    c10::InferenceMode inference_guard;
    at::Tensor Bw = at::empty({maxlen, N}, fopt);
    for (int64_t it = b; it < e; ++it) {
      const int64_t c = it / H, h = it % H, g = h / ratio;
      const auto& ci = ch[c];
      if (ci.len == 0) { std::fill_n(stp + (c * H + h) * PN, PN, 0.f); continue; }
      const float* cu = cump + h * T + ci.start;
      const float* dd = dtp + h * T + ci.start;
      const float* bsrc = Bf.const_data_ptr<float>() + (g * T + ci.start) * N;
      float* bw = Bw.mutable_data_ptr<float>();
      for (int64_t l = 0; l < ci.len; ++l) {
        const float w = std::exp(cu[ci.len - 1] - cu[l]) * dd[l];
        for (int64_t n = 0; n < N; ++n) bw[l * N + n] = bsrc[l * N + n] * w;
      }
      at::Tensor Xc = xf[h].narrow(0, ci.start, ci.len);                 // (L, P)
      at::Tensor o = states[c][h];                                        // (P, N)
      at::mm_out(o, Xc.t(), Bw.narrow(0, 0, ci.len));
    }
  });

  // (2) state passing, sequentially over the chunks of each sequence
  std::vector<int64_t> seq_first;  // chunks grouped by sequence, in order
  for (int64_t c = 0; c < nchunks; ++c)
    if (c == 0 || ch[c].seq != ch[c - 1].seq) seq_first.push_back(c);
  seq_first.push_back(nchunks);
  const int64_t nseq_runs = seq_first.size() - 1;
  at::parallel_for(0, nseq_runs * H, 1, [&](int64_t b, int64_t e) {
    // vLLM runs models under InferenceMode; pool threads don't inherit it.
    c10::InferenceMode inference_guard;
    for (int64_t it = b; it < e; ++it) {
      const int64_t r = it / H, h = it % H;
      const float* prev = nullptr;
      at::Tensor init_f;
      const int64_t s = ch[seq_first[r]].seq;
      std::vector<float> ibuf;
      if (init.has_value()) {
        ibuf.resize(PN);
        const at::Tensor ih = (*init)[s][h];
        const FAcc fih(ih);
        for (int64_t i = 0; i < PN; ++i) ibuf[i] = fih( (i / N) * ih.stride(0) + (i % N) * ih.stride(1));
        prev = ibuf.data();
      }
      for (int64_t c = seq_first[r]; c < seq_first[r + 1]; ++c) {
        float* cur = stp + (c * H + h) * PN;
        if (prev != nullptr && ch[c].len > 0) {
          const float dec = std::exp(cump[h * T + ch[c].start + ch[c].len - 1]);
          const fVec decay(dec);
          int64_t i = 0;
          for (; i + kVecF <= PN; i += kVecF)
            at::vec::fmadd(fVec::loadu(prev + i), decay, fVec::loadu(cur + i)).store(cur + i);
          for (; i < PN; ++i) cur[i] += prev[i] * dec;
        } else if (prev != nullptr) {
          std::copy_n(prev, PN, cur);
        }
        prev = cur;
      }
    }
  });

  // (3) outputs
  std::vector<int64_t> first_of_seq(nchunks);
  for (int64_t r = 0; r < nseq_runs; ++r)
    for (int64_t c = seq_first[r]; c < seq_first[r + 1]; ++c) first_of_seq[c] = seq_first[r];
  at::parallel_for(0, nchunks * H, 1, [&](int64_t b, int64_t e) {
    // vLLM runs models under InferenceMode; pool threads don't inherit it.
    c10::InferenceMode inference_guard;
    at::Tensor M = at::empty({maxlen, maxlen}, fopt);
    at::Tensor CB = at::empty({maxlen, maxlen}, fopt);
    at::Tensor Y = at::empty({maxlen, P}, fopt);
    at::Tensor Ce = at::empty({maxlen, N}, fopt);
    at::Tensor Sinit = at::empty({P, N}, fopt);
    int64_t cb_chunk = -1, cb_group = -1;
    for (int64_t it = b; it < e; ++it) {
      const int64_t c = it / H, h = it % H, g = h / ratio;
      const auto& ci = ch[c];
      const int64_t L = ci.len;
      if (L == 0) continue;
      at::Tensor Cc = Cf[g].narrow(0, ci.start, L);
      at::Tensor CBl = CB.narrow(0, 0, L).narrow(1, 0, L);
      if (cb_chunk != c || cb_group != g) {  // C B^T is shared by the heads of a group
        at::mm_out(CBl, Cc, Bf[g].narrow(0, ci.start, L).t());
        cb_chunk = c; cb_group = g;
      }
      const float* cu = cump + h * T + ci.start;
      const float* dd = dtp + h * T + ci.start;
      float* mp = M.mutable_data_ptr<float>();
      const float* cbp = CB.const_data_ptr<float>();
      for (int64_t i = 0; i < L; ++i) {  // M[i, j] = CB[i, j] exp(cum_i - cum_j) dt_j, j <= i
        const fVec ci(cu[i]);
        for (int64_t j = 0; j <= i; j += kVecF) {
          const int64_t cnt = std::min(kVecF, i + 1 - j);
          const fVec m = fVec::loadu(cbp + i * maxlen + j, cnt) * (ci - fVec::loadu(cu + j, cnt)).exp() *
                         fVec::loadu(dd + j, cnt);
          m.store(mp + i * L + j, cnt);
        }
        for (int64_t j = i + 1; j < L; ++j) mp[i * L + j] = 0.f;
      }
      at::Tensor Ml = at::from_blob(mp, {L, L}, fopt);
      at::Tensor Yl = Y.narrow(0, 0, L);
      at::mm_out(Yl, Ml, xf[h].narrow(0, ci.start, L));
      // carried state: the previous chunk's end state, or the initial state
      const float* sprev = nullptr;
      if (c != first_of_seq[c]) {
        sprev = stp + ((c - 1) * H + h) * PN;
      } else if (init.has_value()) {
        const at::Tensor ih = (*init)[ci.seq][h];
        const FAcc fih(ih);
        float* sp = Sinit.mutable_data_ptr<float>();
        for (int64_t i = 0; i < PN; ++i) sp[i] = fih( (i / N) * ih.stride(0) + (i % N) * ih.stride(1));
        sprev = sp;
      }
      if (sprev != nullptr) {
        float* cep = Ce.mutable_data_ptr<float>();
        const float* csrc = Cc.const_data_ptr<float>();
        for (int64_t i = 0; i < L; ++i) {
          const float w = std::exp(cu[i]);
          for (int64_t n = 0; n < N; ++n) cep[i * N + n] = csrc[i * N + n] * w;
        }
        at::Tensor Sp = at::from_blob(const_cast<float*>(sprev), {P, N}, fopt);
        Yl.addmm_(Ce.narrow(0, 0, L), Sp.t());
      }
      // D skip, z gate, store
      const float* yp = Yl.const_data_ptr<float>();
      const FAcc fD(D), fz(z);
      const int64_t so0 = out.stride(0), so1 = out.stride(1), so2 = out.stride(2);
      X* op = out.mutable_data_ptr<X>();
      const X* xp = x.const_data_ptr<X>();
      for (int64_t i = 0; i < L; ++i) {
        const int64_t tok = ci.start + i;
        for (int64_t p = 0; p < P; ++p) {
          float y = yp[i * P + p];
          if (D.has_value())
            y += (D->dim() == 1 ? fD( h * D->stride(0)) : fD( h * D->stride(0) + p * D->stride(1))) *
                 tof(xp[tok * x.stride(0) + h * x.stride(1) + p * x.stride(2)]);
          if (z.has_value()) y *= silu(fz( tok * z->stride(0) + h * z->stride(1) + p * z->stride(2)));
          op[tok * so0 + h * so1 + p * so2] = X(y);
        }
      }
    }
  });
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
