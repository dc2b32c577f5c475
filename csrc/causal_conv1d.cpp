// Depthwise causal conv1d for Mamba2 / GDN: varlen prefill and (speculative) decode.
// Channels are processed in blocks of kCB; every token is one vectorised pass over a block.
#include <c10/core/InferenceMode.h>
#include "common.h"
#include "ops.h"

#include <vector>

namespace vhn {
namespace {

constexpr int64_t kCB = 64;   // channels per work item
constexpr int64_t kMaxW = 8;  // kernel width limit

// out[c] = act(bias[c] + sum_j w[j][c] * win[j][c]) over one channel block.
inline void conv_block(const float (*w)[kCB], const float* bias, float* const* win, int64_t W,
                       bool silu, float* out) {
  for (int64_t c = 0; c < kCB; c += kVecF) {
    fVec acc = fVec::loadu(bias + c);
    for (int64_t j = 0; j < W; ++j)
      acc = at::vec::fmadd(fVec::loadu(w[j] + c), fVec::loadu(win[j] + c), acc);
    if (silu) acc = acc / (fVec(1.f) + acc.neg().exp_u20());
    acc.store(out + c);
  }
}

// One channel block as kCB floats (tail lanes 0); vector loads when channels are contiguous.
template <typename T>
inline void load_row(float* dst, const T* src, int64_t stride, int64_t nc) {
  if (stride == 1) {
    for (int64_t c = 0; c < kCB; c += kVecF) {
      const int64_t cnt = std::min(kVecF, nc - c);
      (cnt > 0 ? vload(src + c, cnt) : fVec(0.f)).store(dst + c);
    }
  } else {
    for (int64_t c = 0; c < kCB; ++c) dst[c] = c < nc ? tof(src[c * stride]) : 0.f;
  }
}

template <typename T>
inline void store_row(T* dst, const float* src, int64_t stride, int64_t nc) {
  if (stride == 1) {
    for (int64_t c = 0; c < nc; c += kVecF) vstore(dst + c, fVec::loadu(src + c), std::min(kVecF, nc - c));
  } else {
    for (int64_t c = 0; c < nc; ++c) dst[c * stride] = T(src[c]);
  }
}

struct Params {
  float w[kMaxW][kCB];
  float b[kCB];
};

inline void load_params(Params& p, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t c0, int64_t nc, int64_t W) {
  const int64_t sw0 = weight.stride(0), sw1 = weight.stride(1);
  auto fill = [&](const auto* w) {  // typed reads: this runs once per channel block
    for (int64_t j = 0; j < W; ++j)
      for (int64_t c = 0; c < kCB; ++c) p.w[j][c] = c < nc ? tof(w[(c0 + c) * sw0 + j * sw1]) : 0.f;
  };
  if (weight.scalar_type() == at::kFloat) fill(weight.const_data_ptr<float>());
  else if (weight.scalar_type() == at::kBFloat16) fill(weight.const_data_ptr<BFloat16>());
  else {
    const FAcc fw(weight);
    for (int64_t j = 0; j < W; ++j)
      for (int64_t c = 0; c < kCB; ++c) p.w[j][c] = c < nc ? fw((c0 + c) * sw0 + j * sw1) : 0.f;
  }
  const FAcc fb(bias);
  for (int64_t c = 0; c < kCB; ++c)
    p.b[c] = (bias.has_value() && c < nc) ? fb((c0 + c) * bias->stride(0)) : 0.f;
}

constexpr int64_t kTC = 32;  // tokens per prefill work item

// Prefill. Work items are (sequence, kTC-token chunk), all channels, token by token: each
// token's row is one sequential stream. (Until 2026-12-08 an item was one channel block over the
// whole sequence, touching every token row at a stride of the row length: 14 ms per Qwen3.5 GDN
// layer for 1024 tokens against vLLM's 2.4.) The conv has no recurrence: a chunk starts from
// the SL inputs before it (x rows, or the cached state / zeros before the sequence's first
// token). The order of each output's sums is the same as before (bias, then j = 0 .. W-1).
template <typename T>
void conv_fwd_impl(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                   at::Tensor& conv_states, const at::Tensor& qsl, const c10::optional<at::Tensor>& cache_indices,
                   const c10::optional<at::Tensor>& has_init, bool silu, int64_t pad_slot_id, at::Tensor& out) {
  const int64_t dim = x.size(0), W = weight.size(1), SL = W - 1;
  const int64_t batch = qsl.size(0) - 1, nblk = (dim + kCB - 1) / kCB;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  T* sp = conv_states.mutable_data_ptr<T>();
  const int64_t sxd = x.stride(0), sxt = x.stride(1), sod = out.stride(0), sot = out.stride(1);
  const int64_t ss0 = conv_states.stride(0), ss1 = conv_states.stride(1), ss2 = conv_states.stride(2);
  std::vector<Params> params(nblk);  // each channel block's weights and bias, once
  for (int64_t blk = 0; blk < nblk; ++blk)
    load_params(params[blk], weight, bias, blk * kCB, std::min(kCB, dim - blk * kCB), W);
  struct Item { int64_t s, t0, t1; };
  std::vector<Item> items;
  std::vector<int64_t> slot_of(batch, -1), bos_of(batch), eos_of(batch);
  std::vector<char> init_of(batch, 0);
  for (int64_t s = 0; s < batch; ++s) {
    const int64_t bos = geti(qsl, s), eos = geti(qsl, s + 1);
    if (eos <= bos) continue;
    const int64_t slot = cache_indices.has_value() ? geti(*cache_indices, s * cache_indices->stride(0)) : s;
    if (slot == pad_slot_id || slot < 0) continue;
    slot_of[s] = slot;
    bos_of[s] = bos;
    eos_of[s] = eos;
    init_of[s] = has_init.has_value() && geti(*has_init, s * has_init->stride(0)) != 0;
    for (int64_t t0 = bos; t0 < eos; t0 += kTC) items.push_back({s, t0, std::min(eos, t0 + kTC)});
  }
  // Input row `pos` of sequence s, channel block c0, as floats: x, or before the sequence's
  // first token the cached state's column pos - bos + SL (zeros without an initial state).
  auto input_row = [&](float* dst, int64_t s, int64_t pos, int64_t c0, int64_t nc) {
    if (pos >= bos_of[s]) load_row(dst, xp + pos * sxt + c0 * sxd, sxd, nc);
    else if (init_of[s]) load_row(dst, sp + slot_of[s] * ss0 + c0 * ss1 + (pos - bos_of[s] + SL) * ss2, ss1, nc);
    else std::fill_n(dst, kCB, 0.f);
  };
  // 1. Outputs; the states are only read here. Token-major within an item: token t's row is
  // read (and its output row written) channel block by channel block, one sequential stream;
  // each block keeps its last W input rows as floats in a ring (nblk x W x kCB, L2-sized).
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    // vLLM runs models under InferenceMode; pool threads don't inherit it.
    c10::InferenceMode inference_guard;
    std::vector<float> ring(nblk * kMaxW * kCB);  // block blk's rows at blk * kMaxW * kCB
    alignas(64) float res[kCB];
    for (int64_t i = begin; i < end; ++i) {
      const Item it = items[i];
      // ring row (r mod W) of a block holds input position it.t0 - SL + r
      for (int64_t blk = 0; blk < nblk; ++blk)
        for (int64_t j = 0; j < SL; ++j)
          input_row(ring.data() + (blk * kMaxW + j) * kCB, it.s, it.t0 - SL + j, blk * kCB,
                    std::min(kCB, dim - blk * kCB));
      for (int64_t t = it.t0; t < it.t1; ++t) {
        int64_t slot[kMaxW];  // ring rows of positions t - SL .. t
        for (int64_t j = 0; j < W; ++j) slot[j] = (t - it.t0 + j) % W;
        for (int64_t blk = 0; blk < nblk; ++blk) {
          const int64_t c0 = blk * kCB, nc = std::min(kCB, dim - c0);
          float* rows = ring.data() + blk * kMaxW * kCB;
          load_row(rows + slot[SL] * kCB, xp + t * sxt + c0 * sxd, sxd, nc);
          float* win[kMaxW];
          for (int64_t j = 0; j < W; ++j) win[j] = rows + slot[j] * kCB;
          conv_block(params[blk].w, params[blk].b, win, W, silu, res);
          store_row(op + t * sot + c0 * sod, res, sod, nc);
        }
      }
    }
  });
  // 2. Final states: the last SL inputs of each sequence. For a sequence shorter than SL,
  // column j comes from the old column j + length: ascending j reads each before writing it.
  at::parallel_for(0, batch * nblk, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode inference_guard;
    alignas(64) float row[kCB];
    for (int64_t it = begin; it < end; ++it) {
      const int64_t s = it / nblk, c0 = (it % nblk) * kCB, nc = std::min(kCB, dim - c0);
      if (slot_of[s] < 0) continue;
      T* st = sp + slot_of[s] * ss0 + c0 * ss1;
      for (int64_t j = 0; j < SL; ++j) {
        input_row(row, s, eos_of[s] - SL + j, c0, nc);
        store_row(st + j * ss2, row, ss1, nc);
      }
    }
  });
}

