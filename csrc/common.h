// Shared helpers for the vllm_hybrid_neuron CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace vhn {

using at::BFloat16;
using fVec = at::vec::Vectorized<float>;
constexpr int64_t kVecF = fVec::size();

// Cheap float view of a small tensor of any float dtype: resolve the data pointer once
// (Tensor::data_ptr() has checks that are far too slow for inner loops).
struct FAcc {
  const void* p = nullptr;
  at::ScalarType st = at::kFloat;
  FAcc() = default;
  explicit FAcc(const at::Tensor& t) : p(t.const_data_ptr()), st(t.scalar_type()) {}
  explicit FAcc(const c10::optional<at::Tensor>& t) {
    if (t.has_value()) { p = t->const_data_ptr(); st = t->scalar_type(); }
  }
  inline float operator()(int64_t off) const {
    if (st == at::kFloat) return static_cast<const float*>(p)[off];
    if (st == at::kBFloat16) return static_cast<float>(static_cast<const BFloat16*>(p)[off]);
    if (st == at::kHalf) return static_cast<float>(static_cast<const at::Half*>(p)[off]);
    return static_cast<float>(static_cast<const double*>(p)[off]);
  }
};

// Read an integer index tensor element (int32 or int64).
inline int64_t geti(const at::Tensor& t, int64_t offset) {
  if (t.scalar_type() == at::kInt) return t.const_data_ptr<int32_t>()[offset];
  if (t.scalar_type() == at::kLong) return t.const_data_ptr<int64_t>()[offset];
  if (t.scalar_type() == at::kBool) return t.const_data_ptr<bool>()[offset] ? 1 : 0;
  TORCH_CHECK(false, "vllm_hybrid_neuron: index tensors must be int32/int64/bool");
}

// Tokens per sequence in one speculative verification step (1 + drafts) the recurrent kernels
// take; their per-token buffers are sized by it.
constexpr int64_t kMaxTok = 16;

// Vector load of `cnt` (<= kVecF) elements converted to float; tail lanes are 0.
inline fVec vload(const float* p, int64_t cnt) {
  return cnt == kVecF ? fVec::loadu(p) : fVec::loadu(p, cnt);
}
inline fVec vload(const BFloat16* p, int64_t cnt) {
  if (cnt == kVecF) {
    fVec out;
    at::vec::load_to_float<BFloat16>(p, out);
    return out;
  }
  alignas(64) float tmp[kVecF] = {0};
  for (int64_t i = 0; i < cnt; ++i) tmp[i] = static_cast<float>(p[i]);
  return fVec::loadu(tmp);
}

inline void vstore(float* p, const fVec& v, int64_t cnt) {
  if (cnt == kVecF) v.store(p); else v.store(p, cnt);
}
// Rounded to nearest even as c10::BFloat16 rounds (at::vec's own fp32 -> bf16 conversion, one
// vector at a time: convert_from_float(v, v) converted and packed both halves of a pair).
inline void vstore(BFloat16* p, const fVec& v, int64_t cnt) {
  if (cnt == kVecF) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
#elif defined(CPU_CAPABILITY_AVX2)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
#else
    at::vec::convert_from_float<BFloat16>(v, v).store(p, kVecF);
#endif
    return;
  }
  alignas(64) float tmp[kVecF];
  v.store(tmp);
  for (int64_t i = 0; i < cnt; ++i) p[i] = BFloat16(tmp[i]);
}

// v rounded to S's precision, as storing it to an S slot and loading it back gives (identity
// for float). A recurrent state that plain decode stores in S after every token is rounded so
// between the tokens of a speculative verification step too: both then compute bit for bit
// the same state, and speculation cannot move a greedy token.
template <typename S>
inline fVec rounded(const fVec& v) { return v; }
template <>
inline fVec rounded<BFloat16>(const fVec& v) {
  return std::get<0>(at::vec::convert_to_float<BFloat16>(at::vec::convert_from_float<BFloat16>(v, v)));
}

template <typename T>
inline float tof(T v) { return static_cast<float>(v); }

// Sum of a vector's lanes.
inline float hsum(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, v);
}

inline float softplus(float x) { return x <= 20.f ? std::log1p(std::exp(x)) : x; }
inline float silu(float x) { return x / (1.f + std::exp(-x)); }

// f(integral_constant<int, n>) for 1 <= n <= G.
template <int G, typename F>
inline void with_count(int64_t n, const F& f) {
  if constexpr (G > 1) {
    if (n < G) return with_count<G - 1>(n, f);
  }
  f(std::integral_constant<int, G>{});
}

// For each group of up to G of n rows, from row t0: dot(t0, M tag, acc) fills V acc[R][M] (R
// values for each of the group's M rows), then emit(t0 + m, the R values of row t0 + m).
template <int G, typename V, int R, typename Dot, typename Emit>
inline void in_row_groups(int64_t n, const Dot& dot, const Emit& emit) {
  for (int64_t t0 = 0; t0 < n; t0 += G) {
    with_count<G>(std::min<int64_t>(G, n - t0), [&](auto m_tag) {
      constexpr int M = decltype(m_tag)::value;
      V acc[R][M];
      dot(t0, m_tag, acc);
      for (int m = 0; m < M; ++m) {
        V row[R];
        for (int r = 0; r < R; ++r) row[r] = acc[r][m];
        emit(t0 + m, row);
      }
    });
  }
}

// Dispatch on float / bfloat16 for an activation or state tensor.
#define VHN_DISPATCH_FB(DT, NAME, ...)                                   \
  [&] {                                                                  \
    if ((DT) == at::kFloat) {                                            \
      using NAME = float;                                                \
      return __VA_ARGS__();                                              \
    } else if ((DT) == at::kBFloat16) {                                  \
      using NAME = at::BFloat16;                                         \
      return __VA_ARGS__();                                              \
    }                                                                    \
    TORCH_CHECK(false, "vllm_hybrid_neuron: expected float32 or bfloat16, got ", DT); \
  }()

}  // namespace vhn
