// Fused 1-bit CPU kernel of the BiMaCo deploy layers (docs/kernel.md).
// bimacosr::side_add(y [M, Cout], x [M, Cin], first_t, second_t, rows, cols, values): the LRMB and
//   SMB, y += x @ (S + second @ first)^T in place (see side_add below).
//
// bimacosr::binary_conv(x [B, H, W, Cin] float32 NHWC, wbits [T, Cout, Wd] int64,
//                       wmask [T, Cout, Wd] int64 or empty, alpha [Cout], shift [Cout],
//                       slope [Cout] or empty, beta1 [Cout] or empty, k, stride, padding)
//   -> y [B, Ho, Wo, Cout] float32 with
//   y[m, o] = epilogue(alpha[o] * sum_t s_t[m] * dot_t[m, o] + shift[o]),
//   epilogue = PReLU(slope) then + beta1 when slope is given (RPReLU), identity otherwise;
//   dot_t[m, o] = sum_c sign(x[pixel_t(m), c]) * sign(W[o, c, t]) computed on bits:
//   with P = sign bits (1 where > 0) and N = nonzero masks (1 where != 0),
//   dot = popcount(N) - 2 * popcount((P_x ^ P_w) & N),  N = N_x & N_w.
//   Padding taps (outside the image) contribute 0, as do pixels whose scale s = mean|x| is 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 8;  // output pixels sharing one pass over a weight row

// One pass over the rows of x [M, C]: sign bits, nonzero mask (both [M, Wd]), s = mean |x| and
// the nonzero count per row.
void pack_rows(const float* x, int64_t rows, int64_t c, int64_t words, uint64_t* bits,
               uint64_t* mask, float* scale, int32_t* nonzero) {
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = x + m * c;
      float total = 0.f;
      int32_t count = 0;
#ifdef __AVX2__
      __m256 acc = _mm256_setzero_ps();
      const __m256 zero = _mm256_setzero_ps(), minus0 = _mm256_set1_ps(-0.f);
#endif
      for (int64_t w = 0; w < words; ++w) {
        const int64_t c0 = w * 64, c1 = std::min(c, c0 + 64);
        uint64_t pos = 0, nz = 0;
        int64_t i = c0;
#ifdef __AVX2__
        for (; i + 8 <= c1; i += 8) {
          const __m256 v = _mm256_loadu_ps(row + i);
          acc = _mm256_add_ps(acc, _mm256_andnot_ps(minus0, v));
          pos |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)))) << (i - c0);
          nz |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_UQ)))) << (i - c0);
        }
#endif
        for (; i < c1; ++i) {
          const float v = row[i];
          total += std::abs(v);
          pos |= uint64_t(v > 0.f) << (i - c0);
          nz |= uint64_t(v != 0.f) << (i - c0);
        }
        bits[m * words + w] = pos;
        mask[m * words + w] = nz;
        count += __builtin_popcountll(nz);
      }
#ifdef __AVX2__
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, acc);
      for (float lane : lanes) total += lane;
#endif
      scale[m] = total / float(c);
      nonzero[m] = count;
    }
  });
}

