// The side branches (LRMB and SMB) of the fused kernel (binary.cpp) on tiles of kPixels pixels:
// the tile's inputs transposed, the LRMB's first factor on them, and both branches of one weight
// block computed per output lane over the pixels, then transposed back (docs/kernel.md §1 step 3);
// a bf16 layer's in bf16 pairs where dot_pairs is an instruction (§4).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "popcount.h"

namespace bimacosr {
namespace {  // internal linkage, as binary.cpp's own functions: GCC inlines and specializes them alike

// One tile of rows transposed: xt[c][q] = x[q, c] for the n <= kPixels rows at x, zeros past n.
template <class T>
void transpose_tile(const T* x, int64_t n, int64_t c, float* xt) {
  int64_t c0 = 0;
  for (; c0 + 8 <= c; c0 += 8)
    for (int64_t q0 = 0; q0 < kPixels; q0 += 8) {
      f32x8 r[8];
      for (int64_t i = 0; i < 8; ++i) r[i] = q0 + i < n ? load8(x + (q0 + i) * c + c0) : f32x8{};
      transpose8(r);
      for (int64_t j = 0; j < 8; ++j) store8(xt + (c0 + j) * kPixels + q0, r[j]);
    }
  for (; c0 < c; ++c0)
    for (int64_t q = 0; q < kPixels; ++q) xt[c0 * kPixels + q] = q < n ? float(x[q * c + c0]) : 0.f;
}

// One tile of bf16 rows transposed as channel pairs (vec.h): pt[c2][q] = the 32-bit word of
// x[q, 2 c2], x[q, 2 c2 + 1] (0 for a channel past the last) for the n <= kPixels rows at x, zeros past n.
void transpose_pairs(const bf16* x, int64_t n, int64_t c, uint32_t* pt) {
  const int64_t pairs = (c + 1) / 2;
  int64_t c2 = 0;
  for (; 2 * (c2 + 8) <= c; c2 += 8)  // 16 channels of 8 rows: a transpose of 32-bit words
    for (int64_t q0 = 0; q0 < kPixels; q0 += 8)
      transpose_words8(x + q0 * c + 2 * c2, c, n - q0, pt + c2 * kPixels + q0, kPixels);
  for (; c2 < pairs; ++c2)
    for (int64_t q = 0; q < kPixels; ++q) {
      uint32_t word = 0;
      if (q < n) {
        const bf16* row = x + q * c;
        word = uint32_t(row[2 * c2].x) | (2 * c2 + 1 < c ? uint32_t(row[2 * c2 + 1].x) << 16 : 0u);
      }
      pt[c2 * kPixels + q] = word;
    }
}

// A bf16 layer's side branches multiply bf16 pairs where dot_pairs is an instruction (or in its test
// build): input tile, LRMB factors and the first factor's result as pairs (vec.h), float32 sums. A
// float32 layer's, or any without dot_pairs, run on float32 tiles (docs/kernel.md §1 step 3, §4).
template <class T>
constexpr bool kPairs = kHasDotPairs && std::is_same_v<T, bf16>;
template <class T>
using TileElem = std::conditional_t<kPairs<T>, uint32_t, float>;

// Channel c of a transposed float32 tile, pixels p .. p + kWidth - 1.
inline fvec tile_column(const float* xt, int64_t c, int64_t p) { return loadv(xt + c * kPixels + p); }

template <class T>
struct Side {  // the side branches, on the output pixel's own input (rank 0 / no SMB: none)
  const T* x = nullptr;           // the layer input [M, Cin]
  int64_t cin = 0;
  const TileElem<T>* first = nullptr;   // LRMB first_t [Cin, rank8]; pairs: [ceil(Cin/2), rank8]
  const TileElem<T>* second = nullptr;  // [rank8, OB*16]; pairs: [rank8/2, OB*16]
  int64_t rank = 0;               // rank8: the LRMB rank rounded up to a multiple of 8
  const int64_t* rowptr = nullptr;  // SMB, CSR by output channel: [OB*16 + 1]
  const int64_t* cols = nullptr;    // [n] input channels
  const float* vals = nullptr;      // [n]
  const uint32_t* val_pairs = nullptr;  // pairs: [n] each value rounded to bf16 in its column's half of a pair
  bool any() const { return rank > 0 || rowptr != nullptr; }
};

// pixels per pass of lowrank_tile: 8 x 2 accumulators in 32 AVX-512 registers, 8 x 1 in 16 AVX2 ones
constexpr int64_t kLowPixels = kWidth == 16 ? 2 * kWidth : kWidth;

// The LRMB's first factor on one tile: lowt [rank8, kPixels] = (x @ first_t)^T from xt [Cin, kPixels];
// with E = uint32_t from a tile of channel pairs into pairs of ranks, lowt [rank8/2, kPixels].
template <class E>
void lowrank_tile(const E* xt, int64_t cin, const E* first, int64_t rank8, E* lowt) {
  constexpr bool pairs = std::is_same_v<E, uint32_t>;
  const int64_t rows = pairs ? (cin + 1) / 2 : cin;
  for (int64_t g = 0; g < rank8; g += 8)
    for (int64_t h = 0; h < kPixels; h += kLowPixels) {
      fvec acc[8][kLowPixels / kWidth] = {};
      for (int64_t c = 0; c < rows; ++c) {
        const E* f = first + c * rank8 + g;
        for (int64_t i = 0; i < kLowPixels / kWidth; ++i)
          if constexpr (pairs) {
            const uvec v = loaduv(xt + c * kPixels + h + kWidth * i);
            for (int r = 0; r < 8; ++r) acc[r][i] = dot_pairs(acc[r][i], v, f[r]);
          } else {
            const fvec v = loadv(xt + c * kPixels + h + kWidth * i);
            for (int r = 0; r < 8; ++r) acc[r][i] += f[r] * v;
          }
      }
      for (int64_t i = 0; i < kLowPixels / kWidth; ++i)
        if constexpr (pairs)
          for (int r = 0; r < 8; r += 2)
            storeuv(lowt + (g + r) / 2 * kPixels + h + kWidth * i, bf16_pairs(acc[r][i], acc[r + 1][i]));
        else
          for (int r = 0; r < 8; ++r) storev(lowt + (g + r) * kPixels + h + kWidth * i, acc[r][i]);
    }
}

// Pixel vectors per pass of side_block, each pass 8 output lanes: 8 x 2 accumulators of 16 with
// AVX-512 (16 of its 32 registers), 8 x 1 of 8 with AVX2's 16 registers.
constexpr int64_t kSideVecs = kWidth == 16 ? 2 : 1;

// Both side branches of one weight block on one tile, computed per output lane over the tile's
// pixels (one FMA per LRMB rank / SMB nonzero for kWidth pixels; in pairs one vdpbf16ps per two
// ranks / per nonzero) from xt [Cin, kPixels] and lowt [rank8, kPixels] (pairs: [ceil(Cin/2), kPixels] and
// [rank8/2, kPixels]), transposed in registers: out [kPixels, 16].
template <class T>
void side_block(const Side<T>& sd, const TileElem<T>* xt, const TileElem<T>* lowt, int64_t width, int64_t o0,
                float* out) {
  for (int64_t j0 = 0; j0 < kLanes; j0 += 8)
    for (int64_t p0 = 0; p0 < kPixels; p0 += kSideVecs * kWidth) {
      fvec a[8][kSideVecs] = {};  // independent FMA chains: the rank loop is not latency bound
      const auto* second = sd.second + o0 + j0;
      if constexpr (kPairs<T>)
        for (int64_t r = 0; r < sd.rank / 2; ++r)
          for (int64_t i = 0; i < kSideVecs; ++i) {
            const uvec v = loaduv(lowt + r * kPixels + p0 + kWidth * i);
            for (int64_t jj = 0; jj < 8; ++jj) a[jj][i] = dot_pairs(a[jj][i], v, second[r * width + jj]);
          }
      else
        for (int64_t r = 0; r < sd.rank; ++r)
          for (int64_t i = 0; i < kSideVecs; ++i) {
            const fvec v = loadv(lowt + r * kPixels + p0 + kWidth * i);
            for (int64_t jj = 0; jj < 8; ++jj) a[jj][i] += second[r * width + jj] * v;
          }
      if (sd.rowptr != nullptr)
#pragma GCC unroll 8  // constant indices into a, which then stays in registers over each lane's nonzeros
        for (int64_t jj = 0; jj < 8; ++jj)
          for (int64_t u = sd.rowptr[o0 + j0 + jj]; u < sd.rowptr[o0 + j0 + jj + 1]; ++u)
            for (int64_t i = 0; i < kSideVecs; ++i)
              if constexpr (kPairs<T>)  // x[c] * v: the word's other channel meets a 0
                a[jj][i] = dot_pairs(a[jj][i], loaduv(xt + (sd.cols[u] >> 1) * kPixels + p0 + kWidth * i),
                                     sd.val_pairs[u]);
              else
                a[jj][i] += sd.vals[u] * tile_column(xt, sd.cols[u], p0 + kWidth * i);
#pragma GCC unroll 2  // constant indices into a, as above
      for (int64_t i = 0; i < kSideVecs; ++i)
#pragma GCC unroll 2
        for (int64_t h = 0; h < kWidth / 8; ++h) {  // 8 lanes x 8 pixels at a time
          f32x8 r[8];
          for (int64_t jj = 0; jj < 8; ++jj) r[jj] = lanes8(a[jj][i], h);
          transpose8(r);
          for (int64_t q = 0; q < 8; ++q) store8(out + (p0 + kWidth * i + 8 * h + q) * kLanes + j0, r[q]);
        }
    }
}

// A float32 matrix [rows, cols] as bf16 pairs of rows [ceil(rows/2), cols] (rounded to nearest even;
// a missing last row 0): the LRMB factors for dot_pairs.
std::vector<uint32_t> row_pairs(const float* m, int64_t rows, int64_t cols) {
  std::vector<uint32_t> out((rows + 1) / 2 * cols);
  for (int64_t i = 0; i < rows; i += 2)
    for (int64_t j = 0; j < cols; ++j)
      out[i / 2 * cols + j] = uint32_t(bf16(m[i * cols + j]).x) | (i + 1 < rows ? uint32_t(bf16(m[(i + 1) * cols + j]).x) << 16 : 0u);
  return out;
}

}  // namespace
}  // namespace bimacosr
