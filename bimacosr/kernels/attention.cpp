// Window attention of the Swin blocks under bf16 (docs/kernel.md §6): per window and head,
// softmax(q k^T * scale + (bias + mask)) v on bf16 pairs (vec.h's dot_pairs: vdpbf16ps with AVX512-BF16,
// written out in a test build), float32 logits, softmax and sums.
//
// bimacosr::window_attention(qkv [B', N, 3*C] bf16 (the qkv layer's output: q, k, v of each head
//   side by side), bias [H, N, N] float32 (the relative-position bias), mask [T, N, N] float32 (the
//   shift mask of each of an image's T windows) or empty, heads, scale) -> [B', N, C] bf16 (heads
//   side by side, as the proj layer reads them); window b adds bias + mask[b % T], summed as the
//   float32 term PyTorch's attention was given. As PyTorch's CPU flash attention computes it for bf16:
//   logits summed in float32, the softmax's exponentials rounded to bf16 for the product with v,
//   that product summed in float32 and divided by the float32 sum of the exponentials, the result
//   rounded to bf16.
// bimacosr::window_attention_shapes() -> the (N, D) pairs this build has, "64x32" ...
//
// One window and head at a time (at::parallel_for over B' x H): k^T as pairs of dimensions
// [D/2, N], v as pairs of keys [N/2, D] (keys k and k + kWidth of each 2 kWidth, the lanes the
// exponentials come in), then per query one vector per kWidth keys (D/2 vdpbf16ps each), the
// softmax on those vectors, and D/kWidth output vectors (N/2 vdpbf16ps each).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "vec.h"

