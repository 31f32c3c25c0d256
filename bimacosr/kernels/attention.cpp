// Window attention of the Swin blocks under bf16 (docs/kernel.md §6): per window and head,
// softmax(q k^T * scale + term) v on bf16 pairs (vec.h's dot_pairs: vdpbf16ps with AVX512-BF16,
// written out in a test build), float32 logits, softmax and sums.
//
// bimacosr::window_attention(qkv [B', N, 3*C] bf16 (the qkv layer's output: q, k, v of each head
//   side by side), term [T, H, N, N] float32 (relative-position bias, plus the shift mask), heads,
//   scale) -> [B', N, C] bf16 (heads side by side, as the proj layer reads them); window b adds
//   term[b % T]. As PyTorch's CPU flash attention computes it for bf16: logits summed in float32,
//   the softmax's exponentials rounded to bf16 for the product with v, that product summed in
//   float32 and divided by the float32 sum of the exponentials, the result rounded to bf16.
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

typedef int32_t ivec __attribute__((vector_size(kWidth * 4)));

// exp(x) for x <= 0 (a logit minus its row's maximum), NaN kept: 2^(x log2 e) split into an integer
// n and f in [-1/2, 1/2], 2^f by a degree-6 polynomial (relative error ~2e-7), 2^n in the exponent
// bits; below -87.3 (2^-126) the result is the smallest normal times 2^f, as good as 0 in a softmax.
inline fvec exp_nonpositive(fvec x) {
  const fvec lowest = fvec{} - 87.3f;
  x = x < lowest ? lowest : x;
  const fvec t = x * 1.44269504088896341f;
  const fvec n = (t + 12582912.f) - 12582912.f;  // to the nearest integer (1.5 * 2^23)
  const fvec f = t - n;
  fvec p = fvec{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
  fvec two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// One window b and head h: N queries, keys and values of D dimensions.
template <int N, int D>
void attend_head(const bf16* qkv, const float* term, int64_t c, float scale, bf16* out) {
  constexpr int kKeyVecs = N / kWidth, kDimVecs = D / kWidth;
  static_assert(N % (2 * kWidth) == 0 && D % kWidth == 0 && D % 2 == 0, "N: whole pairs of vectors; D: whole vectors");
  const int64_t row = 3 * c;  // qkv's row: q, k, v of every head
  alignas(64) uint32_t kt[D / 2][N];  // kt[d2][j]: dimensions 2 d2, 2 d2 + 1 of key j
  alignas(64) uint32_t vp[N / 2][D];  // vp[j2][e]: dimension e of the two keys of pair j2
  for (int j = 0; j < N; ++j) {
    uint32_t words[D / 2];
    std::memcpy(words, qkv + j * row + c, sizeof words);
    for (int d2 = 0; d2 < D / 2; ++d2) kt[d2][j] = words[d2];
  }
  for (int j2 = 0; j2 < N / 2; ++j2) {  // pair j2 = w kWidth + l: keys 2 w kWidth + l and (2 w + 1) kWidth + l
    const int a = 2 * (j2 / kWidth) * kWidth + j2 % kWidth, b = a + kWidth;
    const bf16* va = qkv + a * row + 2 * c;
    const bf16* vb = qkv + b * row + 2 * c;
    for (int e = 0; e < D; ++e) vp[j2][e] = uint32_t(va[e].x) | uint32_t(vb[e].x) << 16;
  }
  for (int i = 0; i < N; ++i) {
    uint32_t q[D / 2];
    std::memcpy(q, qkv + i * row, sizeof q);
    fvec s[kKeyVecs] = {};
    for (int d2 = 0; d2 < D / 2; ++d2)
      for (int v = 0; v < kKeyVecs; ++v) s[v] = dot_pairs(s[v], loaduv(&kt[d2][v * kWidth]), q[d2]);
    fvec top = fvec{} - __builtin_inff();
    for (int v = 0; v < kKeyVecs; ++v) {
      s[v] = s[v] * scale + loadv(term + i * N + v * kWidth);
      top = top > s[v] ? top : s[v];
    }
    float m = top[0];
    for (int l = 1; l < kWidth; ++l) m = top[l] > m ? top[l] : m;
    fvec total = {};
    for (int v = 0; v < kKeyVecs; ++v) {
      s[v] = exp_nonpositive(s[v] - m);
      total += s[v];
    }
    float sum = 0.f;
    for (int l = 0; l < kWidth; ++l) sum += total[l];
    uint32_t p[N / 2];  // the exponentials as bf16 pairs, in vp's pairing
    for (int w = 0; w < kKeyVecs / 2; ++w) storeuv(p + w * kWidth, bf16_pairs(s[2 * w], s[2 * w + 1]));
    fvec o[kDimVecs] = {};
    for (int j2 = 0; j2 < N / 2; ++j2)
      for (int u = 0; u < kDimVecs; ++u) o[u] = dot_pairs(o[u], loaduv(&vp[j2][u * kWidth]), p[j2]);
    for (int u = 0; u < kDimVecs; ++u) store_lanes(out + i * c + u * kWidth, o[u] / sum);
  }
}

constexpr const char* kShapes = "64x32";  // (N, D) of attend_head's instances below

at::Tensor window_attention(const at::Tensor& qkv, const at::Tensor& term, int64_t heads, double scale) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kBFloat16 && qkv.is_contiguous() && qkv.is_cpu() &&
                  qkv.size(2) % (3 * heads) == 0,
              "window_attention: qkv must be a contiguous bfloat16 CPU tensor [B', N, 3*C], C a multiple of heads");
  const int64_t windows = qkv.size(0), n = qkv.size(1), c = qkv.size(2) / 3, d = c / heads;
  TORCH_CHECK(term.dim() == 4 && term.scalar_type() == at::kFloat && term.is_contiguous() && term.size(0) > 0 &&
                  term.size(1) == heads && term.size(2) == n && term.size(3) == n,
              "window_attention: term must be contiguous float32 [T, heads, N, N], got ", term.sizes());
  auto head = n == 64 && d == 32 ? attend_head<64, 32> : nullptr;
  TORCH_CHECK(head != nullptr, "window_attention: no instance for N = ", n, ", D = ", d, " (has ", kShapes, ")");
  at::Tensor out = at::empty({windows, n, c}, qkv.options());
  const bf16* src = qkv.data_ptr<at::BFloat16>();
  const float* tp = term.data_ptr<float>();
  bf16* dst = out.data_ptr<at::BFloat16>();
  const int64_t terms = term.size(0);
  at::parallel_for(0, windows * heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / heads, h = item % heads;
      head(src + b * n * 3 * c + h * d, tp + ((b % terms) * heads + h) * n * n, c, float(scale),
           dst + b * n * c + h * d);
    }
  });
  return out;
}

std::string window_attention_shapes() { return kShapes; }

}  // namespace
}  // namespace bimacosr

TORCH_LIBRARY_FRAGMENT(bimacosr, m) {
  m.def("window_attention(Tensor qkv, Tensor term, int heads, float scale) -> Tensor");
  m.impl("window_attention", c10::DispatchKey::CPU, TORCH_FN(bimacosr::window_attention));
  m.def("window_attention_shapes() -> str", &bimacosr::window_attention_shapes);
}
