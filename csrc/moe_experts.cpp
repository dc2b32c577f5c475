// Routed experts of an MoE block on weights packed once at load (ops/moe.py: pack_moe_weights):
//   out (M, K) = sum_j topk_weights[t, j] * expert_{ids[t, j]}(x[t]),
//   expert_e(x) = (act(x @ gate_e^T) * (x @ up_e^T)) @ down_e^T.
//
// Why packed: a decode step reads each routed expert's weights once, so the op is a weight
// stream. In vLLM's (E, 2I, K) layout a block of rows is several page-sized streams; packed, a
// work item's weights are one contiguous stream the hardware prefetcher follows to the end.
//
// Packed layout, S = kDotStep (elements per k-step of the dot kernel, 16 on AVX2, 32 on AVX-512),
// Ip = I rounded up to S, Kp = K rounded up to S, zero padding everywhere (3-D, as vLLM's MoE
// kernel interface requires; the last dim is a panel):
//   w13p (E, Ip/2, [Kp/S, 4, S]): panel p holds rows [gate 2p, gate 2p+1, up 2p, up 2p+1],
//                                 k-step-major (the 4 rows' S elements of one k-step adjacent);
//   w2p  (E, ceil(K/4), [Ip/S, 4, S]): panel p holds down rows 4p .. 4p+3 the same way.
// A gate/up panel yields two activations act(g) * u directly; a down panel four outputs.
//
//  1. the (token, j) slots are sorted by expert (counting sort, token order kept within an expert);
//     each token's row is converted once to fp32 in W's dot layout (gemv.h), zero padded to Kp;
//  2. gate+up and the activation: work items (expert, block of panels); an item streams each
//     panel once for all the expert's tokens (3 at a time; the panel stays in L1 between groups);
//  3. down projection: work items (expert, block of panels), the same way;
//  4. each token's top-k rows are summed in top-k order with its routing weights.
// Items are taken dynamically by the threads: an expert's columns are split between them, so
// both cores stream at M = 1. fp32 accumulation; the intermediate act(g) * u is rounded to the
// tokens' dtype T (as transformers' MLP rounds it; held as fp32, or as bf16 where both stages
// run on VDPBF16PS: below); a token's result does not
// depend on the other tokens in the call (the accumulation order depends only on K and I).
#include "gemv.h"

#include <atomic>
#include <type_traits>
#include <vector>

namespace vhn {
namespace {

constexpr int kPanelRows = 4;   // weight rows per panel
constexpr int kTokenGroup = 3;  // tokens per panel pass: 4 x 3 accumulators fit 16 AVX2 registers
constexpr int64_t kUpPanels = 8;     // gate/up panels per work item (16 activations)
constexpr int64_t kDownPanels = 16;  // down panels per work item (64 outputs)

enum Activation : int64_t { kSilu = 0, kGeluTanh = 1, kGelu = 2 };

inline float activate(float g, int64_t act) {
  if (act == kSilu) return g / (1.f + std::exp(-g));
  if (act == kGeluTanh) {
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.f + std::tanh(inner));
  }
  return 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f));
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Run item(i) for i in [0, n) on all threads, each taking the next free item.
template <typename F>
void for_each_item(int64_t n, const F& item) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) item(i);
  });
}