template <bool kWeightZeros>
void gemm(const uint64_t* xbits, const uint64_t* xmask, const float* scale, const int32_t* nonzero,
          int64_t channels, const uint64_t* wbits, const uint64_t* wmask, const float* alpha,
          const float* shift, const float* slope, const float* beta1, float* out, int64_t batch,
          int64_t h, int64_t w, int64_t ho, int64_t wo, int64_t k, int64_t stride, int64_t pad,
          int64_t cout, int64_t words) {
  const int64_t taps = k * k, pixels = batch * ho * wo;
  const int64_t blocks = (pixels + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> src(taps * kBlock);  // input row of (tap, pixel), -1 where it adds 0
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t m0 = blk * kBlock, n = std::min(kBlock, pixels - m0);
      for (int64_t p = 0; p < n; ++p) {
        const int64_t m = m0 + p, b = m / (ho * wo), oy = (m / wo) % ho, ox = m % wo;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t iy = oy * stride - pad + t / k, ix = ox * stride - pad + t % k;
          int64_t row = -1;
          if (iy >= 0 && iy < h && ix >= 0 && ix < w) {
            row = (b * h + iy) * w + ix;
            if (scale[row] == 0.f) row = -1;
          }
          src[t * kBlock + p] = row;
        }
      }
      for (int64_t o = 0; o < cout; ++o) {
        float acc[kBlock] = {0.f};
        for (int64_t t = 0; t < taps; ++t) {
          const uint64_t* wb = wbits + (t * cout + o) * words;
          const uint64_t* wm = kWeightZeros ? wmask + (t * cout + o) * words : nullptr;
          for (int64_t p = 0; p < n; ++p) {
            const int64_t row = src[t * kBlock + p];
            if (row < 0) continue;
            const uint64_t* xb = xbits + row * words;
            const uint64_t* xm = xmask + row * words;
            int64_t valid = 0, differ = 0;
            if (kWeightZeros) {
              for (int64_t i = 0; i < words; ++i) {
                const uint64_t both = xm[i] & wm[i];
                valid += __builtin_popcountll(both);
                differ += __builtin_popcountll((xb[i] ^ wb[i]) & both);
              }
            } else if (nonzero[row] == channels) {  // no zero in this pixel: pad bits are 0 in both
              valid = channels;
              for (int64_t i = 0; i < words; ++i) differ += __builtin_popcountll(xb[i] ^ wb[i]);
            } else {
              valid = nonzero[row];
              for (int64_t i = 0; i < words; ++i)
                differ += __builtin_popcountll((xb[i] ^ wb[i]) & xm[i]);
            }
            acc[p] += scale[row] * float(valid - 2 * differ);
          }
        }
        for (int64_t p = 0; p < n; ++p) {
          float v = acc[p] * alpha[o] + shift[o];
          if (slope != nullptr) v = (v >= 0.f ? v : v * slope[o]) + beta1[o];
          out[(m0 + p) * cout + o] = v;
        }
      }
    }
  });
}

at::Tensor binary_conv(const at::Tensor& x, const at::Tensor& wbits, const at::Tensor& wmask,
                       const at::Tensor& alpha, const at::Tensor& shift, const at::Tensor& slope,
                       const at::Tensor& beta1, int64_t k, int64_t stride, int64_t pad) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.is_cpu(),
              "binary_conv: x must be a contiguous float32 CPU tensor [B, H, W, Cin]");
  TORCH_CHECK(wbits.dim() == 3 && wbits.scalar_type() == at::kLong && wbits.is_contiguous() &&
                  wbits.size(0) == k * k,
              "binary_conv: wbits must be contiguous int64 [k*k, Cout, Wd]");
  const int64_t batch = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  const int64_t cout = wbits.size(1), words = wbits.size(2);
  TORCH_CHECK(words == (c + 63) / 64, "binary_conv: ", words, " weight words for ", c, " channels");
  const bool weight_zeros = wmask.numel() > 0;
  TORCH_CHECK(!weight_zeros || (wmask.sizes() == wbits.sizes() && wmask.is_contiguous() &&
                                wmask.scalar_type() == at::kLong),
              "binary_conv: wmask must be empty or like wbits");
  for (const at::Tensor* v : {&alpha, &shift})
    TORCH_CHECK(v->numel() == cout && v->scalar_type() == at::kFloat && v->is_contiguous(),
                "binary_conv: alpha and shift must be contiguous float32 [Cout]");
  const bool rprelu = slope.numel() > 0;
  TORCH_CHECK(!rprelu || (slope.numel() == cout && beta1.numel() == cout && slope.is_contiguous() &&
                          beta1.is_contiguous() && slope.scalar_type() == at::kFloat &&
                          beta1.scalar_type() == at::kFloat),
              "binary_conv: slope and beta1 must be empty or contiguous float32 [Cout]");
  const int64_t ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
  TORCH_CHECK(ho > 0 && wo > 0, "binary_conv: empty output for input ", h, "x", w);

  const int64_t rows = batch * h * w;
  at::Tensor xbits = at::empty({rows, words}, x.options().dtype(at::kLong));
  at::Tensor xmask = at::empty({rows, words}, x.options().dtype(at::kLong));
  at::Tensor scale = at::empty({rows}, x.options());
  at::Tensor nonzero = at::empty({rows}, x.options().dtype(at::kInt));
  auto u64 = [](const at::Tensor& t) { return reinterpret_cast<uint64_t*>(t.data_ptr<int64_t>()); };
  pack_rows(x.data_ptr<float>(), rows, c, words, u64(xbits), u64(xmask), scale.data_ptr<float>(),
            nonzero.data_ptr<int32_t>());

  at::Tensor out = at::empty({batch, ho, wo, cout}, x.options());
  const float* slope_p = rprelu ? slope.data_ptr<float>() : nullptr;
  const float* beta1_p = rprelu ? beta1.data_ptr<float>() : nullptr;
  auto run = weight_zeros ? gemm<true> : gemm<false>;
  run(u64(xbits), u64(xmask), scale.data_ptr<float>(), nonzero.data_ptr<int32_t>(), c, u64(wbits),
      weight_zeros ? u64(wmask) : nullptr, alpha.data_ptr<float>(), shift.data_ptr<float>(),
      slope_p, beta1_p, out.data_ptr<float>(), batch, h, w, ho, wo, k, stride, pad, cout, words);
  return out;
}

