// Fused 1-bit CPU kernel of the BiMaCo deploy layers (docs/kernel.md).
//
// bimacosr::binary_conv(x [B, H, W, Cin] float32 or bfloat16 NHWC, wbits [T, OB, Wd, 16] int64,
//                       wmask like wbits or empty, cout, alpha [Cout], shift [Cout],
//                       slope [Cout] or empty, beta1 [Cout] or empty,
//                       first_t [Cin, r8] or empty, second_t [r8, OB*16] or empty (r8: the
//                       LRMB rank rounded up to a multiple of 8, zero padded),
//                       smb_rowptr [OB*16+1] or empty, smb_cols [n], smb_vals [n], k, stride, padding)
//   -> y [B, Ho, Wo, Cout] in x's dtype (computed in float32; bf16 rounded as torch rounds) with
//   y[m, o] = epilogue(alpha[o] * sum_t s_t[m] * dot_t[m, o] + shift[o]) + side[m, o],
//   epilogue = PReLU(slope) then + beta1 when slope is given (RPReLU), identity otherwise;
//   side = (x[m] @ first_t) @ second_t[:, o] (LRMB) + sum_u x[m, smb_cols[u]] * smb_vals[u] over
//   u in smb_rowptr[o]..smb_rowptr[o+1] (SMB, CSR by output channel), both on the input pixel m
//   itself (only when Ho == H and Wo == W). The SMB runs on a transposed copy of x in tiles of
//   kPixels pixels, one FMA per nonzero for a vector of pixels (not per pixel), then transposed back;
//   dot_t[m, o] = sum_c sign(x[pixel_t(m), c]) * sign(W[o, c, t]) computed on bits:
//   with P = sign bits (1 where > 0) and N = nonzero masks (1 where != 0),
//   dot = popcount(N) - 2 * popcount((P_x ^ P_w) & N),  N = N_x & N_w.
//   Padding taps (outside the image) contribute 0, as do pixels whose scale s = mean|x| is 0.
//   A bf16 x with dot_pairs (AVX512-BF16): the LRMB with first_t, second_t and x @ first_t rounded
//   to bf16, the SMB with smb_vals rounded to bf16 (kPairs).
//
// bimacosr::path() -> the popcount this build uses (AVX-512 VPOPCNTDQ, AVX2 table, portable).
// bimacosr::side_pairs() -> how bf16 side branches multiply bf16 pairs ("AVX512-BF16", the test
// build's "written out"), "" where they run in float32.
//
// The popcount paths and the micro-kernel are in popcount.h, shared with the bound probe
// (bound.cpp); the side branches' tiles in side.h; vector types and bf16 loads/stores in vec.h.
//
// Weights come in blocks of 16 output channels, the 16 words of one block and input word
// adjacent (wbits[t, ob, i, lane]), lanes in the order kLaneOrder so that the AVX2 path's
// 64-bit popcount lanes interleave into 32-bit lanes in natural output order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "popcount.h"
#include "side.h"

