// Routed experts of an MoE block on weights packed once at load (ops/moe.py: pack_moe_weights):
//   out (M, K) = sum_j topk_weights[t, j] * expert_{ids[t, j]}(x[t]),
//   expert_e(x) = (act(x @ gate_e^T) * (x @ up_e^T)) @ down_e^T.
//
// Why packed: a decode step reads each routed expert's weights once, so the op is a weight
// stream. In vLLM's (E, 2I, K) layout a block of rows is several page-sized streams; packed, a
// work item's weights are one contiguous stream the hardware prefetcher follows to the end.
//
// Two packed layouts. bf16 weights on builds with AVX512-BF16 dot products: the pair layout and
// its kernels (moe_pairs.h). Otherwise (fp32 weights; bf16 on AVX2 / AVX-512 builds) panels:
// S = kDotStep (elements per k-step of the dot kernel, 16 on AVX2, 32 on AVX-512),
// Ip = I rounded up to S, Kp = K rounded up to S, zero padding everywhere (3-D, as vLLM's MoE
// kernel interface requires; the last dim is a panel):
//   w13p (E, Ip/2, [Kp/S, 4, S]): panel p holds rows [gate 2p, gate 2p+1, up 2p, up 2p+1],
//                                 k-step-major (the 4 rows' S elements of one k-step adjacent);
//   w2p  (E, ceil(K/4), [Ip/S, 4, S]): panel p holds down rows 4p .. 4p+3 the same way.
// A gate/up panel yields two activations act(g) * u directly; a down panel four outputs.
//
//  1. the (token, j) slots are sorted by expert (counting sort, token order kept within an expert);
//     panels: each token's row is converted once to fp32 in W's dot layout (gemv.h), zero padded
//     to Kp (pairs: kept in its dtype, zero padded);
//  2. gate+up and the activation: work items (expert, block of panels); an item streams each
//     panel once for all the expert's tokens (3 at a time; the panel stays in L1 between groups);
//  3. down projection: work items (expert, block of panels), the same way;
//  4. each token's top-k rows are summed in top-k order with its routing weights.
// Items are taken dynamically by the threads: an expert's columns are split between them, so
// both cores stream at M = 1. fp32 accumulation; the intermediate act(g) * u is rounded to the
// tokens' dtype T (as transformers' MLP rounds it); a token's result does not depend on the
// other tokens in the call (the accumulation order depends only on K and I).
#include "gemv.h"
#include "moe_pairs.h"

#include <atomic>
#include <memory>
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

// emit(row, the row's kPanelRows dots) for the `rows` inputs xs[0 .. rows), kTokenGroup at a
// time.
template <typename W, typename Emit>
inline void panel_all_rows(const float* const* xs, int64_t rows, const W* panel, int64_t steps,
                           const Emit& emit) {
  in_row_groups<kTokenGroup, float, kPanelRows>(rows, [&](int64_t t0, auto m_tag, auto& dots) {
    panel_dot<decltype(m_tag)::value>(xs + t0, panel, steps, dots);
  }, emit);
}

// bf16 weights are packed in the pair layout (moe_pairs.h) where this build has AVX512-BF16
// dot products, in panels otherwise.
template <typename W>
constexpr bool kPairLayout =
#if defined(VHN_AVX512BF16)
    std::is_same<W, BFloat16>::value;
#else
    false;
#endif

struct Item { int64_t e, p0, p1; };

// Work items (expert, [p0, p1)) over `tiles` tiles of every expert that has tokens.
std::vector<Item> items_for(const std::vector<int64_t>& start, int64_t tiles, int64_t per_item) {
  std::vector<Item> items;
  const int64_t E = static_cast<int64_t>(start.size()) - 1;
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e])
      for (int64_t p0 = 0; p0 < tiles; p0 += per_item)
        items.push_back({e, p0, std::min(tiles, p0 + per_item)});
  return items;
}

