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
//   kPixels pixels, one FMA per nonzero for 8 pixels (not per pixel), then transposed back;
//   dot_t[m, o] = sum_c sign(x[pixel_t(m), c]) * sign(W[o, c, t]) computed on bits:
//   with P = sign bits (1 where > 0) and N = nonzero masks (1 where != 0),
//   dot = popcount(N) - 2 * popcount((P_x ^ P_w) & N),  N = N_x & N_w.
//   Padding taps (outside the image) contribute 0, as do pixels whose scale s = mean|x| is 0.
//
// bimacosr::path() -> the popcount this build uses (AVX-512 VPOPCNTDQ, AVX2 table, portable).
//
// Weights come in blocks of 16 output channels, the 16 words of one block and input word
// adjacent (wbits[t, ob, i, lane]), lanes in the order kLaneOrder so that the AVX2 path's
// 64-bit popcount lanes interleave into 32-bit lanes in natural output order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;   // output channels per weight block
constexpr int kLaneOrder[kLanes] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};
constexpr int64_t kPixels = 32;  // output pixels per task
constexpr int64_t kGroup = 4;    // weight blocks per task

// 8 float / int32 lanes (GCC/Clang vector extensions: AVX2 registers where the CPU has them).
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// bf16 input and output (the layer under bf16 autocast): read exactly, written rounded to nearest
// even as torch's `.to(torch.bfloat16)` does (NaN: 0x7FC0).
using bf16 = c10::BFloat16;
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline f32x8 load8(const bf16* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  const u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  f32x8 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline void store8(bf16* p, f32x8 v) {
  u32x8 u;
  std::memcpy(&u, &v, sizeof u);
  const u32x8 nan = (u32x8)(v != v);
  const u32x8 r = (((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) & ~nan) | (0x7FC0u & nan);
  const u16x8 h = __builtin_convertvector(r, u16x8);
  std::memcpy(p, &h, sizeof h);
}

// Transpose of 8 rows of 8 floats in registers (unpack, 2x2 blocks, 128-bit halves).
inline void transpose8(f32x8 r[8]) {
  f32x8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      u[i + 2 * j] = __builtin_shufflevector(t[i + j], t[i + j + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * j + 1] = __builtin_shufflevector(t[i + j], t[i + j + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  for (int j = 0; j < 4; ++j) {
    r[j] = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    r[j + 4] = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

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

// One pass over the rows of x [M, C]: sign bits, nonzero mask (both [M, Wd]), s = mean |x| and
// the nonzero count per row.
template <class T>  // float or bf16
void pack_rows(const T* x, int64_t rows, int64_t c, int64_t words, uint64_t* bits,
               uint64_t* mask, float* scale, int32_t* nonzero) {
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * c;
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
          const __m256 v = (__m256)load8(row + i);
          acc = _mm256_add_ps(acc, _mm256_andnot_ps(minus0, v));
          pos |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_GT_OQ)))) << (i - c0);
          nz |= uint64_t(uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_UQ)))) << (i - c0);
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

// dots[o] (o = 0..15, natural order) of one (input pixel, tap, weight block) with masks: the
// activation's nonzero mask xm always, the weight's wm when kWeightZeros (otherwise its nonzero
// count is the pixel's, `nonzero`).
template <bool kWeightZeros>
__attribute__((noinline))  // out of line: the hot loop keeps its registers
void tap_masked(const uint64_t* xb, const uint64_t* xm, const uint64_t* wb, const uint64_t* wm,
                int64_t words, int32_t nonzero, int32_t* dots) {
  int32_t valid[kLanes], differ[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) valid[j] = kWeightZeros ? 0 : nonzero, differ[j] = 0;
  for (int64_t i = 0; i < words; ++i) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const uint64_t both = kWeightZeros ? xm[i] & wm[i * kLanes + j] : xm[i];
      if (kWeightZeros) valid[j] += __builtin_popcountll(both);
      differ[j] += __builtin_popcountll((xb[i] ^ wb[i * kLanes + j]) & both);
    }
  }
  for (int64_t j = 0; j < kLanes; ++j) dots[kLaneOrder[j]] = valid[j] - 2 * differ[j];
}

