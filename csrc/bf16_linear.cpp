// bf16 linear for CPUs without AMX: out (..., N) = x (..., K) @ weight^T + b.
//
// Why: without AVX512-BF16 vLLM's oneDNN bf16 matmul cannot be created and vLLM falls back to
// torch's linear, whose bf16 path is slow at every size on such CPUs (benchmarks/bench_linear.py:
// at M = 4 rows it re-reads the weight per row, 19% of the read-bandwidth floor; at M = 1024
// it runs at ~7 GFLOP/s). With AVX512-BF16 but no AMX (Zen 4) oneDNN's bf16 matmul works but
// streams a decode-sized weight at 56-79% of the read bandwidth (M = 1), where this op's
// streamed kernel reaches 85-95%. Regimes, all with fp32 accumulation:
//  - M <= kStreamRows (decode, small batches, speculative verification): each thread streams
//    its own contiguous block of weight rows once; NB weight rows at a time, every input row
//    is multiplied with them, in register blocks of up to 4 input rows (above 4 rows the NB
//    weight rows are re-read from L1 for each block), so each loaded weight vector serves up
//    to 4 input rows and each input vector NB weight rows. Without AVX512-BF16, x is
//    converted to fp32 once and each k-step widens one fp32 vector of each weight row (kVecF
//    bf16 in natural order): a 4 x 3 block is 12 accumulators + 3 weight vectors + 1 input
//    vector, the 16 AVX2 registers, and ran 1.6-2x the FMA rate of the two-vectors-per-row
//    (even / odd) 4 x 2 block it replaced (in-cache microbenchmark, Zen 3). With AVX512-BF16,
//    x stays bf16 and each k-step is one VDPBF16PS per (weight row, input row);
//  - larger M (prefill): without AVX512-BF16, blocks of weight rows converted to fp32 and
//    multiplied with fp32 GEMM (at::mm), so no full fp32 copy of the weight is ever held; with
//    it, at::linear (ATen's oneDNN bf16 GEMM).
// fp32 (or other) weights go to at::linear.
#include "common.h"

#include <string>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace vhn {
namespace {

constexpr int64_t kMaxM = 4;  // input rows per register block

// kVecF bf16 weights widened to one fp32 vector, in natural order.
inline fVec load_widened(const BFloat16* w) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  return fVec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return fVec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16)));
#else
  alignas(64) float tmp[kVecF];
  for (int64_t i = 0; i < kVecF; ++i) tmp[i] = static_cast<float>(w[i]);
  return fVec::loadu(tmp);
#endif
}

// Bring the cache line at p towards L2 (a hint: no fault, whatever the address).
inline void prefetch_l2(const BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
#endif
}
constexpr int64_t kLineElems = 64 / sizeof(BFloat16);  // bf16 weights per 64-byte cache line

// dots[nb][m] = sum_k x[m * K + k] * w[nb * K + k]: lane j of one accumulator sums elements
// j, j + kVecF, ... of the full k-steps, then the lanes are summed and the tail added in order.
// The order depends only on K, so a row's result does not depend on M, NB or the batch.
//
// While it streams its NB rows, it prefetches the next NB rows (the next block) at the same
// offset: each row is one short stream (3 KB at K = 1536) that the hardware prefetcher only
// ramps up on after its first misses, and memory-level parallelism is what limits a core
// here. On the Zen 3 machine (2 threads, weights cycled past the caches, old and new builds
// alternated) it took M = 1 from 9.7-12.8 to 12.8-14.9 GB/s on Granite's in_proj / out_proj /
// LM head, M = 4 in_proj from 7.6-8.2 to 9.5-10.0 GB/s (README, bf16_linear); prefetching
// within the row, or two blocks ahead, gained less or lost.
template <int M, int NB>
inline void dot_rows(const float* x, int64_t K, const BFloat16* w, float dots[NB][M]) {
  fVec acc[NB][M];
  for (int nb = 0; nb < NB; ++nb)
    for (int m = 0; m < M; ++m) acc[nb][m] = fVec(0.f);
  const BFloat16* next = w + NB * K;  // the next block's rows
  int64_t k = 0;
  for (; k + kVecF <= K; k += kVecF) {
    if (k % kLineElems == 0)
      for (int nb = 0; nb < NB; ++nb) prefetch_l2(next + nb * K + k);
    fVec wv[NB];  // this k-step of NB weight rows, fp32
    for (int nb = 0; nb < NB; ++nb) wv[nb] = load_widened(w + nb * K + k);
    for (int m = 0; m < M; ++m) {
      const fVec xv = fVec::loadu(x + m * K + k);
      for (int nb = 0; nb < NB; ++nb) acc[nb][m] = at::vec::fmadd(xv, wv[nb], acc[nb][m]);
    }
  }
  for (int nb = 0; nb < NB; ++nb)
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[nb][m]);
      for (int64_t kk = k; kk < K; ++kk) s += x[m * K + kk] * static_cast<float>(w[nb * K + kk]);
      dots[nb][m] = s;
    }
}

