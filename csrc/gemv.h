// Small-M matrix-vector blocks shared by bf16_linear and moe_experts: M fp32 input rows against
// NB weight rows (bf16 or fp32), fp32 accumulation. Each weight vector is loaded (and converted)
// once and used by all M input rows; each input vector once and used by all NB weight rows.
// The accumulation order of one (input row, weight row) pair depends only on K, never on M or
// NB, so a token's result does not depend on which other tokens share its call.
#pragma once

#include "common.h"

#include <tuple>

namespace vhn {

using bVec = at::vec::Vectorized<BFloat16>;
constexpr int64_t kDotStep = bVec::size();  // elements per k-step: 2 fp32 vectors

// Two fp32 vectors of weight elements k .. k + kDotStep.
inline std::tuple<fVec, fVec> load_pair(const BFloat16* w) {
  return at::vec::convert_to_float<BFloat16>(bVec::loadu(w));
}
inline std::tuple<fVec, fVec> load_pair(const float* w) {
  return {fVec::loadu(w), fVec::loadu(w + kVecF)};
}

// dots[nb][m] = sum_k x[m * ldx + k] * w[nb * ldw + k], k < K.
template <int M, int NB, typename W>
inline void dot_block(const float* x, int64_t ldx, const W* w, int64_t ldw, int64_t K,
                      float dots[NB][M]) {
  fVec acc[NB][M];
  for (int nb = 0; nb < NB; ++nb)
    for (int m = 0; m < M; ++m) acc[nb][m] = fVec(0.f);
  int64_t k = 0;
  for (; k + kDotStep <= K; k += kDotStep) {
    fVec w0[NB], w1[NB];  // this k-slice of NB weight rows, in fp32
    for (int nb = 0; nb < NB; ++nb) std::tie(w0[nb], w1[nb]) = load_pair(w + nb * ldw + k);
    for (int m = 0; m < M; ++m) {
      const fVec x0 = fVec::loadu(x + m * ldx + k), x1 = fVec::loadu(x + m * ldx + k + kVecF);
      for (int nb = 0; nb < NB; ++nb)
        acc[nb][m] = at::vec::fmadd(x1, w1[nb], at::vec::fmadd(x0, w0[nb], acc[nb][m]));
    }
  }
  for (int nb = 0; nb < NB; ++nb) {
    const W* wr = w + nb * ldw;
    for (int m = 0; m < M; ++m) {
      float s = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, acc[nb][m]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * ldx + kk] * static_cast<float>(wr[kk]);
      dots[nb][m] = s;
    }
  }
}

// Weight rows per block for M input rows: NB*M accumulators + 2*NB weight vectors + 2 input
// vectors fit 16 AVX2 registers.
template <int M>
constexpr int rows_per_block() { return M == 1 ? 4 : (M == 2 ? 3 : (M <= 4 ? 2 : 1)); }

}  // namespace vhn