// A popcount per 64-bit lane of 8 lanes: AVX-512 VPOPCNTDQ, or emulated in a test build (to run
// this path's logic on CPUs without the instruction).
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));
#if defined(__AVX512VPOPCNTDQ__) && defined(__AVX512F__)
#define BIMACOSR_LANE_POPCOUNT
constexpr const char* kPath = "AVX-512 VPOPCNTDQ popcount";
inline u64x8 popcount_lanes(u64x8 v) { return (u64x8)_mm512_popcnt_epi64((__m512i)v); }
#elif defined(__AVX2__) && defined(BIMACOSR_EMULATE_LANE_POPCOUNT)
#define BIMACOSR_LANE_POPCOUNT
constexpr const char* kPath = "lane popcount, emulated (test build)";
inline u64x8 popcount_lanes(u64x8 v) {
  for (int i = 0; i < 8; ++i) v[i] = uint64_t(__builtin_popcountll(v[i]));
  return v;
}
#elif defined(__AVX2__)
constexpr const char* kPath = "AVX2 nibble-table popcount";
#else
constexpr const char* kPath = "portable popcount";
#endif

#ifdef __AVX2__
// Byte-wise popcount of v (4-bit table lookups).
inline __m256i popcount_bytes(__m256i v) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
}

// acc += s * dots of a pixel without zeros and weights without zeros, dots = C - 2 *
// popcount(P_x ^ P_w), for outputs 0..7 (acc[0]) and 8..15 (acc[1]) of the block.
#ifdef BIMACOSR_LANE_POPCOUNT
inline void tap_clean(const uint64_t* xb, const uint64_t* wb, int64_t words, int32_t channels,
                      f32x8 s, f32x8* acc) {
  u64x8 sum[2] = {};  // 64-bit lane counts, lanes in kLaneOrder
  for (int64_t i = 0; i < words; ++i)
    for (int v = 0; v < 2; ++v) {
      u64x8 w;
      std::memcpy(&w, wb + i * kLanes + 8 * v, sizeof w);
      sum[v] += popcount_lanes(w ^ xb[i]);
    }
  // the low 32 bits of the counts in natural output order: lanes 0, 4, 1, 5, 2, 6, 3, 7 (+ 8)
  const i32x16 differ = __builtin_shufflevector((i32x16)sum[0], (i32x16)sum[1], 0, 8, 2, 10, 4, 12, 6, 14,
                                                16, 24, 18, 26, 20, 28, 22, 30);
  const f32x16 dots = __builtin_convertvector(channels - 2 * differ, f32x16);
  acc[0] += s * __builtin_shufflevector(dots, dots, 0, 1, 2, 3, 4, 5, 6, 7);
  acc[1] += s * __builtin_shufflevector(dots, dots, 8, 9, 10, 11, 12, 13, 14, 15);
}
#elif defined(__AVX2__)
inline void tap_clean(const uint64_t* xb, const uint64_t* wb, int64_t words, int32_t channels,
                      f32x8 s, f32x8* acc) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i sum[4] = {zero, zero, zero, zero};  // 64-bit lane counts, lanes in kLaneOrder
  constexpr int64_t kFlush = 31;  // byte counters hold 8 * 31 < 256
  for (int64_t i0 = 0; i0 < words; i0 += kFlush) {
    __m256i bytes[4] = {zero, zero, zero, zero};
    for (int64_t i = i0, i1 = std::min(words, i0 + kFlush); i < i1; ++i) {
      const __m256i xv = _mm256_set1_epi64x(int64_t(xb[i]));
      const __m256i* w = reinterpret_cast<const __m256i*>(wb + i * kLanes);
      for (int v = 0; v < 4; ++v)
        bytes[v] = _mm256_add_epi8(bytes[v], popcount_bytes(_mm256_xor_si256(_mm256_loadu_si256(w + v), xv)));
    }
    for (int v = 0; v < 4; ++v) sum[v] = _mm256_add_epi64(sum[v], _mm256_sad_epu8(bytes[v], zero));
  }
  const __m256i c = _mm256_set1_epi32(channels);
  for (int half = 0; half < 2; ++half) {  // lanes (0,2,4,6) | (1,3,5,7) << 32 -> outputs 0..7
    const __m256i differ = _mm256_or_si256(sum[2 * half], _mm256_slli_epi64(sum[2 * half + 1], 32));
    const __m256i dots = _mm256_sub_epi32(c, _mm256_slli_epi32(differ, 1));
    acc[half] += s * __builtin_convertvector((i32x8)dots, f32x8);
  }
}
#endif
#endif