// dots[r][m] = x_m . panel row r over `steps` k-steps; x_m (steps * S floats) in W's dot layout.
// Each k-step is two halves (load_half: the even / odd elements of a bf16 k-step); per half the
// M tokens' x vectors are loaded once and each weight row's vector serves all M of them: a
// 4-row x 3-token block is 12 accumulators + 3 x vectors + 1 weight vector (the 16 AVX2
// registers), 7 loads per 12 FMAs. Until 2026-12-07 x was reloaded for every weight row (up to
// 28 loads per 24 FMAs) and M = 1 kept a second accumulator chain, which made a token's fp32
// result depend on how many tokens shared its expert. One chain per (row, token) now, summed
// even half then odd half, k-step by k-step, at every M.
template <int M, typename W>
inline void panel_dot(const float* const* x, const W* panel, int64_t steps,
                      float dots[kPanelRows][M]) {
  fVec acc[kPanelRows][M];
  for (int r = 0; r < kPanelRows; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = fVec(0.f);
  for (int64_t s = 0; s < steps; ++s) {
    const W* ps = panel + s * kPanelRows * kDotStep;
    const int64_t k = s * kDotStep;
    fVec xv[M];
    for (int m = 0; m < M; ++m) xv[m] = fVec::loadu(x[m] + k);  // even half
    for (int r = 0; r < kPanelRows; ++r) {
      const fVec wv = load_half<0>(ps + r * kDotStep);
      for (int m = 0; m < M; ++m) acc[r][m] = at::vec::fmadd(xv[m], wv, acc[r][m]);
    }
    for (int m = 0; m < M; ++m) xv[m] = fVec::loadu(x[m] + k + kVecF);  // odd half
    for (int r = 0; r < kPanelRows; ++r) {
      const fVec wv = load_half<1>(ps + r * kDotStep);
      for (int m = 0; m < M; ++m) acc[r][m] = at::vec::fmadd(xv[m], wv, acc[r][m]);
    }
  }
  for (int r = 0; r < kPanelRows; ++r)
    for (int m = 0; m < M; ++m) dots[r][m] = hsum(acc[r][m]);
}

// f(integral_constant<int, n>) for 1 <= n <= G.
template <int G, typename F>
inline void with_count(int64_t n, const F& f) {
  if constexpr (G > 1) {
    if (n < G) return with_count<G - 1>(n, f);
  }
  f(std::integral_constant<int, G>{});
}

// For each group of up to G of `rows` tokens from t0: dot(t0, M tag, dots[kPanelRows][M]),
// then emit(row, the row's kPanelRows dots).
template <int G, typename Dot, typename Emit>
inline void in_token_groups(int64_t rows, const Dot& dot, const Emit& emit) {
  for (int64_t t0 = 0; t0 < rows; t0 += G) {
    with_count<G>(std::min<int64_t>(G, rows - t0), [&](auto m_tag) {
      constexpr int M = decltype(m_tag)::value;
      float dots[kPanelRows][M];
      dot(t0, m_tag, dots);
      for (int m = 0; m < M; ++m) {
        float d[kPanelRows];
        for (int r = 0; r < kPanelRows; ++r) d[r] = dots[r][m];
        emit(t0 + m, d);
      }
    });
  }
}

// emit(row, dots) for the `rows` inputs xs[0 .. rows), kTokenGroup at a time.
template <typename W, typename Emit>
inline void panel_all_rows(const float* const* xs, int64_t rows, const W* panel, int64_t steps,
                           const Emit& emit) {
  in_token_groups<kTokenGroup>(rows, [&](int64_t t0, auto m_tag, auto& dots) {
    panel_dot<decltype(m_tag)::value>(xs + t0, panel, steps, dots);
  }, emit);
}

#if defined(VHN_AVX512BF16)
// The gate/up stage on CPUs with AVX512-BF16, for bf16 tokens and weights: x_m as bf16 in
// natural order (zero padded to Kp), and each k-step of a panel row (S = 32 bf16, natural
// order) one VDPBF16PS per token - lane i adds x[2i] w[2i] + x[2i+1] w[2i+1] (products exact
// in fp32, fp32 sums) - so no weight is widened and 6 tokens share each loaded weight vector
// (24 accumulators + 4 weight vectors + 1 input vector of the 32 registers). The widening
// kernel above is compute bound from ~16 tokens per expert on Zen 4 (0.73-0.9x vLLM's "vec"
// kernel there, README). The order of a row's sums depends only on K.
constexpr int kTokenGroupBh = 6;

template <int M>
inline void panel_dot_bh(const BFloat16* const* x, const BFloat16* panel, int64_t steps,
                         float dots[kPanelRows][M]) {
  __m512 acc[kPanelRows][M];
  for (int r = 0; r < kPanelRows; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t s = 0; s < steps; ++s) {
    const BFloat16* ps = panel + s * kPanelRows * kDotStep;
    __m512i wv[kPanelRows];
    for (int r = 0; r < kPanelRows; ++r)
      wv[r] = _mm512_loadu_si512(reinterpret_cast<const void*>(ps + r * kDotStep));
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(x[m] + s * kDotStep));
      for (int r = 0; r < kPanelRows; ++r)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
  for (int r = 0; r < kPanelRows; ++r)
    for (int m = 0; m < M; ++m) dots[r][m] = _mm512_reduce_add_ps(acc[r][m]);
}

template <typename Emit>
inline void panel_all_rows_bh(const BFloat16* const* xs, int64_t rows, const BFloat16* panel,
                              int64_t steps, const Emit& emit) {
  in_token_groups<kTokenGroupBh>(rows, [&](int64_t t0, auto m_tag, auto& dots) {
    panel_dot_bh<decltype(m_tag)::value>(xs + t0, panel, steps, dots);
  }, emit);
}
#endif

// The gate/up stage's kernel: VDPBF16PS on bf16 tokens where this build has it
// (T = W = BFloat16), the widening kernel otherwise.
template <typename T, typename W>
constexpr bool kUpOnBf16Dots =
#if defined(VHN_AVX512BF16)
    std::is_same<T, BFloat16>::value && std::is_same<W, BFloat16>::value;
#else
    false;
#endif

template <typename T, typename W>
void moe_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13p, const at::Tensor& w2p,
              const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t I, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), E = w13p.size(0);
  const int64_t Ip = round_up(I, kDotStep), Kp = round_up(K, kDotStep);
  const int64_t up_panels = Ip / 2, down_panels = w2p.size(1);
  const int64_t topk = topk_ids.size(1), S = M * topk;
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor rw = topk_weights.to(at::kFloat).contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  const float* rwp = rw.const_data_ptr<float>();

  // 1. Counting sort of the (token, j) slots by expert; token rows in the dot layout.
  std::vector<int64_t> start(E + 1, 0), pos(S);
  std::vector<const float*> slot_x(S);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(idp[s] >= 0 && idp[s] < E, "moe_experts: topk_ids entry ", idp[s],
                " is outside [0, ", E, ")");
    ++start[idp[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xp = x32.const_data_ptr<float>();
  std::vector<float> xd(M * Kp, 0.f);  // (M, Kp) in W's dot layout
  for (int64_t t = 0; t < M; ++t)
    for (int64_t k = 0; k < K; ++k) xd[t * Kp + dot_index<W>(k, Kp)] = xp[t * K + k];
  // With kUpOnBf16Dots, the gate/up stage reads the tokens as bf16 (M, Kp), natural order.
  std::vector<BFloat16> xb(kUpOnBf16Dots<T, W> ? M * Kp : 0, BFloat16(0.f));
  std::vector<const BFloat16*> slot_xb(kUpOnBf16Dots<T, W> ? S : 0);
  const at::Tensor xc = x.contiguous();  // (M, K) T
  if (kUpOnBf16Dots<T, W>) {
    const BFloat16* xs = reinterpret_cast<const BFloat16*>(xc.const_data_ptr());
    for (int64_t t = 0; t < M; ++t) std::copy(xs + t * K, xs + (t + 1) * K, xb.data() + t * Kp);
  }
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < S; ++s) {
      pos[s] = fill[idp[s]]++;
      slot_x[pos[s]] = xd.data() + (s / topk) * Kp;
      if (kUpOnBf16Dots<T, W>) slot_xb[pos[s]] = xb.data() + (s / topk) * Kp;
    }
  }
  // Activations (S, Ip) in W's dot layout, expert outputs (S, K), both in sorted slot order;
  // with kUpOnBf16Dots the activations as bf16 (S, Ip) in natural order (zero padded) instead.
  constexpr bool bh = kUpOnBf16Dots<T, W>;
  std::vector<float> a(bh ? 0 : S * Ip), y(S * K);
  std::vector<BFloat16> ab(bh ? S * Ip : 0, BFloat16(0.f));
  std::vector<const float*> slot_a(bh ? 0 : S);
  std::vector<const BFloat16*> slot_ab(bh ? S : 0);
  for (int64_t r = 0; r < S; ++r) {
    if (bh) slot_ab[r] = ab.data() + r * Ip;
    else slot_a[r] = a.data() + r * Ip;
  }

  struct Item { int64_t e, p0, p1; };
  auto items_for = [&](int64_t panels, int64_t per_item) {
    std::vector<Item> items;
    for (int64_t e = 0; e < E; ++e)
      if (start[e + 1] > start[e])
        for (int64_t p0 = 0; p0 < panels; p0 += per_item)
          items.push_back({e, p0, std::min(panels, p0 + per_item)});
    return items;
  };
  const W* w13 = w13p.const_data_ptr<W>();
  const W* w2 = w2p.const_data_ptr<W>();
  const int64_t up_panel = (Kp / kDotStep) * kPanelRows * kDotStep;    // elements per panel
  const int64_t down_panel = (Ip / kDotStep) * kPanelRows * kDotStep;

  // 2. gate + up, activation: a[r, 2p + j] = act(x_r . gate_{2p+j}) * (x_r . up_{2p+j}).
  const std::vector<Item> up_items = items_for(up_panels, kUpPanels);
  for_each_item(static_cast<int64_t>(up_items.size()), [&](int64_t i) {
    const Item it = up_items[i];
    const int64_t r0 = start[it.e], rows = start[it.e + 1] - r0;
    for (int64_t p = it.p0; p < it.p1; ++p) {
      const int64_t c0 = dot_index<W>(2 * p, Ip), c1 = dot_index<W>(2 * p + 1, Ip);
      const W* panel = w13 + (it.e * up_panels + p) * up_panel;
      // The intermediate is rounded to the tokens' dtype, as transformers' MLP rounds it.
      auto emit = [&](int64_t r, const float* d) {
        float* ar = a.data() + (r0 + r) * Ip;
        ar[c0] = static_cast<float>(static_cast<T>(activate(d[0], act) * d[2]));
        ar[c1] = static_cast<float>(static_cast<T>(activate(d[1], act) * d[3]));
      };
#if defined(VHN_AVX512BF16)
      if constexpr (kUpOnBf16Dots<T, W>) {
        panel_all_rows_bh(slot_xb.data() + r0, rows, panel, Kp / kDotStep,
                          [&](int64_t r, const float* d) {
                            BFloat16* ar = ab.data() + (r0 + r) * Ip + 2 * p;
                            ar[0] = BFloat16(activate(d[0], act) * d[2]);
                            ar[1] = BFloat16(activate(d[1], act) * d[3]);
                          });
        continue;
      }
#endif
      panel_all_rows(slot_x.data() + r0, rows, panel, Kp / kDotStep, emit);
    }
  });

  // 3. down: y[r, 4p + j] = a_r . down_{4p+j}.
  const std::vector<Item> down_items = items_for(down_panels, kDownPanels);
  for_each_item(static_cast<int64_t>(down_items.size()), [&](int64_t i) {
    const Item it = down_items[i];
    const int64_t r0 = start[it.e], rows = start[it.e + 1] - r0;
    for (int64_t p = it.p0; p < it.p1; ++p) {
      const int64_t n0 = p * kPanelRows, nn = std::min<int64_t>(kPanelRows, K - n0);
      const W* panel = w2 + (it.e * down_panels + p) * down_panel;
      auto emit = [&](int64_t r, const float* d) {
        float* yr = y.data() + (r0 + r) * K + n0;
        for (int64_t j = 0; j < nn; ++j) yr[j] = d[j];
      };
#if defined(VHN_AVX512BF16)
      if constexpr (kUpOnBf16Dots<T, W>) {
        panel_all_rows_bh(slot_ab.data() + r0, rows, panel, Ip / kDotStep, emit);
        continue;
      }
#endif
      panel_all_rows(slot_a.data() + r0, rows, panel, Ip / kDotStep, emit);
    }
  });

  // 4. out[t] = sum_j rw[t, j] * y[pos(t, j)], in top-k order.
  T* op = out.data_ptr<T>();
  at::parallel_for(0, M, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(K);
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < topk; ++j) {
        const float wgt = rwp[t * topk + j];
        const float* yr = y.data() + pos[t * topk + j] * K;
        for (int64_t n = 0; n < K; ++n) acc[n] += wgt * yr[n];
      }
      for (int64_t n = 0; n < K; ++n) op[t * K + n] = static_cast<T>(acc[n]);
    }
  });
}

