// Small-M matrix-vector blocks shared by bf16_linear and moe_experts: M fp32 input rows (in the
// weight type's dot layout, below) against NB weight rows (bf16 or fp32), fp32 accumulation. Each weight vector is loaded (and converted)
// once and used by all M input rows; each input vector once and used by all NB weight rows.
// The accumulation order of one (input row, weight row) pair depends only on K, never on M or
// NB, so a token's result does not depend on which other tokens share its call.
#pragma once

#include "common.h"

#include <tuple>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace vhn {

using bVec = at::vec::Vectorized<BFloat16>;
constexpr int64_t kDotStep = bVec::size();  // elements per k-step: 2 fp32 vectors

// The order a dot kernel reads x in ("dot layout"). bf16 weights are widened to fp32 with one
// shift and one mask per vector (no lane shuffles), which yields a k-step's even-indexed
// elements, then its odd-indexed ones: x is stored the same way, each full k-step of x as its
// kVecF even-indexed elements followed by its kVecF odd-indexed ones; the tail (K % kDotStep)
// stays in natural order. fp32 weights read x in natural order.
template <typename W>
inline int64_t dot_index(int64_t i, int64_t K) {
  if (!std::is_same<W, BFloat16>::value || i >= K - K % kDotStep) return i;
  const int64_t r = i % kDotStep;
  return i - r + (r & 1) * kVecF + (r >> 1);
}

// dst (K) = src (K) in W's dot layout.
template <typename W>
inline void to_dot_layout(const float* src, float* dst, int64_t K) {
  for (int64_t i = 0; i < K; ++i) dst[dot_index<W>(i, K)] = src[i];
}

// Two fp32 vectors of the weight elements k .. k + kDotStep, in dot layout.
inline std::tuple<fVec, fVec> load_pair(const BFloat16* w) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(w));
  return {fVec(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16))),
          fVec(_mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xFFFF0000))))};
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return {fVec(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16))),
          fVec(_mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000))))};
#else
  alignas(64) float even[kVecF], odd[kVecF];
  for (int64_t i = 0; i < kVecF; ++i) {
    even[i] = static_cast<float>(w[2 * i]);
    odd[i] = static_cast<float>(w[2 * i + 1]);
  }
  return {fVec::loadu(even), fVec::loadu(odd)};
#endif
}
inline std::tuple<fVec, fVec> load_pair(const float* w) {
  return {fVec::loadu(w), fVec::loadu(w + kVecF)};
}

// dots[nb][m] = sum_k x[m * ldx + k] * w[nb * ldw + k], k < K, with x in W's dot layout.
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
      float s = hsum(acc[nb][m]);
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
