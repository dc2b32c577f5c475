// Routed experts of an MoE block: out (M, K) = sum_j topk_weights[t, j] * expert_{ids[t, j]}(x[t]),
// expert_e(x) = (act(x @ w13[e, :I]^T) * (x @ w13[e, I:]^T)) @ w2[e]^T.
//
// Why: vLLM's CPU op costs in proportion to tokens, not to the distinct experts they hit
// (benchmarks/bench_moe.py), which is what batched decode, speculative verification and prefill
// pay. Here tokens are grouped by expert and each expert's weight rows are read from memory once
// per call, whatever the number of tokens routed to it:
//  1. tokens are sorted by expert (counting sort, token order kept inside an expert) and their
//     rows converted to fp32 once;
//  2. gate+up and the activation: work items (expert, block of intermediate columns); an item
//     streams its block's gate and up rows once for all the expert's tokens (4 at a time, the
//     rows stay in cache between groups) and writes act(gate) * up;
//  3. down projection: work items (expert, block of output columns), the same way;
//  4. each token's top-k rows are summed in top-k order with its routing weights.
// Items are taken dynamically by the threads (an expert's columns are split between them, so both
// cores stream at M = 1). fp32 accumulation and fp32 intermediates throughout; a token's result
// does not depend on the other tokens in the call (gemv.h). Weights bf16 or fp32, (E, 2I, K) and
// (E, K, I) as vLLM stores them; no repacking.
#include "gemv.h"

#include <atomic>
#include <vector>

namespace vhn {
namespace {

constexpr int64_t kTokenGroup = 4;  // tokens per dot_block pass
constexpr int64_t kColBlock = 16;   // weight rows per work item

enum Activation : int64_t { kSilu = 0, kGeluTanh = 1, kGelu = 2 };

inline float activate(float g, int64_t act) {
  if (act == kSilu) return g / (1.f + std::exp(-g));
  if (act == kGeluTanh) {
    const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
    return 0.5f * g * (1.f + std::tanh(inner));
  }
  return 0.5f * g * (1.f + std::erf(g * 0.7071067811865476f));
}

// Run item(i) for i in [0, n) on all threads, each taking the next free item.
template <typename F>
void for_each_item(int64_t n, const F& item) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) item(i);
  });
}

// (rows, cols) = x (rows, K; stride ldx, in W's dot layout) @ w (cols, K; stride ldw)^T,
// handed to emit(row, col, value) one result at a time.
template <typename W, typename Emit>
void small_gemm(const float* x, int64_t rows, int64_t ldx, const W* w, int64_t cols, int64_t ldw,
                int64_t K, const Emit& emit) {
  for (int64_t r0 = 0; r0 < rows; r0 += kTokenGroup) {
    const int64_t mr = std::min(kTokenGroup, rows - r0);
    const float* xr = x + r0 * ldx;
    auto run = [&](auto m_tag) {
      constexpr int M = decltype(m_tag)::value;
      constexpr int NB = rows_per_block<M>();
      int64_t c = 0;
      float dots[NB][M];
      for (; c + NB <= cols; c += NB) {
        dot_block<M, NB>(xr, ldx, w + c * ldw, ldw, K, dots);
        for (int nb = 0; nb < NB; ++nb)
          for (int m = 0; m < M; ++m) emit(r0 + m, c + nb, dots[nb][m]);
      }
      float one[1][M];
      for (; c < cols; ++c) {
        dot_block<M, 1>(xr, ldx, w + c * ldw, ldw, K, one);
        for (int m = 0; m < M; ++m) emit(r0 + m, c, one[0][m]);
      }
    };
    switch (mr) {
      case 1: run(std::integral_constant<int, 1>{}); break;
      case 2: run(std::integral_constant<int, 2>{}); break;
      case 3: run(std::integral_constant<int, 3>{}); break;
      default: run(std::integral_constant<int, 4>{}); break;
    }
  }
}

