// GroupNorm of a bf16 channels-last map, and the SiLU that follows it in the ResBlocks, in one op
// (docs/kernel.md §7).
//
// bimacosr::group_norm(x [N, C, H, W] bf16 channels-last, groups, weight [N, C] float32,
//   bias [N, C] float32, eps, silu) -> y, bf16 in x's shape and layout. Per image n and group g of
//   C / groups channels: mean m and variance v of the group's H·W·C/groups values (summed in double),
//   a = weight[n, c] / sqrt(v + eps), b = bias[n, c] - m·a, y = x·a + b in float32 rounded to bf16 (as
//   ATen's GroupNorm on bf16 computes it); with silu, then y / (1 + exp(-y)) in float32 from the
//   rounded y, rounded to bf16 again (as ATen's SiLU on that GroupNorm's output). The affine is per
//   image, so the ResBlocks' FiLM (weight·(1 + scale), bias·(1 + scale) + shift) folds into it.
//
// Two passes over x, each an at::parallel_for: the statistics, per task up to kChunk pixels of one image
// summed per channel in float32 (x - x[pixel 0] and its square: no cancellation of a large mean),
// added up per image in double; then y, pixel by pixel. A row whose channels are not whole vectors
// is read and written through a zero-padded copy, so every lane runs the same vector code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace bimacosr {
namespace {

constexpr int64_t kChunk = 64;  // pixels per statistics task at most: their float32 sums are added into double

// Row p of x [M, c] as whole vectors: x's own memory, or a copy in pad [kWidth * ceil(c / kWidth)]
// (zeros past c) when c is not a multiple of kWidth.
inline const bf16* padded_row(const bf16* x, int64_t p, int64_t c, bf16* pad) {
  if (c % kWidth == 0) return x + p * c;
  std::memcpy(pad, x + p * c, c * sizeof(bf16));
  return pad;
}

// The sums of d = x - origin and of d^2 over pixels [p0, p1) of one image, for the channels of the K
// vectors from vector v, in registers (float32: at most kChunk pixels), written to s[channel] and
// s[cp + channel].
template <int K>
__attribute__((always_inline)) inline void chunk_sums(const bf16* image, int64_t c, int64_t p0, int64_t p1,
                                                      int64_t v, const float* origin, bf16* pad, float* s, int64_t cp) {
  fvec o[K], a[K] = {}, q[K] = {};
  for (int k = 0; k < K; ++k) o[k] = loadv(origin + (v + k) * kWidth);
  for (int64_t p = p0; p < p1; ++p) {
    const bf16* row = padded_row(image, p, c, pad) + v * kWidth;
    for (int k = 0; k < K; ++k) {
      const fvec d = loadv(row + k * kWidth) - o[k];
      a[k] += d;
      q[k] += d * d;
    }
  }
  for (int k = 0; k < K; ++k)
    for (int64_t l = 0; l < kWidth; ++l) {
      s[(v + k) * kWidth + l] = a[k][l];
      s[cp + (v + k) * kWidth + l] = q[k][l];
    }
}

// K vectors of one row: x * scale + shift rounded to bf16, then (silu) y / (1 + exp(-y)) rounded
// again, each step on all K (independent chains: one vector's exp and division left the core
// waiting on their latency).
template <int K>
__attribute__((always_inline)) inline void normalize(const bf16* x, const float* scale, const float* shift, bool silu, bf16* out) {
  fvec y[K], e[K];
  for (int k = 0; k < K; ++k) y[k] = loadv(x + k * kWidth) * loadv(scale + k * kWidth) + loadv(shift + k * kWidth);
  if (silu) {
    for (int k = 0; k < K; ++k) {
      y[k] = rounded_bf16(y[k]);  // the GroupNorm's output as ATen's SiLU reads it
      e[k] = -y[k];
    }
    exp_lanes(e);
    for (int k = 0; k < K; ++k) y[k] = y[k] / (1.f + e[k]);
  }
  for (int k = 0; k < K; ++k) storev(out + k * kWidth, y[k]);
}

at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                      double eps, bool silu) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.is_cpu() &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "group_norm: x must be a channels-last bfloat16 CPU tensor [N, C, H, W], got ", x.sizes());
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  TORCH_CHECK(groups > 0 && c % groups == 0, "group_norm: ", c, " channels are not ", groups, " equal groups");
  for (const at::Tensor* t : {&weight, &bias})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == n &&
                    t->size(1) == c,
                "group_norm: weight and bias must be contiguous float32 [N, C] = [", n, ", ", c, "], got ",
                t->sizes());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  if (x.numel() == 0) return out;
  const int64_t cp = (c + kWidth - 1) / kWidth * kWidth;  // channels in whole vectors
  const bf16* src = x.data_ptr<at::BFloat16>();
  bf16* dst = out.data_ptr<at::BFloat16>();

  // per image: the origin (its pixel 0, zero padded) and the sums [parts, N, 2, cp] of each part of
  // the tasks (up to kChunk pixels of one image), one part per thread
  const int64_t threads = at::get_num_threads();
  const int64_t span = std::min(kChunk, std::max<int64_t>(8, (hw + threads - 1) / threads));  // small maps: every thread
  const int64_t chunks = (hw + span - 1) / span, tasks = n * chunks;
  const int64_t parts = std::min(threads, tasks);
  std::vector<float> origin(n * cp, 0.f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < c; ++k) origin[i * cp + k] = float(src[i * hw * c + k]);
  std::vector<double> sums(parts * n * 2 * cp, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> pad(cp);
    std::vector<float> chunk(2 * cp);
    for (int64_t part = begin; part < end; ++part)
      for (int64_t task = part * tasks / parts; task < (part + 1) * tasks / parts; ++task) {
        const int64_t i = task / chunks, p0 = task % chunks * span, p1 = std::min(hw, p0 + span);
        const bf16* image = src + i * hw * c;
        int64_t v = 0;
        for (; v + 8 <= cp / kWidth; v += 8) chunk_sums<8>(image, c, p0, p1, v, origin.data() + i * cp, pad.data(), chunk.data(), cp);
        for (; v + 2 <= cp / kWidth; v += 2) chunk_sums<2>(image, c, p0, p1, v, origin.data() + i * cp, pad.data(), chunk.data(), cp);
        for (; v < cp / kWidth; ++v) chunk_sums<1>(image, c, p0, p1, v, origin.data() + i * cp, pad.data(), chunk.data(), cp);
        double* s = sums.data() + (part * n + i) * 2 * cp;
        for (int64_t k = 0; k < 2 * cp; ++k) s[k] += chunk[k];
      }
  });

  // per image and channel: y = x * scale + shift (and pad lanes 0)
  const int64_t per_group = c / groups;
  std::vector<float> scale(n * cp, 0.f), shift(n * cp, 0.f);
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> s1(c, 0.0), s2(c, 0.0);
    for (int64_t part = 0; part < parts; ++part)
      for (int64_t ch = 0; ch < c; ++ch) {
        s1[ch] += sums[(part * n + i) * 2 * cp + ch];
        s2[ch] += sums[(part * n + i) * 2 * cp + cp + ch];
      }
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * per_group;
      const double count = double(hw) * per_group;
      double total = 0.0;  // sum over the group of x = sum_c (s1_c + hw * origin_c)
      for (int64_t ch = first; ch < first + per_group; ++ch) total += s1[ch] + hw * double(origin[i * cp + ch]);
      const double mean = total / count;
      double squares = 0.0;  // sum of (x - mean)^2 = sum_c s2_c + 2 (origin_c - mean) s1_c + hw (origin_c - mean)^2
      for (int64_t ch = first; ch < first + per_group; ++ch) {
        const double e = double(origin[i * cp + ch]) - mean;
        squares += s2[ch] + 2.0 * e * s1[ch] + hw * e * e;
      }
      const float rstd = float(1.0 / std::sqrt(std::max(squares / count, 0.0) + eps));
      for (int64_t ch = first; ch < first + per_group; ++ch) {
        const float a = w[i * c + ch] * rstd;
        scale[i * cp + ch] = a;
        shift[i * cp + ch] = b[i * c + ch] - float(mean) * a;
      }
    }
  }

  at::parallel_for(0, n * hw, std::max<int64_t>(1, 8192 / cp), [&](int64_t begin, int64_t end) {  // >= 8192 values a thread
    std::vector<bf16> pad(cp), res(cp);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t i = m / hw;
      const bf16* row = padded_row(src, m, c, pad.data());
      bf16* to = c % kWidth == 0 ? dst + m * c : res.data();
      int64_t c0 = 0;
      for (; c0 + 4 * kWidth <= cp; c0 += 4 * kWidth)
        normalize<4>(row + c0, scale.data() + i * cp + c0, shift.data() + i * cp + c0, silu, to + c0);
      for (; c0 < cp; c0 += kWidth)
        normalize<1>(row + c0, scale.data() + i * cp + c0, shift.data() + i * cp + c0, silu, to + c0);
      if (c % kWidth != 0) std::memcpy(dst + m * c, res.data(), c * sizeof(bf16));
    }
  });
  return out;
}

}  // namespace
}  // namespace bimacosr

TORCH_LIBRARY_FRAGMENT(bimacosr, m) {
  m.def("group_norm(Tensor x, int groups, Tensor weight, Tensor bias, float eps, bool silu) -> Tensor");
  m.impl("group_norm", c10::DispatchKey::CPU, TORCH_FN(bimacosr::group_norm));
}