// Side branches, in place: y [M, Cout] += x [M, Cin] @ (S + second @ first)^T, with the LRMB as
// first_t [Cin, r] and second_t [r, Cout] (both empty: none) and the SMB S as (rows = output,
// cols = input, values), each [n] (empty: none; duplicates add up).
void side_add(const at::Tensor& y, const at::Tensor& x, const at::Tensor& first_t,
              const at::Tensor& second_t, const at::Tensor& rows, const at::Tensor& cols,
              const at::Tensor& values) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(0) == x.size(0) && y.is_contiguous() &&
                  x.is_contiguous() && y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "side_add: y [M, Cout] and x [M, Cin] must be contiguous float32");
  const int64_t m = x.size(0), cin = x.size(1), cout = y.size(1), n = values.numel();
  const int64_t rank = first_t.numel() ? first_t.size(1) : 0;
  TORCH_CHECK(rank == 0 || (first_t.sizes() == at::IntArrayRef({cin, rank}) &&
                            second_t.sizes() == at::IntArrayRef({rank, cout}) &&
                            first_t.is_contiguous() && second_t.is_contiguous() &&
                            first_t.scalar_type() == at::kFloat && second_t.scalar_type() == at::kFloat),
              "side_add: first_t [Cin, r] and second_t [r, Cout] must be contiguous float32");
  TORCH_CHECK(n == 0 || (rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong &&
                         values.scalar_type() == at::kFloat && rows.numel() == n &&
                         cols.numel() == n && rows.is_contiguous() && cols.is_contiguous() &&
                         values.is_contiguous()),
              "side_add: rows, cols int64 and values float32, contiguous, of one length");
  const int64_t* r = n ? rows.data_ptr<int64_t>() : nullptr;
  const int64_t* c = n ? cols.data_ptr<int64_t>() : nullptr;
  const float* v = n ? values.data_ptr<float>() : nullptr;
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK(r[j] >= 0 && r[j] < cout && c[j] >= 0 && c[j] < cin, "side_add: index out of range");
  const float* f = rank ? first_t.data_ptr<float>() : nullptr;
  const float* s = rank ? second_t.data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> low(rank);
    for (int64_t i = begin; i < end; ++i) {
      const float* xi = xp + i * cin;
      float* yi = yp + i * cout;
      std::fill(low.begin(), low.end(), 0.f);
      for (int64_t j = 0; j < cin; ++j)  // over the rank innermost: vectorizes (r = 8: one AVX2 register)
        for (int64_t q = 0; q < rank; ++q) low[q] += f[j * rank + q] * xi[j];
      for (int64_t q = 0; q < rank; ++q)
        for (int64_t o = 0; o < cout; ++o) yi[o] += low[q] * s[q * cout + o];
      for (int64_t j = 0; j < n; ++j) yi[r[j]] += v[j] * xi[c[j]];
    }
  });
}

}  // namespace

TORCH_LIBRARY(bimacosr, m) {
  m.def("binary_conv(Tensor x, Tensor wbits, Tensor wmask, Tensor alpha, Tensor shift, "
        "Tensor slope, Tensor beta1, int k, int stride, int padding) -> Tensor");
  m.def("side_add(Tensor(a!) y, Tensor x, Tensor first_t, Tensor second_t, Tensor rows, Tensor cols, "
        "Tensor values) -> ()");
}

TORCH_LIBRARY_IMPL(bimacosr, CPU, m) {
  m.impl("binary_conv", &binary_conv);
  m.impl("side_add", &side_add);
}