template <class T>
struct Side {  // the side branches, on the output pixel's own input (rank 0 / no SMB: none)
  const T* x = nullptr;           // the layer input [M, Cin]
  int64_t cin = 0;
  const float* first = nullptr;   // LRMB first_t [Cin, rank8]
  const float* second = nullptr;  // [rank8, OB*16]
  int64_t rank = 0;               // rank8: the LRMB rank rounded up to a multiple of 8
  const int64_t* rowptr = nullptr;  // SMB, CSR by output channel: [OB*16 + 1]
  const int64_t* cols = nullptr;    // [n] input channels
  const float* vals = nullptr;      // [n]
  bool any() const { return rank > 0 || rowptr != nullptr; }
};

#ifdef __AVX512F__
constexpr int64_t kLowPixels = 16;  // pixels per pass of lowrank_tile: 16 accumulators in 32 registers
#else
constexpr int64_t kLowPixels = 8;   // 8 accumulators in 16 registers
#endif

// The LRMB's first factor on one tile: lowt [rank8, kPixels] = (x @ first_t)^T from xt [Cin, kPixels].
void lowrank_tile(const float* xt, int64_t cin, const float* first, int64_t rank8, float* lowt) {
  for (int64_t g = 0; g < rank8; g += 8)
    for (int64_t h = 0; h < kPixels; h += kLowPixels) {
      f32x8 acc[8][kLowPixels / 8] = {};
      for (int64_t c = 0; c < cin; ++c) {
        const float* f = first + c * rank8 + g;
        for (int64_t i = 0; i < kLowPixels / 8; ++i) {
          const f32x8 v = load8(xt + c * kPixels + h + 8 * i);
          for (int r = 0; r < 8; ++r) acc[r][i] += f[r] * v;
        }
      }
      for (int r = 0; r < 8; ++r)
        for (int64_t i = 0; i < kLowPixels / 8; ++i) store8(lowt + (g + r) * kPixels + h + 8 * i, acc[r][i]);
    }
}

// Both side branches of one weight block on one tile, computed per output lane over the tile's
// pixels (one FMA per LRMB rank / SMB nonzero for 8 pixels) from xt [Cin, kPixels] and lowt
// [rank8, kPixels], then transposed: out [kPixels, 16]. `lanes` is scratch [16, kPixels].
template <class T>
void side_block(const Side<T>& sd, const float* xt, const float* lowt, int64_t width, int64_t o0,
                float* lanes, float* out) {
  for (int64_t j = 0; j < kLanes; ++j) {
    f32x8 a[kPixels / 8] = {};
    for (int64_t r = 0; r < sd.rank; ++r) {
      const float coef = sd.second[r * width + o0 + j];
      for (int64_t i = 0; i < kPixels / 8; ++i) a[i] += coef * load8(lowt + r * kPixels + 8 * i);
    }
    if (sd.rowptr != nullptr)
      for (int64_t u = sd.rowptr[o0 + j]; u < sd.rowptr[o0 + j + 1]; ++u) {
        const float* col = xt + sd.cols[u] * kPixels;
        for (int64_t i = 0; i < kPixels / 8; ++i) a[i] += sd.vals[u] * load8(col + 8 * i);
      }
    for (int64_t i = 0; i < kPixels / 8; ++i) store8(lanes + j * kPixels + 8 * i, a[i]);
  }
  for (int64_t j0 = 0; j0 < kLanes; j0 += 8)
    for (int64_t q0 = 0; q0 < kPixels; q0 += 8) {
      f32x8 r[8];
      for (int64_t i = 0; i < 8; ++i) r[i] = load8(lanes + (j0 + i) * kPixels + q0);
      transpose8(r);
      for (int64_t i = 0; i < 8; ++i) store8(out + (q0 + i) * kLanes + j0, r[i]);
    }
}