namespace bimacosr {
namespace {

// One pass over the rows of x [M, C]: sign bits, nonzero mask (both [M, Wd]), s = mean |x| and
// the nonzero count per row. The |x| sums run in two vectors of kWidth lanes (two chains of
// additions), channel c in vector (c / kWidth) % 2 up to the last whole pair of vectors, in the first
// after it; their lanes added in order at the end (bf16 and float32 rows alike: the same s for the
// same values).
template <class T>  // float or bf16
void pack_rows(const T* x, int64_t rows, int64_t c, int64_t words, uint64_t* bits,
               uint64_t* mask, float* scale, int32_t* nonzero) {
  // by rows of at least 8192 values a thread: the deep levels' 64 wide rows went to one thread
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / c), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * c;
      float total = 0.f;
      int32_t count = 0;
      fvec acc[2] = {};
      for (int64_t w = 0; w < words; ++w) {
        const int64_t c0 = w * 64, c1 = std::min(c, c0 + 64);
        uint64_t pos = 0, nz = 0;
        int64_t i = c0;
#if defined(__AVX512BW__)
        if constexpr (std::is_same_v<T, bf16>)
          for (; i + 32 <= c1; i += 32) {  // the bits from 32 bf16 patterns at once, the sum as below
            const __m512i h = _mm512_loadu_si512(row + i);  // > 0: sign clear, not 0, not NaN (> 0x7F80)
            const uint64_t p = _mm512_cmpgt_epi16_mask(h, _mm512_setzero_si512()) &
                               _mm512_cmplt_epi16_mask(h, _mm512_set1_epi16(0x7F81));
            pos |= p << (i - c0);
            nz |= uint64_t(_mm512_test_epi16_mask(h, _mm512_set1_epi16(0x7FFF))) << (i - c0);  // != 0: NaN too
            acc[0] += abs_lanes(loadv(row + i));
            acc[1] += abs_lanes(loadv(row + i + kWidth));
          }
#endif
#ifdef __AVX2__
        for (; i + 2 * kWidth <= c1; i += 2 * kWidth)  // pairs of vectors, then one more
          for (int h = 0; h < 2; ++h) {
            const fvec v = loadv(row + i + kWidth * h);
            acc[h] += abs_lanes(v);
            pos |= bits_against_zero<_CMP_GT_OQ>(v) << (i + kWidth * h - c0);
            nz |= bits_against_zero<_CMP_NEQ_UQ>(v) << (i + kWidth * h - c0);
          }
        for (; i + kWidth <= c1; i += kWidth) {
          const fvec v = loadv(row + i);
          acc[0] += abs_lanes(v);
          pos |= bits_against_zero<_CMP_GT_OQ>(v) << (i - c0);
          nz |= bits_against_zero<_CMP_NEQ_UQ>(v) << (i - c0);
        }
#endif
        for (; i < c1; ++i) {
          const float v = float(row[i]);
          total += std::abs(v);
          pos |= uint64_t(v > 0.f) << (i - c0);
          nz |= uint64_t(v != 0.f) << (i - c0);
        }
        bits[m * words + w] = pos;
        mask[m * words + w] = nz;
        count += __builtin_popcountll(nz);
      }
      for (int64_t j = 0; j < kWidth; ++j) total += acc[0][j] + acc[1][j];
      scale[m] = total / float(c);
      nonzero[m] = count;
    }
  });
}

// dots[o] (o = 0..15, natural order) of one (input pixel, tap, weight block) whose weights have
// zeros: with the activation's nonzero mask xm and the weight's wm (the rare case: a latent weight
// exactly 0), dot = popcount(N) - 2 * popcount((P_x ^ P_w) & N), N = xm & wm.
__attribute__((noinline))  // out of line: the hot loop keeps its registers
void tap_masked(const uint64_t* xb, const uint64_t* xm, const uint64_t* wb, const uint64_t* wm,
                int64_t words, int32_t* dots) {
  int32_t valid[kLanes] = {}, differ[kLanes] = {};
  for (int64_t i = 0; i < words; ++i)
    for (int64_t j = 0; j < kLanes; ++j) {
      const uint64_t both = xm[i] & wm[i * kLanes + j];
      valid[j] += __builtin_popcountll(both);
      differ[j] += __builtin_popcountll((xb[i] ^ wb[i * kLanes + j]) & both);
    }
  for (int64_t j = 0; j < kLanes; ++j) dots[kLaneOrder[j]] = valid[j] - 2 * differ[j];
}

// At least n elements of v, grown (never shrunk) as needed: a thread's scratch kept between calls.
template <class E>
E* scratch(std::vector<E>& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(n);
  return v.data();
}

struct Epilogue {  // per output channel, padded to OB*16 (slope, beta1: zeros without RPReLU, gemm's kRPReLU)
  std::vector<float> alpha, shift, slope, beta1;
};

struct Problem {  // one call: the packed input, the weights and the output geometry
  const uint64_t *xbits, *xmask, *wbits, *wmask;  // wmask: null without weight zeros
  const uint8_t* block_zeros;  // with wmask: per weight block, whether it has a weight zero
  const float* scale;
  const int32_t* nonzero;
  int32_t channels;
  int64_t batch, h, w, ho, wo, k, stride, pad, cout, words;
};