#if defined(VHN_AVX512BF16)
// The same dots on CPUs with AVX512-BF16, with x in bf16 (the layer's input, so exact): one
// k-step is 32 elements, and VDPBF16PS adds x[2i] w[2i] + x[2i+1] w[2i+1] into fp32 lane i
// (products exact in fp32, fp32 sums), so a loaded weight vector is 32 multiply-adds with no
// widening. The sum order depends only on K, as above. At 4 and 8 rows the fp32 kernel above
// is compute bound on AVX-512 (66-82 GFLOP/s on Zen 4, 2 threads, README bf16_linear); this
// one streams the weight at the read bandwidth there.
constexpr int64_t kStepBh = 32;  // bf16 elements per k-step
inline __m512 dp_bf16(__m512 acc, __m512i x, __m512i w) {
  return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
}

template <int M, int NB>
inline void dot_rows(const BFloat16* x, int64_t K, const BFloat16* w, float dots[NB][M]) {
  __m512 acc[NB][M];
  for (int nb = 0; nb < NB; ++nb)
    for (int m = 0; m < M; ++m) acc[nb][m] = _mm512_setzero_ps();
  const BFloat16* next = w + NB * K;  // the next block's rows, prefetched as above
  int64_t k = 0;
  for (; k + kStepBh <= K; k += kStepBh) {  // one 64-byte line of each row per k-step
    for (int nb = 0; nb < NB; ++nb) prefetch_l2(next + nb * K + k);
    __m512i wv[NB];
    for (int nb = 0; nb < NB; ++nb)
      wv[nb] = _mm512_loadu_si512(reinterpret_cast<const void*>(w + nb * K + k));
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(x + m * K + k));
      for (int nb = 0; nb < NB; ++nb) acc[nb][m] = dp_bf16(acc[nb][m], xv, wv[nb]);
    }
  }
  for (int nb = 0; nb < NB; ++nb)
    for (int m = 0; m < M; ++m) {
      float s = _mm512_reduce_add_ps(acc[nb][m]);
      for (int64_t kk = k; kk < K; ++kk)
        s += static_cast<float>(x[m * K + kk]) * static_cast<float>(w[nb * K + kk]);
      dots[nb][m] = s;
    }
}
#endif

// Weight rows per block for M input rows, X the input type (float: the widening kernel,
// M * NB accumulators + NB weight vectors + 1 input vector within 16 AVX2 registers, measured
// best per M in the same microbenchmark; BFloat16: the AVX512-BF16 kernel, at most 16
// accumulators + 4 weight vectors + 1 input vector of its 32 registers, at the read bandwidth
// up to 8 rows on Zen 4).
template <typename X, int M>
constexpr int rows_per_block() {
  if (std::is_same<X, BFloat16>::value) return 4;
  return M == 1 ? 4 : (M == 2 ? 4 : 3);
}

template <typename X, int M, int NB>
void rows_block(const X* x, int64_t K, const BFloat16* w, int64_t n0, const float* bias,
                BFloat16* out, int64_t N) {
  float dots[NB][M];
  dot_rows<M, NB>(x, K, w + n0 * K, dots);
  for (int nb = 0; nb < NB; ++nb)
    for (int m = 0; m < M; ++m)
      out[m * N + n0 + nb] = BFloat16(bias ? dots[nb][m] + bias[n0 + nb] : dots[nb][m]);
}

template <typename X, int M>
void gemv_rows(const X* x, int64_t K, const BFloat16* w, int64_t N, const float* bias,
               BFloat16* out) {
  constexpr int NB = rows_per_block<X, M>();
  const int64_t blocks = N / NB;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows_block<X, M, NB>(x, K, w, b * NB, bias, out, N);
  });
  for (int64_t n = blocks * NB; n < N; ++n) rows_block<X, M, 1>(x, K, w, n, bias, out, N);
}

// Output rows [0, M) for weight rows n0 .. n0 + NB: the input rows in register blocks of
// kMaxM (the last one M % kMaxM rows), each over the same NB weight rows, which the first
// block brings into L1 and the others re-read from there.
template <typename X, int NB>
void row_groups(const X* x, int64_t M, int64_t K, const BFloat16* w, int64_t n0,
                const float* bias, BFloat16* out, int64_t N) {
  int64_t m0 = 0;
  for (; m0 + kMaxM <= M; m0 += kMaxM)
    rows_block<X, kMaxM, NB>(x + m0 * K, K, w, n0, bias, out + m0 * N, N);
  switch (M - m0) {
    case 1: rows_block<X, 1, NB>(x + m0 * K, K, w, n0, bias, out + m0 * N, N); break;
    case 2: rows_block<X, 2, NB>(x + m0 * K, K, w, n0, bias, out + m0 * N, N); break;
    case 3: rows_block<X, 3, NB>(x + m0 * K, K, w, n0, bias, out + m0 * N, N); break;
    default: break;
  }
}