struct Epilogue {  // per output channel, padded to OB*16
  std::vector<float> alpha, shift, slope, beta1;
  bool rprelu;
};

struct Problem {  // one call: the packed input, the weights and the output geometry
  const uint64_t *xbits, *xmask, *wbits, *wmask;  // wmask: null without weight zeros
  const float* scale;
  const int32_t* nonzero;
  int32_t channels;
  int64_t batch, h, w, ho, wo, k, stride, pad, cout, words;
};

// The output rows [B*Ho*Wo, Cout]: in tasks of kPixels output pixels x kGroup weight blocks; per
// pixel and block, 16 accumulators over the taps, then the epilogue and side branches.
template <bool kWeightZeros, class T>
void gemm(const Problem& pr, const Epilogue& ep, const Side<T>& side, T* out) {
  const int64_t taps = pr.k * pr.k, pixels = pr.batch * pr.ho * pr.wo;
  const int64_t blocks = (pr.cout + kLanes - 1) / kLanes, words = pr.words;
  const int64_t chunks = (pixels + kPixels - 1) / kPixels;
  // With side branches a task transposes its pixels' inputs (`tile`) and applies the LRMB's first
  // factor: all blocks in one task, so once per pixel, when there are pixels enough to keep the
  // threads busy.
  const int64_t group = side.any() && chunks >= 4 * at::get_num_threads() ? blocks : kGroup;
  const int64_t groups = (blocks + group - 1) / group;
  const int64_t tap_stride = blocks * words * kLanes;
  at::parallel_for(0, chunks * groups, 1, [&](int64_t begin, int64_t end) {
    const Problem p = pr;  // locals: no reloads through the captured reference
    const Side<T> sd = side;
    const float *alpha = ep.alpha.data(), *shift = ep.shift.data(), *slope = ep.slope.data(),
                *beta1 = ep.beta1.data();
    std::vector<int64_t> src(kPixels * taps);  // input row of (pixel, tap), -1 where it adds 0
    std::vector<float> tile(sd.any() ? sd.cin * kPixels : 0), lowt(sd.rank * kPixels);  // x^T, low^T
    alignas(32) int32_t dots[kLanes];
    alignas(32) float tail[kLanes];
    alignas(32) float lanes[kLanes * kPixels];  // side_block's scratch
    alignas(32) float side_out[kPixels * kLanes];  // the side branches of one block [pixel, lane]
    const f32x8 zero = {};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m0 = (task / groups) * kPixels, n = std::min(kPixels, pixels - m0);
      const int64_t b0 = (task % groups) * group, b1 = std::min(blocks, b0 + group);
      if (sd.any()) transpose_tile(sd.x + m0 * sd.cin, n, sd.cin, tile.data());
      if (sd.rank) lowrank_tile(tile.data(), sd.cin, sd.first, sd.rank, lowt.data());
      for (int64_t q = 0; q < n; ++q) {
        const int64_t m = m0 + q, b = m / (p.ho * p.wo), oy = (m / p.wo) % p.ho, ox = m % p.wo;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t iy = oy * p.stride - p.pad + t / p.k, ix = ox * p.stride - p.pad + t % p.k;
          int64_t row = -1;
          if (iy >= 0 && iy < p.h && ix >= 0 && ix < p.w) {
            row = (b * p.h + iy) * p.w + ix;
            if (p.scale[row] == 0.f) row = -1;
          }
          src[q * taps + t] = row;
        }
      }
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t o0 = blk * kLanes;
        if (sd.any())
          side_block(sd, tile.data(), lowt.data(), blocks * kLanes, o0, lanes, side_out);
        for (int64_t q = 0; q < n; ++q) {
          f32x8 acc[2] = {zero, zero};
          for (int64_t t = 0; t < taps; ++t) {
            const int64_t row = src[q * taps + t];
            if (row < 0) continue;
            const uint64_t* wb = p.wbits + t * tap_stride + blk * words * kLanes;
            const f32x8 s = zero + p.scale[row];
#ifdef __AVX2__
            if (!kWeightZeros && p.nonzero[row] == p.channels) {
              tap_clean(p.xbits + row * words, wb, words, p.channels, s, acc);
              continue;
            }
#endif
            const uint64_t* wm = kWeightZeros ? p.wmask + t * tap_stride + blk * words * kLanes : nullptr;
            tap_masked<kWeightZeros>(p.xbits + row * words, p.xmask + row * words, wb, wm, words,
                                     p.nonzero[row], dots);
            for (int half = 0; half < 2; ++half) {
              i32x8 d;
              std::memcpy(&d, dots + 8 * half, sizeof d);
              acc[half] += s * __builtin_convertvector(d, f32x8);
            }
          }
          const int64_t m = m0 + q;
          for (int half = 0; half < 2; ++half) {
            const int64_t o = o0 + 8 * half;
            f32x8 v = acc[half] * load8(alpha + o) + load8(shift + o);
            if (ep.rprelu)  // PReLU then beta1, branch-free: max(v, 0) + slope * min(v, 0)
              v = (v > zero ? v : zero) + load8(slope + o) * (v < zero ? v : zero) + load8(beta1 + o);
            acc[half] = v;
          }
          if (sd.any()) {
            acc[0] += load8(side_out + q * kLanes);
            acc[1] += load8(side_out + q * kLanes + 8);
          }
          T* y = out + m * p.cout + o0;
          if (p.cout - o0 >= kLanes) {
            store8(y, acc[0]);
            store8(y + 8, acc[1]);
          } else {
            store8(tail, acc[0]);
            store8(tail + 8, acc[1]);
            for (int64_t j = 0; j < p.cout - o0; ++j) y[j] = T(tail[j]);
          }
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
  const Epilogue ep{padded(alpha, lanes), padded(shift, lanes), padded(slope, lanes),
                    padded(beta1, lanes), rprelu};
  const Problem problem{u64(xbits), u64(xmask), u64(wbits), weight_zeros ? u64(wmask) : nullptr,
                        scale.data_ptr<float>(), nonzero.data_ptr<int32_t>(), int32_t(c), batch, h, w,
                        ho, wo, k, stride, pad, cout, words};
  auto run = [&](const auto* xp, auto* yp) {  // float or bf16 in and out
    using T = std::remove_pointer_t<decltype(yp)>;
    pack_rows(xp, rows, c, words, u64(xbits), u64(xmask), scale.data_ptr<float>(),
              nonzero.data_ptr<int32_t>());
    Side<T> side;
    side.x = xp;
    side.cin = c;
    if (rank) {
      side.first = first_t.data_ptr<float>();
      side.second = second_t.data_ptr<float>();
      side.rank = rank;
    }
    if (has_smb) {
      side.rowptr = smb_rowptr.data_ptr<int64_t>();
      side.cols = smb_cols.data_ptr<int64_t>();
      side.vals = smb_vals.data_ptr<float>();
    }
    (weight_zeros ? gemm<true, T> : gemm<false, T>)(problem, ep, side, yp);
  };
  if (half)
    run(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>());
  else
    run(x.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

std::string path() { return kPath; }

}  // namespace

TORCH_LIBRARY(bimacosr, m) {
  m.def("path() -> str", &path);  // which popcount this build uses
  m.def("binary_conv(Tensor x, Tensor wbits, Tensor wmask, int cout, Tensor alpha, Tensor shift, "
        "Tensor slope, Tensor beta1, Tensor first_t, Tensor second_t, Tensor smb_rowptr, "
        "Tensor smb_cols, Tensor smb_vals, int k, int stride, int padding) -> Tensor");
}

TORCH_LIBRARY_IMPL(bimacosr, CPU, m) {
  m.impl("binary_conv", &binary_conv);
}