// Steps 2-3 in the panel layout: y (S, K) fp32, slots in sorted order; slot_tok[r] is the token
// of sorted slot r.
template <typename T, typename W>
void panel_stages(std::vector<float>& y, const at::Tensor& x, const std::vector<int64_t>& start,
                  const std::vector<int64_t>& slot_tok, const W* w13, const W* w2,
                  int64_t down_panels, int64_t I, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), S = static_cast<int64_t>(slot_tok.size());
  const int64_t Ip = round_up(I, kDotStep), Kp = round_up(K, kDotStep), up_panels = Ip / 2;
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xp = x32.const_data_ptr<float>();
  std::vector<float> xd(M * Kp, 0.f);  // (M, Kp) in W's dot layout
  for (int64_t t = 0; t < M; ++t)
    for (int64_t k = 0; k < K; ++k) xd[t * Kp + dot_index<W>(k, Kp)] = xp[t * K + k];
  std::vector<float> a(S * Ip);  // activations (S, Ip) in W's dot layout
  std::vector<const float*> slot_x(S), slot_a(S);
  for (int64_t r = 0; r < S; ++r) {
    slot_x[r] = xd.data() + slot_tok[r] * Kp;
    slot_a[r] = a.data() + r * Ip;
  }
  const int64_t up_panel = (Kp / kDotStep) * kPanelRows * kDotStep;  // elements per panel
  const int64_t down_panel = (Ip / kDotStep) * kPanelRows * kDotStep;

  // 2. gate + up, activation: a[r, 2p + j] = act(x_r . gate_{2p+j}) * (x_r . up_{2p+j}).
  const std::vector<Item> up_items = items_for(start, up_panels, kUpPanels);
  for_each_item(static_cast<int64_t>(up_items.size()), [&](int64_t i) {
    const Item it = up_items[i];
    const int64_t r0 = start[it.e], rows = start[it.e + 1] - r0;
    for (int64_t p = it.p0; p < it.p1; ++p) {
      const int64_t c0 = dot_index<W>(2 * p, Ip), c1 = dot_index<W>(2 * p + 1, Ip);
      // The intermediate is rounded to the tokens' dtype, as transformers' MLP rounds it.
      panel_all_rows(slot_x.data() + r0, rows, w13 + (it.e * up_panels + p) * up_panel,
                     Kp / kDotStep, [&](int64_t r, const float* d) {
                       float* ar = a.data() + (r0 + r) * Ip;
                       ar[c0] = static_cast<float>(static_cast<T>(activate(d[0], act) * d[2]));
                       ar[c1] = static_cast<float>(static_cast<T>(activate(d[1], act) * d[3]));
                     });
    }
  });

  // 3. down: y[r, 4p + j] = a_r . down_{4p+j}.
  const std::vector<Item> down_items = items_for(start, down_panels, kDownPanels);
  for_each_item(static_cast<int64_t>(down_items.size()), [&](int64_t i) {
    const Item it = down_items[i];
    const int64_t r0 = start[it.e], rows = start[it.e + 1] - r0;
    for (int64_t p = it.p0; p < it.p1; ++p) {
      const int64_t n0 = p * kPanelRows, nn = std::min<int64_t>(kPanelRows, K - n0);
      panel_all_rows(slot_a.data() + r0, rows, w2 + (it.e * down_panels + p) * down_panel,
                     Ip / kDotStep, [&](int64_t r, const float* d) {
                       float* yr = y.data() + (r0 + r) * K + n0;
                       for (int64_t j = 0; j < nn; ++j) yr[j] = d[j];
                     });
    }
  });
}

#if defined(VHN_AVX512BF16)
inline fVec activate(const fVec& g, int64_t act) {
  if (act == kSilu) return g / (fVec(1.f) + g.neg().exp());
  if (act == kGeluTanh) {
    const fVec inner = fVec(0.7978845608028654f) * (g + fVec(0.044715f) * g * g * g);
    return fVec(0.5f) * g * (fVec(1.f) + inner.tanh());
  }
  return fVec(0.5f) * g * (fVec(1.f) + (g * fVec(0.7071067811865476f)).erf());
}