// out[:, n] for all M <= kStreamRows rows of x (M, K), streaming the weight from memory once.
template <typename X>
void gemv(const X* x, int64_t M, int64_t K, const BFloat16* w, int64_t N, const float* bias,
          BFloat16* out) {
  switch (M) {
    case 1: return gemv_rows<X, 1>(x, K, w, N, bias, out);
    case 2: return gemv_rows<X, 2>(x, K, w, N, bias, out);
    case 3: return gemv_rows<X, 3>(x, K, w, N, bias, out);
    case 4: return gemv_rows<X, 4>(x, K, w, N, bias, out);
    default: break;
  }
  constexpr int NB = rows_per_block<X, kMaxM>();
  const int64_t blocks = N / NB;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) row_groups<X, NB>(x, M, K, w, b * NB, bias, out, N);
  });
  for (int64_t n = blocks * NB; n < N; ++n) row_groups<X, 1>(x, M, K, w, n, bias, out, N);
}

// Above this, blocked fp32 GEMM. Streaming stays faster up to 64 rows on the Zen 3 machine
// (2 threads, 6448 x 1536 / 1536 x 3072: 25 rows 5.8 / 3.7 ms streamed vs 25.3 / 7.6 ms on the
// GEMM path, 64 rows 13.4 / 8.0 vs 30.1 / 9.8 ms; from 128 rows they are even).
constexpr int64_t kStreamRows = 64;
// With AVX512-BF16 the streamed kernel is compute bound from 16 rows (~350 GFLOP/s, 2 threads,
// Zen 4) and ATen's oneDNN bf16 GEMM is level with it at 24 rows and 0.88-0.94x faster at 32-48
// (Granite's in_proj / out_proj, Qwen3.5's in_proj_qkvz / LM head); the switch stays at 64
// rows there too, so that a row's bits do not depend on the batch up to 64 rows (speculative
// verification of up to 16 sequences x 4 tokens equals their plain decode steps).
constexpr int64_t kGemmBlockBytes = 8 << 20;  // fp32 bytes of one converted weight block

#if !defined(VHN_AVX512BF16)
// out = x32 @ weight^T (+ bias) with weight-row blocks converted to fp32 one at a time.
void blocked_fp32_gemm(const at::Tensor& x32, const at::Tensor& weight, const at::Tensor& b32,
                       at::Tensor& out) {
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t block = std::max<int64_t>(64, kGemmBlockBytes / (4 * K));
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t nb = std::min(block, N - n0);
    const at::Tensor w32 = weight.narrow(0, n0, nb).to(at::kFloat);  // (nb, K)
    at::Tensor part = b32.defined() ? at::addmm(b32.narrow(0, n0, nb), x32, w32.t())
                                    : at::mm(x32, w32.t());  // (M, nb) fp32
    out.narrow(1, n0, nb).copy_(part);
  }
}
#endif

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && x.size(-1) == weight.size(1),
              "bf16_linear: x (..., K) and weight (N, K) expected");
  const int64_t K = weight.size(1), N = weight.size(0);
  const int64_t M = x.numel() / K;
  if (x.scalar_type() != at::kBFloat16 || weight.scalar_type() != at::kBFloat16 || M == 0)
    return at::linear(x, weight, bias);
  at::NoGradGuard no_grad;
  const at::Tensor w = weight.contiguous();
  const float* b32p = nullptr;
  at::Tensor b32;
  if (bias.has_value()) {
    b32 = bias->to(at::kFloat).contiguous();
    b32p = b32.const_data_ptr<float>();
  }
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor out = at::empty({M, N}, x.options());
  const BFloat16* wp = w.const_data_ptr<BFloat16>();
  BFloat16* op = out.data_ptr<BFloat16>();
#if defined(VHN_AVX512BF16)
  // AVX512-BF16: ATen's bf16 linear (oneDNN) reaches the bf16 GEMM rate at prefill sizes.
  if (M > kStreamRows || K < kStepBh) return at::linear(x, weight, bias);
  const at::Tensor xb = x.reshape({M, K}).contiguous();  // (M, K) bf16
  gemv(xb.const_data_ptr<BFloat16>(), M, K, wp, N, b32p, op);
#else
  const at::Tensor x32 = x.reshape({M, K}).to(at::kFloat).contiguous();  // (M, K) fp32
  if (M <= kStreamRows && K >= kVecF)
    gemv(x32.const_data_ptr<float>(), M, K, wp, N, b32p, op);
  else
    blocked_fp32_gemm(x32, w, b32, out);
#endif
  return out.view(sizes);  // (..., N)
}

}  // namespace

// The dot kernel this build's bf16_linear streams with.
std::string bf16_linear_isa() {
#if defined(VHN_AVX512BF16)
  return "avx512_bf16";
#elif defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
}

// No tensor arguments: defined here with its one (catch-all) kernel, as moe_pack_step.
TORCH_LIBRARY_FRAGMENT(vllm_hybrid_neuron, m) {
  m.def("bf16_linear_isa() -> str", &bf16_linear_isa);
}

}  // namespace vhn