namespace bimacosr {
namespace {

// The lanes of v combined pairwise, halves first (a tree: no chain of kWidth - 1 dependent steps),
// on vector halves: op works on vectors and on floats.
template <class Op>
inline float reduce_lanes(fvec v, Op op) {
  typedef float f32x4 __attribute__((vector_size(16)));
  typedef float f32x2 __attribute__((vector_size(8)));
#ifdef __AVX512F__
  const f32x8 h8 = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#else
  const f32x8 h8 = v;
#endif
  const f32x4 h4 = op(__builtin_shufflevector(h8, h8, 0, 1, 2, 3), __builtin_shufflevector(h8, h8, 4, 5, 6, 7));
  const f32x2 h2 = op(__builtin_shufflevector(h4, h4, 0, 1), __builtin_shufflevector(h4, h4, 2, 3));
  return op(h2[0], h2[1]);
}

// One window b and head h: N queries, keys and values of D dimensions.
template <int N, int D>
void attend_head(const bf16* qkv, const float* bias, const float* mask, int64_t c, float scale, bf16* out) {
  constexpr int kKeyVecs = N / kWidth, kDimVecs = D / kWidth;
  // queries at a time: their sums are independent chains (one query's 2-4 chains left vdpbf16ps
  // waiting on its latency); 4 x 4 logit vectors fit AVX-512's 32 registers, AVX2's 16 hold one query's
  constexpr int kQueries = kWidth == 16 ? 4 : 1;
  static_assert(N % (2 * kWidth) == 0 && N % 8 == 0 && D % 16 == 0 && D % kWidth == 0,
                "N: whole pairs of vectors; D: whole vectors and 8 x 8 blocks of pairs");
  const int64_t row = 3 * c;  // qkv's row: q, k, v of every head
  alignas(64) uint32_t kt[D / 2][N];  // kt[d2][j]: dimensions 2 d2, 2 d2 + 1 of key j
  alignas(64) uint32_t vp[N / 2][D];  // vp[j2][e]: dimension e of the two keys of pair j2
  for (int j0 = 0; j0 < N; j0 += 8)  // k^T in 8 x 8 blocks of words
    for (int d0 = 0; d0 < D / 2; d0 += 8) transpose_words8(qkv + j0 * row + c + 2 * d0, row, 8, &kt[d0][j0], N);
  for (int j2 = 0; j2 < N / 2; ++j2) {  // pair j2 = w kWidth + l: keys 2 w kWidth + l and (2 w + 1) kWidth + l
    const int a = 2 * (j2 / kWidth) * kWidth + j2 % kWidth, b = a + kWidth;
    for (int e = 0; e < D; e += 8) {
      u16x8 va, vb;
      std::memcpy(&va, qkv + a * row + 2 * c + e, sizeof va);
      std::memcpy(&vb, qkv + b * row + 2 * c + e, sizeof vb);
      const u32x8 w = __builtin_convertvector(va, u32x8) | __builtin_convertvector(vb, u32x8) << 16;
      std::memcpy(&vp[j2][e], &w, sizeof w);
    }
  }
  for (int i0 = 0; i0 < N; i0 += kQueries) {
    uint32_t q[kQueries][D / 2];
    for (int r = 0; r < kQueries; ++r) std::memcpy(q[r], qkv + (i0 + r) * row, sizeof q[r]);
    fvec s[kQueries][kKeyVecs] = {};
    for (int d2 = 0; d2 < D / 2; ++d2)
      for (int v = 0; v < kKeyVecs; ++v) {
        const uvec k = loaduv(&kt[d2][v * kWidth]);
        for (int r = 0; r < kQueries; ++r) s[r][v] = dot_pairs(s[r][v], k, q[r][d2]);
      }
    uint32_t p[kQueries][N / 2];  // the exponentials as bf16 pairs, in vp's pairing
    float sum[kQueries];
    for (int r = 0; r < kQueries; ++r) {
      fvec top = fvec{} - __builtin_inff();
      for (int v = 0; v < kKeyVecs; ++v) {
        const int64_t at = (i0 + r) * N + v * kWidth;
        s[r][v] = s[r][v] * scale + (mask ? loadv(bias + at) + loadv(mask + at) : loadv(bias + at));
        top = top > s[r][v] ? top : s[r][v];
      }
      const float m = reduce_lanes(top, [](auto a, auto b) { return a > b ? a : b; });
      for (int v = 0; v < kKeyVecs; ++v) s[r][v] -= m;
      exp_lanes(s[r]);  // the query's kKeyVecs vectors side by side
      fvec total = {};
      for (int v = 0; v < kKeyVecs; ++v) total += s[r][v];
      sum[r] = reduce_lanes(total, [](auto a, auto b) { return a + b; });
      for (int w = 0; w < kKeyVecs / 2; ++w) storeuv(p[r] + w * kWidth, bf16_pairs(s[r][2 * w], s[r][2 * w + 1]));
    }
    fvec o[kQueries][kDimVecs] = {};
    for (int j2 = 0; j2 < N / 2; ++j2)
      for (int u = 0; u < kDimVecs; ++u) {
        const uvec v = loaduv(&vp[j2][u * kWidth]);
        for (int r = 0; r < kQueries; ++r) o[r][u] = dot_pairs(o[r][u], v, p[r][j2]);
      }
    for (int r = 0; r < kQueries; ++r)
      for (int u = 0; u < kDimVecs; ++u) store_lanes(out + (i0 + r) * c + u * kWidth, o[r][u] / sum[r]);
  }
}

constexpr const char* kShapes = "64x32";  // (N, D) of attend_head's instances below

at::Tensor window_attention(const at::Tensor& qkv, const at::Tensor& bias, const at::Tensor& mask, int64_t heads,
                            double scale) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous() && qkv.is_cpu() &&
                  qkv.size(2) % (3 * heads) == 0,
              "window_attention: qkv must be a contiguous bfloat16 CPU tensor [B', N, 3*C], C a multiple of heads");
  const int64_t windows = qkv.size(0), n = qkv.size(1), c = qkv.size(2) / 3, d = c / heads;
  TORCH_CHECK(bias.dim() == 3 && bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.size(0) == heads &&
                  bias.size(1) == n && bias.size(2) == n,
              "window_attention: bias must be contiguous float32 [heads, N, N], got ", bias.sizes());
  const bool masked = mask.numel() > 0;
  TORCH_CHECK(!masked || (mask.dim() == 3 && mask.scalar_type() == at::kFloat && mask.is_contiguous() &&
                          mask.size(1) == n && mask.size(2) == n),
              "window_attention: mask must be empty or contiguous float32 [T, N, N], got ", mask.sizes());
  auto head = n == 64 && d == 32 ? attend_head<64, 32> : nullptr;
  TORCH_CHECK(head != nullptr, "window_attention: no instance for N = ", n, ", D = ", d, " (has ", kShapes, ")");
  at::Tensor out = at::empty({windows, n, c}, qkv.options());
  const bf16* src = qkv.data_ptr<at::BFloat16>();
  const float* bp = bias.data_ptr<float>();
  const float* mp = masked ? mask.data_ptr<float>() : nullptr;
  bf16* dst = out.data_ptr<at::BFloat16>();
  const int64_t terms = masked ? mask.size(0) : 1;
  at::parallel_for(0, windows * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads, h = item % heads;
      head(src + b * n * 3 * c + h * d, bp + h * n * n, masked ? mp + (b % terms) * n * n : nullptr, c,
           float(scale), dst + b * n * c + h * d);
    }
  });
  return out;
}

std::string window_attention_shapes() { return kShapes; }

}  // namespace
}  // namespace bimacosr

TORCH_LIBRARY_FRAGMENT(bimacosr, m) {
  m.def("window_attention(Tensor qkv, Tensor bias, Tensor mask, int heads, float scale) -> Tensor");
  m.impl("window_attention", c10::DispatchKey::CPU, TORCH_FN(bimacosr::window_attention));
  m.def("window_attention_shapes() -> str", &bimacosr::window_attention_shapes);
}