void moe_experts_packed(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13p,
                        const at::Tensor& w2p, const at::Tensor& topk_weights,
                        const at::Tensor& topk_ids, int64_t inter, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && w13p.dim() == 3 && w2p.dim() == 3, "moe_experts_packed: x (M, K), "
              "w13p (E, Ip/2, 4 Kp), w2p (E, ceil(K/4), 4 Ip) expected (ops/moe.py: "
              "pack_moe_weights)");
  const int64_t K = x.size(1), E = w13p.size(0), S = kDotStep;
  const int64_t Ip = round_up(inter, S), Kp = round_up(K, S);
  TORCH_CHECK(inter > 0 && w13p.size(1) == Ip / 2 && w13p.size(2) == kPanelRows * Kp &&
              w2p.size(0) == E && w2p.size(1) == (K + kPanelRows - 1) / kPanelRows &&
              w2p.size(2) == kPanelRows * Ip,
              "moe_experts_packed: w13p ", w13p.sizes(), " and w2p ", w2p.sizes(),
              " do not match x ", x.sizes(), " and inter ", inter, " (packed with k-step ", S, ")");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) &&
              topk_weights.sizes() == topk_ids.sizes(), "moe_experts: topk_ids and topk_weights "
              "must both be (M, topk)");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
              out.is_contiguous(), "moe_experts: out must be a contiguous tensor like x");
  TORCH_CHECK(w13p.scalar_type() == w2p.scalar_type() && w13p.is_contiguous() &&
              w2p.is_contiguous(), "moe_experts: w13p and w2p must be contiguous, of one dtype");
  TORCH_CHECK(activation >= kSilu && activation <= kGelu, "moe_experts: activation ", activation,
              " is not 0 (silu), 1 (gelu_tanh) or 2 (gelu)");
  if (x.size(0) == 0) return;
  at::NoGradGuard no_grad;
  VHN_DISPATCH_FB(x.scalar_type(), T, [&] {
    VHN_DISPATCH_FB(w13p.scalar_type(), W, [&] {
      moe_impl<T, W>(out, x, w13p, w2p, topk_weights, topk_ids, inter, activation);
    });
  });
}

int64_t moe_pack_step() { return kDotStep; }

}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("moe_experts_packed", &moe_experts_packed);
}

// The k-step (S) this build packs expert weights with; no tensor arguments, so defined here
// with its one (catch-all) kernel.
TORCH_LIBRARY_FRAGMENT(vllm_hybrid_neuron, m) {
  m.def("moe_pack_step() -> int", &moe_pack_step);
}

}  // namespace vhn