template <typename T, typename W>
void moe_impl(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
              const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  const int64_t topk = topk_ids.size(1), S = M * topk;
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor rw = topk_weights.to(at::kFloat).contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  const float* rwp = rw.const_data_ptr<float>();

  // 1. Counting sort of the (token, j) slots by expert.
  std::vector<int64_t> start(E + 1, 0), pos(S), slot_token(S);
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
      slot_token[pos[s]] = s / topk;
    }
  }
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const float* xp = x32.const_data_ptr<float>();
  // Sorted inputs and activations (both in W's dot layout), expert outputs.
  std::vector<float> xg(S * K), a(S * I), y(S * K);
  for (int64_t r = 0; r < S; ++r)  // in the dot layout of W (gemv.h)
    to_dot_layout<W>(xp + slot_token[r] * K, xg.data() + r * K, K);

  struct Item { int64_t e, c0, cols; };
  auto items_for = [&](int64_t cols_total) {
    std::vector<Item> items;
    for (int64_t e = 0; e < E; ++e)
      if (start[e + 1] > start[e])
        for (int64_t c0 = 0; c0 < cols_total; c0 += kColBlock)
          items.push_back({e, c0, std::min(kColBlock, cols_total - c0)});
    return items;
  };
  const W* w13p = w13.const_data_ptr<W>();
  const W* w2p = w2.const_data_ptr<W>();

  // 2. gate + up, activation: a[r, c] = act(x_r . gate_c) * (x_r . up_c).
  const std::vector<Item> up_items = items_for(I);
  for_each_item(static_cast<int64_t>(up_items.size()), [&](int64_t i) {
    const Item it = up_items[i];
    const int64_t r0 = start[it.e], rows = start[it.e + 1] - r0;
    const W* gate = w13p + (it.e * 2 * I + it.c0) * K;
    const W* up = gate + I * K;
    float g[kTokenGroup * kColBlock];  // this item's gate values of one token group
    for (int64_t t0 = 0; t0 < rows; t0 += kTokenGroup) {
      const int64_t tr = std::min(kTokenGroup, rows - t0);
      const float* xr = xg.data() + (r0 + t0) * K;
      small_gemm(xr, tr, K, gate, it.cols, K, K,
                 [&](int64_t r, int64_t c, float v) { g[r * kColBlock + c] = v; });
      small_gemm(xr, tr, K, up, it.cols, K, K, [&](int64_t r, int64_t c, float v) {
        a[(r0 + t0 + r) * I + dot_index<W>(it.c0 + c, I)] = activate(g[r * kColBlock + c], act) * v;
      });
    }
  });

  // 3. down: y[r, n] = a_r . w2[e, n].
  const std::vector<Item> down_items = items_for(K);
  for_each_item(static_cast<int64_t>(down_items.size()), [&](int64_t i) {
    const Item it = down_items[i];
    const int64_t r0 = start[it.e], rows = start[it.e + 1] - r0;
    small_gemm(a.data() + r0 * I, rows, I, w2p + (it.e * K + it.c0) * I, it.cols, I, I,
               [&](int64_t r, int64_t c, float v) { y[(r0 + r) * K + it.c0 + c] = v; });
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

void moe_experts(at::Tensor& out, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                 const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t activation) {
  TORCH_CHECK(x.dim() == 2 && w13.dim() == 3 && w2.dim() == 3, "moe_experts: x (M, K), "
              "w13 (E, 2I, K), w2 (E, K, I) expected");
  const int64_t K = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == K && w2.size(0) == E && w2.size(1) == K &&
              w2.size(2) == I, "moe_experts: w13 ", w13.sizes(), " and w2 ", w2.sizes(),
              " do not match x ", x.sizes());
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == x.size(0) &&
              topk_weights.sizes() == topk_ids.sizes(), "moe_experts: topk_ids and topk_weights "
              "must both be (M, topk)");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
              out.is_contiguous(), "moe_experts: out must be a contiguous tensor like x");
  TORCH_CHECK(w13.scalar_type() == w2.scalar_type() && w13.is_contiguous() && w2.is_contiguous(),
              "moe_experts: w13 and w2 must be contiguous, of one dtype");
  TORCH_CHECK(activation >= kSilu && activation <= kGelu, "moe_experts: activation ", activation,
              " is not 0 (silu), 1 (gelu_tanh) or 2 (gelu)");
  if (x.size(0) == 0) return;
  at::NoGradGuard no_grad;
  VHN_DISPATCH_FB(x.scalar_type(), T, [&] {
    VHN_DISPATCH_FB(w13.scalar_type(), W, [&] {
      moe_impl<T, W>(out, x, w13, w2, topk_weights, topk_ids, activation);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("moe_experts", &moe_experts);
}

}  // namespace vhn