// Steps 2-4 in the pair layout (moe_pairs.h), tokens T, bf16 weights, into out (M, K).
// slot_w[r]: the routing weight of sorted slot r.
template <typename T>
void pair_stages(at::Tensor& out, const at::Tensor& x, const std::vector<int64_t>& start,
                 const std::vector<int64_t>& slot_tok, const std::vector<float>& slot_w,
                 const BFloat16* w13, const BFloat16* w2, int64_t I, int64_t act) {
  using namespace pairs;
  const int64_t M = x.size(0), K = x.size(1), S = static_cast<int64_t>(slot_tok.size());
  const int64_t E = static_cast<int64_t>(start.size()) - 1;
  const int64_t Ip = round_up(I, kPadI), Kp = round_up(K, kPadK), Kq = round_up(K, kPadOut);
  const at::Tensor xc = x.contiguous();
  const T* xp = xc.const_data_ptr<T>();
  std::vector<T> xs(M * Kp, T(0.f));  // tokens (M, Kp), zero padded
  for (int64_t t = 0; t < M; ++t) std::copy(xp + t * K, xp + (t + 1) * K, xs.data() + t * Kp);
  std::unique_ptr<T[]> a(new T[S * Ip]);  // activations (S, Ip), sorted slot order
  std::vector<const T*> slot_x(S), slot_a(S);
  for (int64_t r = 0; r < S; ++r) {
    slot_x[r] = xs.data() + slot_tok[r] * Kp;
    slot_a[r] = a.get() + r * Ip;
  }
  const int64_t up_tiles = Ip / (kTileCols / 2), down_tiles = Kq / kTileCols;
  const int64_t up_tile = Kp * kTileCols, down_tile = Ip * kTileCols;  // elements per tile

  // 2. gate + up, activation: a[r, 32q + n] = act(x_r . gate_{32q+n}) * (x_r . up_{32q+n}),
  // rounded to T as transformers' MLP rounds it. Items (expert, tile q).
  const std::vector<Item> up_items = items_for(start, up_tiles, 1);
  for_each_item(static_cast<int64_t>(up_items.size()), [&](int64_t i) {
    const Item it = up_items[i];
    const int64_t r0 = start[it.e], rows = start[it.e + 1] - r0;
    tile_all_rows<T>(slot_x.data() + r0, rows, w13 + (it.e * up_tiles + it.p0) * up_tile, Kp / 2,
                     [&](int64_t r, const __m512* acc) {
                       T* ar = a.get() + (r0 + r) * Ip + it.p0 * (kTileCols / 2);
                       for (int h = 0; h < 2; ++h)
                         vstore(ar + h * kLanes, activate(fVec(acc[h]), act) * fVec(acc[2 + h]),
                                kLanes);
                     });
  });

  // 3-4. down and the weighted sum: item q owns outputs 64q .. 64q+63 of every token and runs
  // the experts in order, so a token's sum is over its experts in expert order (fp32), and no
  // (S, K) buffer of expert outputs is needed (above ~32 MB each call's fresh pages cost ~15%).
  T* op = out.data_ptr<T>();
  for_each_item(down_tiles, [&](int64_t q) {
    const int64_t n0 = q * kTileCols;
    std::vector<float> sum(M * kTileCols, 0.f);  // (M, 64)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = start[e], rows = start[e + 1] - r0;
      if (rows == 0) continue;
      tile_all_rows<T>(slot_a.data() + r0, rows, w2 + (e * down_tiles + q) * down_tile, Ip / 2,
                       [&](int64_t r, const __m512* acc) {
                         float* st = sum.data() + slot_tok[r0 + r] * kTileCols;
                         const __m512 w = _mm512_set1_ps(slot_w[r0 + r]);
                         for (int v = 0; v < kTileVecs; ++v)
                           _mm512_storeu_ps(st + v * kLanes, _mm512_fmadd_ps(
                               w, acc[v], _mm512_loadu_ps(st + v * kLanes)));
                       });
    }
    for (int64_t t = 0; t < M; ++t)
      for (int v = 0; v < kTileVecs; ++v) {
        const int64_t n = n0 + v * kLanes;
        if (n < K)
          vstore(op + t * K + n, fVec::loadu(sum.data() + t * kTileCols + v * kLanes),
                 std::min(kLanes, K - n));
      }
  });
}
#endif