// The kRows input rows under one tap of kRows consecutive output pixels, as the micro-kernel takes
// them: words and nonzero masks (all ones for a row without zeros: no mask needed); with the row's
// scale s and nonzero count (dot = valid - 2 * differ), s * dot = s * valid - 2 s * differ: the
// first term, the same for every output channel, is summed over the taps once per pixel (gemm), the
// second weighs the counts (`m2s` = -2 s). A padding tap or a row with s = 0 is a zero row adding
// 0. `src` points at the first pixel's entry of the (pixel, tap) list, `taps` apart.
struct TapRows {
  const uint64_t *x[kRows], *xm[kRows];
  float m2s[kRows], s_valid[kRows];
  bool any = false, masked = false;  // some row adds, some row has zeros

  TapRows() = default;
  TapRows(const Problem& p, const int32_t* src, int64_t taps, const uint64_t* zero_row, const uint64_t* ones_row) {
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = src[r * taps];
      x[r] = zero_row, xm[r] = ones_row, m2s[r] = s_valid[r] = 0.f;
      if (row < 0) continue;
      const float s = p.scale[row];
      const int32_t valid = p.nonzero[row];
      x[r] = p.xbits + row * p.words, m2s[r] = -2.f * s, s_valid[r] = s * float(valid);
      if (valid != p.channels) xm[r] = p.xmask + row * p.words, masked = true;
      any = true;
    }
  }
};

// Whether each of the `blocks` weight blocks has a weight zero: a clear bit of wmask [taps, blocks,
// words, 16] (lanes in kLaneOrder) among the real input and output channels.
std::vector<uint8_t> blocks_with_zeros(const uint64_t* wmask, int64_t taps, int64_t blocks, int64_t words,
                                       int64_t cin, int64_t cout) {
  std::vector<uint8_t> zeros(blocks, 0);
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t blk = 0; blk < blocks; ++blk)
      for (int64_t i = 0; i < words; ++i) {
        const int64_t bits = std::min<int64_t>(64, cin - 64 * i);
        const uint64_t full = bits == 64 ? ~uint64_t(0) : (uint64_t(1) << bits) - 1;
        const uint64_t* w = wmask + ((t * blocks + blk) * words + i) * kLanes;
        for (int64_t j = 0; j < kLanes; ++j)
          if (blk * kLanes + kLaneOrder[j] < cout && (w[j] & full) != full) zeros[blk] = 1;
      }
  return zeros;
}

