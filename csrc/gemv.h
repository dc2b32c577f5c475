// The dot layout and weight loads of moe_experts' panel kernel: fp32 input rows stored in the
// order a bf16 k-step widens to (below), bf16 or fp32 weights, fp32 accumulation.
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

// Half H of load_pair(w) alone: H = 0 the even-indexed (bf16) / first kVecF (fp32) elements
// of the k-step, H = 1 the odd-indexed / second.
template <int H>
inline fVec load_half(const BFloat16* w) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(w));
  return fVec(_mm512_castsi512_ps(H == 0 ? _mm512_slli_epi32(v, 16)
                                         : _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF0000))));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return fVec(_mm256_castsi256_ps(H == 0 ? _mm256_slli_epi32(v, 16)
                                         : _mm256_and_si256(v, _mm256_set1_epi32(0xFFFF0000))));
#else
  return std::get<H>(load_pair(w));
#endif
}
template <int H>
inline fVec load_half(const float* w) { return fVec::loadu(w + H * kVecF); }

}  // namespace vhn