void causal_conv1d_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       at::Tensor& conv_states, const at::Tensor& query_start_loc,
                       const c10::optional<at::Tensor>& cache_indices, const c10::optional<at::Tensor>& has_initial_state,
                       bool silu, int64_t pad_slot_id, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && out.sizes() == x.sizes(), "causal_conv1d_fwd: x/out must be (dim, tokens)");
  TORCH_CHECK(x.scalar_type() == conv_states.scalar_type() && out.scalar_type() == x.scalar_type(),
              "causal_conv1d_fwd: x, out and conv_states must share a dtype");
  TORCH_CHECK(weight.size(1) >= 2 && weight.size(1) <= kMaxW, "causal_conv1d_fwd: width 2..8");
  TORCH_CHECK(conv_states.size(2) >= weight.size(1) - 1, "causal_conv1d_fwd: conv state too short");
  auto qsl = query_start_loc.contiguous();
  VHN_DISPATCH_FB(x.scalar_type(), T, [&] {
    conv_fwd_impl<T>(x, weight, bias, conv_states, qsl, cache_indices, has_initial_state, silu, pad_slot_id, out);
  });
}

template <typename T>
void conv_update_impl(const at::Tensor& x, at::Tensor& cs, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, bool silu, const c10::optional<at::Tensor>& idx,
                      const c10::optional<at::Tensor>& nacc, const c10::optional<at::Tensor>& qsl,
                      int64_t max_query_len, int64_t null_block_id, at::Tensor& out) {
  const int64_t dim = x.size(1), W = weight.size(1);
  const bool varlen = qsl.has_value(), spec = nacc.has_value();
  const int64_t batch = varlen ? qsl->size(0) - 1 : x.size(0);
  const int64_t Lmax = varlen ? max_query_len : x.size(2);
  const int64_t S_eff = (W - 1) + (spec ? Lmax - 1 : 0);
  const int64_t nblk = (dim + kCB - 1) / kCB;
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  T* sp = cs.mutable_data_ptr<T>();
  const int64_t sxb = x.stride(0), sxd = x.stride(1), sxt = x.stride(2);
  const int64_t sob = out.stride(0), sod = out.stride(1), sot = out.stride(2);
  const int64_t ss0 = cs.stride(0), ss1 = cs.stride(1), ss2 = cs.stride(2), SLmax = cs.size(2);
  // Work items are channel blocks; each loads its block's weights once for all rows.
  at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
    // vLLM runs models under InferenceMode; pool threads don't inherit it.
    c10::InferenceMode inference_guard;
    Params p;
    // window + tokens, then the new state, all as float rows of one channel block
    constexpr int64_t kMaxRows = 64;
    alignas(64) float rows[kMaxRows][kCB];
    alignas(64) float res[kCB];
    for (int64_t it = 0; it < (end - begin) * batch; ++it) {
      const int64_t b = it % batch, blk = begin + it / batch;
      const int64_t c0 = blk * kCB, nc = std::min(kCB, dim - c0);
      if (b == 0) load_params(p, weight, bias, c0, nc, W);
      int64_t bos = 0, L = Lmax;
      const T* xb = xp + b * sxb;
      T* ob = op + b * sob;
      if (varlen) {
        bos = geti(*qsl, b);
        L = geti(*qsl, b + 1) - bos;
        xb = xp + bos * sxt;
        ob = op + bos * sot;
      }
      if (L <= 0) continue;
      const int64_t slot = idx.has_value() ? geti(*idx, b * idx->stride(0)) : b;
      if (slot == null_block_id || slot < 0) continue;
      const int64_t off = spec ? geti(*nacc, b * nacc->stride(0)) - 1 : 0;
      const int64_t S_b = S_eff - (Lmax - L);
      TORCH_CHECK(W - 1 + L <= kMaxRows && off >= 0 && off + W - 1 <= SLmax && S_b <= SLmax,
                  "causal_conv1d_update: bad num_accepted_tokens / query length");
      T* st = sp + slot * ss0 + c0 * ss1;
      // rows[0..W-2] = window at `off`, rows[W-1..W-2+L] = the new tokens
      for (int64_t j = 0; j < W - 1; ++j) load_row(rows[j], st + (off + j) * ss2, ss1, nc);
      for (int64_t t = 0; t < L; ++t) load_row(rows[W - 1 + t], xb + c0 * sxd + t * sxt, sxd, nc);
      // new state column i: old state column off+i+shift while it exists, then the tokens
      alignas(64) float keep[kMaxRows][kCB];
      const int64_t shift = spec ? 1 : L, nkeep = std::max<int64_t>(S_b - L, 0);
      for (int64_t i = 0; i < nkeep; ++i) load_row(keep[i], st + (off + i + shift) * ss2, ss1, nc);
      for (int64_t i = 0; i < S_b; ++i)
        store_row(st + i * ss2, i < nkeep ? keep[i] : rows[W - 1 + i - (S_b - L)], ss1, nc);
      float* win[kMaxW];
      for (int64_t t = 0; t < L; ++t) {
        for (int64_t j = 0; j < W; ++j) win[j] = rows[t + j];
        conv_block(p.w, p.b, win, W, silu, res);
        store_row(ob + c0 * sod + t * sot, res, sod, nc);
      }
    }
  });
}

}  // namespace

void causal_conv1d_update(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                          const c10::optional<at::Tensor>& bias, bool silu,
                          const c10::optional<at::Tensor>& conv_state_indices,
                          const c10::optional<at::Tensor>& num_accepted_tokens,
                          const c10::optional<at::Tensor>& query_start_loc, int64_t max_query_len,
                          int64_t null_block_id, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 3 && out.sizes() == x.sizes(), "causal_conv1d_update: x/out must be 3-D");
  TORCH_CHECK(x.scalar_type() == conv_state.scalar_type() && out.scalar_type() == x.scalar_type(),
              "causal_conv1d_update: x, out and conv_state must share a dtype");
  TORCH_CHECK(weight.size(1) >= 2 && weight.size(1) <= kMaxW, "causal_conv1d_update: width 2..8");
  VHN_DISPATCH_FB(x.scalar_type(), T, [&] {
    conv_update_impl<T>(x, conv_state, weight, bias, silu, conv_state_indices, num_accepted_tokens,
                        query_start_loc, max_query_len, null_block_id, out);
  });
}

TORCH_LIBRARY_IMPL(vllm_hybrid_neuron, CPU, m) {
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.impl("causal_conv1d_update", &causal_conv1d_update);
}

}  // namespace vhn