// The output rows [B*Ho*Wo, Cout]: in tasks of kPixels output pixels x task_group weight blocks; per
// kRows pixels and block, 16 accumulators each over the taps (the pixels' rows through the
// micro-kernel together, masked where one has zeros; a block with weight zeros per pixel through
// tap_masked), then the epilogue and side branches. kWeightZeros: the layer has weight zeros
// (compiled apart, so that the usual layer's loop has no masked branch); kRPReLU: the epilogue has
// RPReLU (the convs; compiled apart, so that a linear's loop holds two epilogue vectors, not four).
template <bool kWeightZeros, bool kRPReLU, class T>
void gemm(const Problem& pr, const Epilogue& ep, const Side<T>& side, T* out) {
  const int64_t taps = pr.k * pr.k, pixels = pr.batch * pr.ho * pr.wo;
  const int64_t blocks = (pr.cout + kLanes - 1) / kLanes, words = pr.words;
  const int64_t chunks = (pixels + kPixels - 1) / kPixels;
  // A task sets up its rows and, with side branches, transposes its pixels' inputs (`tile`) and
  // applies the LRMB's first factor: for as many blocks as the threads allow (task_group).
  const int64_t group = task_group(chunks, blocks, at::get_num_threads());
  const int64_t groups = (blocks + group - 1) / group;
  const int64_t tap_stride = blocks * words * kLanes;
  // The input row of each (output pixel, tap), -1 where it adds 0 (padding, or s = 0); pixels
  // past the last padded to a whole task.
  std::vector<int32_t> sources(chunks * kPixels * taps, -1);
  at::parallel_for(0, pr.batch * pr.ho, 16, [&](int64_t begin, int64_t end) {  // by output row
    for (int64_t line = begin; line < end; ++line) {
      const int64_t b = line / pr.ho, oy = line % pr.ho;
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t iy = oy * pr.stride - pr.pad + t / pr.k, dx = t % pr.k - pr.pad;
        if (iy < 0 || iy >= pr.h) continue;
        const int64_t first = (b * pr.h + iy) * pr.w;
        for (int64_t ox = 0, m = line * pr.wo; ox < pr.wo; ++ox, ++m) {
          const int64_t ix = ox * pr.stride + dx;
          if (ix >= 0 && ix < pr.w && pr.scale[first + ix] != 0.f) sources[m * taps + t] = int32_t(first + ix);
        }
      }
    }
  });
  const int64_t tasks = chunks * groups;
  constexpr int64_t per = kPairs<T> ? 2 : 1;  // channels / ranks per tile element
  const int64_t tile_len = side.any() ? (side.cin + per - 1) / per * kPixels : 0, lowt_len = side.rank / per * kPixels;
  auto side_tiles = [&](int64_t m0, TileElem<T>* tile, TileElem<T>* lowt) {  // x^T and low^T of one chunk
    const int64_t n = std::min(kPixels, pixels - m0);
    if constexpr (kPairs<T>)
      transpose_pairs(side.x + m0 * side.cin, n, side.cin, tile);
    else
      transpose_tile(side.x + m0 * side.cin, n, side.cin, tile);
    if (side.rank) lowrank_tile(tile, side.cin, side.first, side.rank, lowt);
  };
  // With several tasks per chunk (few pixels: the 8² level, the time embedding), each chunk's
  // tiles are made once, before the tasks, and shared; otherwise each task makes its chunk's.
  const bool shared = side.any() && groups > 1;
  std::vector<TileElem<T>> shared_tiles(shared ? chunks * tile_len : 0), shared_lowts(shared ? chunks * lowt_len : 0);
  if (shared)
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c)
        side_tiles(c * kPixels, shared_tiles.data() + c * tile_len, shared_lowts.data() + c * lowt_len);
    });
  parallel_tasks(tasks, [&](const auto& next) {
    const Problem p = pr;  // locals: no reloads through the captured reference
    const Side<T> sd = side;
    // x^T and low^T: each thread's, kept from call to call (written whole before they are read)
    static thread_local std::vector<TileElem<T>> tile_store, lowt_store;
    TileElem<T>* own_tile = scratch(tile_store, shared ? 0 : tile_len);
    TileElem<T>* own_lowt = scratch(lowt_store, shared ? 0 : lowt_len);
    const std::vector<uint64_t> zero_row(words, 0), ones_row(words, ~uint64_t(0));  // a row adding 0; no mask
    alignas(64) int32_t dots[kLanes];
    alignas(64) T tail[kRows][kLanes];  // the last block's outputs
    alignas(64) float side_out[kPixels * kLanes];  // the side branches of one block [pixel, lane]
    std::vector<TapRows> tap_rows(kPixels / kRows * taps);
    alignas(64) float s_valid[kPixels];  // sum_t s_t * valid_t of each pixel (TapRows)
    const flanes zero = {};
    for (int64_t task; (task = next()) < tasks;) {
      const int64_t m0 = (task / groups) * kPixels, n = std::min(kPixels, pixels - m0);
      const int64_t b0 = (task % groups) * group, b1 = std::min(blocks, b0 + group);
      const TileElem<T>* tile = shared ? shared_tiles.data() + m0 / kPixels * tile_len : own_tile;
      const TileElem<T>* lowt = shared ? shared_lowts.data() + m0 / kPixels * lowt_len : own_lowt;
      if (sd.any() && !shared) side_tiles(m0, own_tile, own_lowt);
      const int32_t* src = sources.data() + m0 * taps;
      for (int64_t q0 = 0; q0 < n; q0 += kRows) {  // the rows of each (pixel group, tap), for every block
        std::fill(s_valid + q0, s_valid + q0 + kRows, 0.f);
        for (int64_t t = 0; t < taps; ++t) {
          const TapRows& rs = tap_rows[q0 / kRows * taps + t] =
              TapRows(p, src + q0 * taps + t, taps, zero_row.data(), ones_row.data());
          for (int r = 0; r < kRows; ++r) s_valid[q0 + r] += rs.s_valid[r];
        }
      }
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t o0 = blk * kLanes;
        const bool zeros = kWeightZeros && p.block_zeros[blk];
        if (sd.any())
          side_block(sd, tile, lowt, blocks * kLanes, o0, side_out);
        flanes alpha[kHalves], shift[kHalves], slope[kHalves], beta1[kHalves];  // the block's, in registers
        for (int h = 0; h < kHalves; ++h) {
          const int64_t o = o0 + kOut * h;
          alpha[h] = load_lanes<flanes>(ep.alpha.data() + o), shift[h] = load_lanes<flanes>(ep.shift.data() + o);
          slope[h] = kRPReLU ? load_lanes<flanes>(ep.slope.data() + o) : zero;
          beta1[h] = kRPReLU ? load_lanes<flanes>(ep.beta1.data() + o) : zero;
        }
        for (int64_t q0 = 0; q0 < n; q0 += kRows) {
          flanes acc[kRows][kHalves];  // the 16 outputs of each pixel (popcount.h)
          for (int r = 0; r < kRows; ++r)
            for (int h = 0; h < kHalves; ++h) acc[r][h] = flanes{} + (zeros ? 0.f : s_valid[q0 + r]);
          for (int64_t t = 0; t < taps; ++t) {
            const uint64_t* wb = p.wbits + t * tap_stride + blk * words * kLanes;
            if (zeros) {  // per pixel, each with its own mask and the weights' (tap_masked)
              const uint64_t* wm = p.wmask + t * tap_stride + blk * words * kLanes;
              for (int r = 0; r < kRows; ++r) {
                const int64_t row = src[(q0 + r) * taps + t];
                if (row < 0) continue;
                tap_masked(p.xbits + row * words, p.xmask + row * words, wb, wm, words, dots);
                ilanes d[kHalves];
                std::memcpy(d, dots, sizeof d);
                for (int h = 0; h < kHalves; ++h) acc[r][h] += p.scale[row] * __builtin_convertvector(d[h], flanes);
              }
              continue;
            }
            const TapRows& rs = tap_rows[q0 / kRows * taps + t];
            if (!rs.any) continue;
            ilanes differ[kRows][kHalves];
            if (rs.masked)
              xor_popcount<kRows, true>(rs.x, rs.xm, wb, words, differ);
            else
              xor_popcount<kRows>(rs.x, rs.xm, wb, words, differ);
            for (int r = 0; r < kRows; ++r)
              for (int h = 0; h < kHalves; ++h)
                acc[r][h] += rs.m2s[r] * __builtin_convertvector(differ[r][h], flanes);
          }
#pragma GCC unroll 8  // constant indices into acc, which then stays in registers over the taps
          for (int r = 0; r < kRows; ++r) {
            if (q0 + r >= n) break;
            T* y = p.cout - o0 >= kLanes ? out + (m0 + q0 + r) * p.cout + o0 : tail[r];
            for (int h = 0; h < kHalves; ++h) {
              flanes v = acc[r][h] * alpha[h] + shift[h];
              if constexpr (kRPReLU)  // PReLU then beta1, branch-free: max(v, 0) + slope * min(v, 0)
                v = (v > zero ? v : zero) + slope[h] * (v < zero ? v : zero) + beta1[h];
              if (sd.any()) v += load_lanes<flanes>(side_out + (q0 + r) * kLanes + kOut * h);
              store_lanes(y + kOut * h, v);
            }
          }
          if (p.cout - o0 < kLanes)  // the last block's outputs, rounded as the others; after the rows,
            for (int64_t r = 0; r < kRows && q0 + r < n; ++r)  // so that no call holds `acc` in memory
              std::memcpy(out + (m0 + q0 + r) * p.cout + o0, tail[r], (p.cout - o0) * sizeof(T));
        }
      }
    }
  });
}