template <typename T, typename W>
void moe_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13p, const at::Tensor& w2p,
              const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t I, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), E = w13p.size(0);
  const int64_t topk = topk_ids.size(1), S = M * topk;
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor rw = topk_weights.to(at::kFloat).contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  const float* rwp = rw.const_data_ptr<float>();

  // 1. Counting sort of the (token, j) slots by expert, token order kept within an expert.
  std::vector<int64_t> start(E + 1, 0), pos(S), slot_tok(S);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(idp[s] >= 0 && idp[s] < E, "moe_experts: topk_ids entry ", idp[s],
                " is outside [0, ", E, ")");
    ++start[idp[s] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < S; ++s) {
      pos[s] = fill[idp[s]]++;
      slot_tok[pos[s]] = s / topk;
    }
  }

#if defined(VHN_AVX512BF16)
  if constexpr (kPairLayout<W>) {
    std::vector<float> slot_w(S);
    for (int64_t s = 0; s < S; ++s) slot_w[pos[s]] = rwp[s];
    pair_stages<T>(out, x, start, slot_tok, slot_w, w13p.const_data_ptr<BFloat16>(),
                   w2p.const_data_ptr<BFloat16>(), I, act);
    return;
  }
#endif

  // 2-3. Expert outputs y (S, K) fp32, in sorted slot order.
  std::vector<float> y(S * K);
  panel_stages<T, W>(y, x, start, slot_tok, w13p.const_data_ptr<W>(), w2p.const_data_ptr<W>(),
                     w2p.size(1), I, act);

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

int64_t moe_pack_step() { return kDotStep; }

// Whether this build packs bf16 expert weights in the pair layout (moe_pairs.h).
bool moe_bf16_pairs() { return kPairLayout<BFloat16>; }

void moe_experts_packed(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13p,
                        const at::Tensor& w2p, const at::Tensor& topk_weights,
                        const at::Tensor& topk_ids, int64_t inter, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && w13p.dim() == 3 && w2p.dim() == 3, "moe_experts_packed: x (M, K) "
              "and 3-D packed weights w13p, w2p expected (ops/moe.py: pack_moe_weights)");
  const int64_t K = x.size(1), E = w13p.size(0);
  TORCH_CHECK(inter > 0, "moe_experts_packed: inter must be positive, got ", inter);
  std::vector<int64_t> want13, want2;  // the packed shapes for x's K and inter
  if (w13p.scalar_type() == at::kBFloat16 && moe_bf16_pairs()) {
#if defined(VHN_AVX512BF16)
    using namespace pairs;
    const int64_t Ip = round_up(inter, kPadI), Kp = round_up(K, kPadK);
    want13 = {E, Ip / (kTileCols / 2), Kp * kTileCols};
    want2 = {E, round_up(K, kPadOut) / kTileCols, Ip * kTileCols};
#endif
  } else {
    const int64_t Ip = round_up(inter, kDotStep), Kp = round_up(K, kDotStep);
    want13 = {E, Ip / 2, kPanelRows * Kp};
    want2 = {E, (K + kPanelRows - 1) / kPanelRows, kPanelRows * Ip};
  }
  TORCH_CHECK(w13p.sizes() == at::IntArrayRef(want13) && w2p.sizes() == at::IntArrayRef(want2),
              "moe_experts_packed: w13p ", w13p.sizes(), " and w2p ", w2p.sizes(),
              " do not match x ", x.sizes(), " and inter ", inter, " (this build packs ",
              w13p.scalar_type(), " weights as ", at::IntArrayRef(want13), " and ",
              at::IntArrayRef(want2), ": ops/moe.py pack_moe_weights)");
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


}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("moe_experts_packed", &moe_experts_packed);
}

// The k-step (S) this build packs expert weights in panels with, and whether it packs bf16 ones
// in pairs; no tensor arguments, so defined here with their one (catch-all) kernel.
TORCH_LIBRARY_FRAGMENT(vllm_hybrid_neuron, m) {
  m.def("moe_pack_step() -> int", &moe_pack_step);
  m.def("moe_bf16_pairs() -> bool", &moe_bf16_pairs);
}

}  // namespace vhn
