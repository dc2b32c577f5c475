// moe_experts' kernels for bf16 weights on CPUs with AVX512-BF16 (VDPBF16PS), in the "pair"
// layout: outputs across the vector lanes, two k per 32-bit lane, so one VDPBF16PS adds
// x[k] w[k][n] + x[k+1] w[k+1][n] for 16 output columns n at once and no horizontal sum is
// ever needed (the panel kernel of moe_experts.cpp sums each (row, token) accumulator's lanes
// at the end: ~15% of its time at K = 1536). A token's k-pair (two bf16, 32 bits) is broadcast.
//
// Layout (3-D, as vLLM's MoE kernel interface requires of expert weights; zero padded):
//   Ip = I rounded up to 32, Kp = K rounded up to 32, Kq = K rounded up to 64;
//   w13v (E, Ip/32, [Kp/2, 2, 32, 2]): tile q = intermediates 32q .. 32q+31; per k-pair i the
//        32 gate columns' (k = 2i, 2i+1) pairs, then the 32 up columns' - 256 contiguous bytes;
//   w2v  (E, Kq/64, [Ip/2, 64, 2]):    tile q = outputs 64q .. 64q+63, per k-pair i the same.
// A tile is kTileVecs column vectors; a work item (expert, tile) streams its tile once for all
// the expert's tokens, kPairTokens at a time (4 x 6 accumulators + 4 weight vectors + one
// broadcast of the 32 registers). A token's sums run over k-pairs in order: the result depends
// only on K and I, never on the other tokens in the call.
#pragma once

#if defined(VHN_AVX512BF16)

#include "common.h"

#include <immintrin.h>

#include <cstring>

namespace vhn {
namespace pairs {

constexpr int kTileVecs = 4;            // column vectors per tile
constexpr int64_t kLanes = 16;          // fp32 lanes: columns per vector
constexpr int64_t kTileCols = kTileVecs * kLanes;  // 64 columns (w2v); w13v: 32 gate + 32 up
constexpr int kPairTokens = 6;          // bf16 tokens per tile pass
constexpr int kPairTokensF32 = 3;       // fp32 tokens per tile pass (widened weights)
constexpr int64_t kPadI = 32, kPadK = 32, kPadOut = 64;

inline __m512 bcast_pair(const BFloat16* x) {
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  return _mm512_castsi512_ps(_mm512_set1_epi32(v));
}

// acc[v][m] = sum over k-pairs i < pairs of x_m[2i, 2i+1] . tile[i][v]; x_m bf16, natural
// order, at least 2 * pairs elements.
template <int M>
inline void tile_dot(const BFloat16* const* x, const BFloat16* tile, int64_t pairs,
                     __m512 acc[kTileVecs][M]) {
  for (int v = 0; v < kTileVecs; ++v)
    for (int m = 0; m < M; ++m) acc[v][m] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    const BFloat16* t = tile + i * kTileVecs * 2 * kLanes;
    __m512 w[kTileVecs];
    for (int v = 0; v < kTileVecs; ++v)
      w[v] = _mm512_castsi512_ps(_mm512_loadu_si512(reinterpret_cast<const void*>(t + v * 2 * kLanes)));
    for (int m = 0; m < M; ++m) {
      const __m512 xv = bcast_pair(x[m] + 2 * i);
      for (int v = 0; v < kTileVecs; ++v)
        acc[v][m] = _mm512_dpbf16_ps(acc[v][m], (__m512bh)xv, (__m512bh)w[v]);
    }
  }
}

// The same for fp32 tokens: each weight vector widened to its even-k and odd-k halves, two
// FMAs per (vector, token) and k-pair (k = 2i first).
template <int M>
inline void tile_dot(const float* const* x, const BFloat16* tile, int64_t pairs,
                     __m512 acc[kTileVecs][M]) {
  for (int v = 0; v < kTileVecs; ++v)
    for (int m = 0; m < M; ++m) acc[v][m] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t i = 0; i < pairs; ++i) {
    const BFloat16* t = tile + i * kTileVecs * 2 * kLanes;
    __m512 we[kTileVecs], wo[kTileVecs];
    for (int v = 0; v < kTileVecs; ++v) {
      const __m512i w = _mm512_loadu_si512(reinterpret_cast<const void*>(t + v * 2 * kLanes));
      we[v] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      wo[v] = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
    }
    for (int m = 0; m < M; ++m) {
      const __m512 x0 = _mm512_set1_ps(x[m][2 * i]), x1 = _mm512_set1_ps(x[m][2 * i + 1]);
      for (int v = 0; v < kTileVecs; ++v)
        acc[v][m] = _mm512_fmadd_ps(x1, wo[v], _mm512_fmadd_ps(x0, we[v], acc[v][m]));
    }
  }
}

template <typename T>
constexpr int kTokens = std::is_same<T, BFloat16>::value ? kPairTokens : kPairTokensF32;

// For each group of tokens rows[0 .. n): emit(row index, acc[kTileVecs] of that row).
template <typename T, typename Emit>
inline void tile_all_rows(const T* const* rows, int64_t n, const BFloat16* tile, int64_t pairs,
                          const Emit& emit) {
  in_row_groups<kTokens<T>, __m512, kTileVecs>(n, [&](int64_t t0, auto m_tag, auto& acc) {
    tile_dot<decltype(m_tag)::value>(rows + t0, tile, pairs, acc);
  }, emit);
}

}  // namespace pairs
}  // namespace vhn

#endif  // VHN_AVX512BF16