std::vector<float> padded(const at::Tensor& v, int64_t n) {
  std::vector<float> out(n, 0.f);
  if (v.numel()) std::copy(v.data_ptr<float>(), v.data_ptr<float>() + v.numel(), out.begin());
  return out;
}

at::Tensor binary_conv(const at::Tensor& x, const at::Tensor& wbits, const at::Tensor& wmask,
                       int64_t cout, const at::Tensor& alpha, const at::Tensor& shift,
                       const at::Tensor& slope, const at::Tensor& beta1, const at::Tensor& first_t,
                       const at::Tensor& second_t, const at::Tensor& smb_rowptr,
                       const at::Tensor& smb_cols, const at::Tensor& smb_vals, int64_t k,
                       int64_t stride, int64_t pad) {
  const bool half = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 4 && (x.scalar_type() == at::kFloat || half) && x.is_contiguous() && x.is_cpu(),
              "binary_conv: x must be a contiguous float32 or bfloat16 CPU tensor [B, H, W, Cin]");
  const int64_t batch = x.size(0), h = x.size(1), w = x.size(2), c = x.size(3);
  const int64_t words = (c + 63) / 64, blocks = (cout + kLanes - 1) / kLanes;
  TORCH_CHECK(wbits.scalar_type() == at::kLong && wbits.is_contiguous() &&
                  wbits.sizes() == at::IntArrayRef({k * k, blocks, words, kLanes}),
              "binary_conv: wbits must be contiguous int64 [k*k, ceil(Cout/16), ceil(Cin/64), 16], got ",
              wbits.sizes());
  const bool weight_zeros = wmask.numel() > 0;
  TORCH_CHECK(!weight_zeros || (wmask.sizes() == wbits.sizes() && wmask.is_contiguous() &&
                                wmask.scalar_type() == at::kLong),
              "binary_conv: wmask must be empty or like wbits");
  const bool rprelu = slope.numel() > 0;
  for (const at::Tensor* v : {&alpha, &shift, &slope, &beta1})
    TORCH_CHECK(v->scalar_type() == at::kFloat && v->is_contiguous() &&
                    (v->numel() == cout || (v->numel() == 0 && (v == &slope || v == &beta1))),
                "binary_conv: alpha, shift (and slope, beta1 when given) must be contiguous float32 [Cout]");
  TORCH_CHECK(beta1.numel() == slope.numel(), "binary_conv: slope and beta1 go together");
  const int64_t ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
  TORCH_CHECK(ho > 0 && wo > 0, "binary_conv: empty output for input ", h, "x", w);

  const int64_t rows = batch * h * w, rank = first_t.numel() ? first_t.size(1) : 0;
  TORCH_CHECK(rows < (int64_t(1) << 31), "binary_conv: more than 2^31 input pixels");
  const int64_t nnz = smb_cols.numel();
  const bool has_smb = smb_rowptr.numel() > 0;
  TORCH_CHECK(!(rank || has_smb) || (ho == h && wo == w),
              "binary_conv: side branches need an output as large as the input");
  TORCH_CHECK(rank == 0 || (rank % 8 == 0 && first_t.sizes() == at::IntArrayRef({c, rank}) &&
                            second_t.sizes() == at::IntArrayRef({rank, blocks * kLanes}) &&
                            first_t.is_contiguous() && second_t.is_contiguous() &&
                            first_t.scalar_type() == at::kFloat && second_t.scalar_type() == at::kFloat),
              "binary_conv: first_t [Cin, r8] and second_t [r8, ceil(Cout/16)*16] (r8 a multiple of 8) "
              "must be contiguous float32");
  TORCH_CHECK(!has_smb || (smb_rowptr.numel() == blocks * kLanes + 1 && smb_rowptr.scalar_type() == at::kLong &&
                           smb_cols.scalar_type() == at::kLong && smb_vals.scalar_type() == at::kFloat &&
                           smb_vals.numel() == nnz && smb_rowptr.is_contiguous() &&
                           smb_cols.is_contiguous() && smb_vals.is_contiguous()),
              "binary_conv: SMB rowptr int64 [ceil(Cout/16)*16+1], cols int64 [n] and vals float32 [n], contiguous");
  if (has_smb) {
    const int64_t* rp = smb_rowptr.data_ptr<int64_t>();
    const int64_t* cl = smb_cols.data_ptr<int64_t>();
    TORCH_CHECK(rp[0] == 0 && rp[blocks * kLanes] == nnz, "binary_conv: SMB rowptr does not cover the nonzeros");
    for (int64_t o = 0; o < blocks * kLanes; ++o) TORCH_CHECK(rp[o] <= rp[o + 1], "binary_conv: SMB rowptr decreases");
    for (int64_t u = 0; u < nnz; ++u) TORCH_CHECK(cl[u] >= 0 && cl[u] < c, "binary_conv: SMB column out of range");
  }

  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor xbits = at::empty({rows, words}, x.options().dtype(at::kLong));
  at::Tensor xmask = at::empty({rows, words}, x.options().dtype(at::kLong));
  at::Tensor scale = at::empty({rows}, f32);
  at::Tensor nonzero = at::empty({rows}, x.options().dtype(at::kInt));
  at::Tensor out = at::empty({batch, ho, wo, cout}, x.options());  // x's dtype
  auto u64 = [](const at::Tensor& t) { return reinterpret_cast<uint64_t*>(t.data_ptr<int64_t>()); };
  const int64_t lanes = blocks * kLanes;
  const Epilogue ep{padded(alpha, lanes), padded(shift, lanes), padded(slope, lanes), padded(beta1, lanes)};
  const std::vector<uint8_t> block_zeros =
      weight_zeros ? blocks_with_zeros(u64(wmask), k * k, blocks, words, c, cout) : std::vector<uint8_t>();
  const Problem problem{u64(xbits), u64(xmask), u64(wbits), weight_zeros ? u64(wmask) : nullptr, block_zeros.data(),
                        scale.data_ptr<float>(), nonzero.data_ptr<int32_t>(), int32_t(c), batch, h, w,
                        ho, wo, k, stride, pad, cout, words};
  auto run = [&](const auto* xp, auto* yp) {  // float or bf16 in and out
    using T = std::remove_pointer_t<decltype(yp)>;
    pack_rows(xp, rows, c, words, u64(xbits), u64(xmask), scale.data_ptr<float>(),
              nonzero.data_ptr<int32_t>());
    Side<T> side;
    side.x = xp;
    side.cin = c;
    std::vector<uint32_t> first2, second2, vals2;  // the factors and SMB values as bf16 pairs (kPairs)
    if (rank) {
      if constexpr (kPairs<T>) {
        first2 = row_pairs(first_t.data_ptr<float>(), c, rank);
        second2 = row_pairs(second_t.data_ptr<float>(), rank, blocks * kLanes);
        side.first = first2.data(), side.second = second2.data();
      } else {
        side.first = first_t.data_ptr<float>(), side.second = second_t.data_ptr<float>();
      }
      side.rank = rank;
    }
    if (has_smb) {
      side.rowptr = smb_rowptr.data_ptr<int64_t>();
      side.cols = smb_cols.data_ptr<int64_t>();
      side.vals = smb_vals.data_ptr<float>();
      if constexpr (kPairs<T>) {
        const int64_t* cols = smb_cols.data_ptr<int64_t>();
        vals2.resize(nnz);
        for (int64_t u = 0; u < nnz; ++u) vals2[u] = uint32_t(bf16(side.vals[u]).x) << (16 * (cols[u] & 1));
        side.val_pairs = vals2.data();
      }
    }
    (weight_zeros ? (rprelu ? gemm<true, true, T> : gemm<true, false, T>)
                  : (rprelu ? gemm<false, true, T> : gemm<false, false, T>))(problem, ep, side, yp);
  };
  if (half)
    run(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  else
    run(x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

std::string path() { return kPath; }

std::string side_pairs() { return kDotPairs; }

}  // namespace
}  // namespace bimacosr

TORCH_LIBRARY(bimacosr, m) {
  m.def("path() -> str", &bimacosr::path);  // which popcount this build uses
  m.def("side_pairs() -> str", &bimacosr::side_pairs);  // how bf16 side branches multiply pairs ("": float32)
  m.def("binary_conv(Tensor x, Tensor wbits, Tensor wmask, int cout, Tensor alpha, Tensor shift, "
        "Tensor slope, Tensor beta1, Tensor first_t, Tensor second_t, Tensor smb_rowptr, "
        "Tensor smb_cols, Tensor smb_vals, int k, int stride, int padding) -> Tensor");
}

TORCH_LIBRARY_IMPL(bimacosr, CPU, m) {
  m.impl("binary_conv", &bimacosr::binary_conv);
}
