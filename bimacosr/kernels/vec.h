// Vector types and loads/stores shared by the kernel's sources (docs/kernel.md).
//
// GCC/Clang vector extensions: 8-lane float/int32 vectors are AVX2 registers, 16-lane and 8 x
// 64-bit ones AVX-512 registers where the CPU has them (pairs of AVX2 registers otherwise).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace bimacosr {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));  // native with AVX-512 only
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

template <class V>  // any float vector type, from floats at p
inline V load_lanes(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f32x8 load8(const float* p) { return load_lanes<f32x8>(p); }

inline void store8(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// bf16 input and output (the layer under bf16 autocast): read exactly, written rounded to nearest
// even as torch's `.to(torch.bfloat16)` does on a tensor (ATen's vectorized conversion: NaN is
// 0xFFFF). With AVX512-BF16 one vcvtneps2bf16 rounds a vector, except one holding a NaN (it keeps
// the payload) or a denormal (it flushes those to 0): that one takes the integer rounding, so the
// bits are the same on every build.
using bf16 = c10::BFloat16;

template <class V, class U>  // a float vector and the uint32 vector of its width, from bf16 at p, exactly
inline V load_bf16_lanes(const bf16* p) {
  typedef uint16_t H __attribute__((vector_size(sizeof(V) / 2)));
  H h;
  std::memcpy(&h, p, sizeof h);
  const U w = __builtin_convertvector(h, U) << 16;
  V v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline f32x8 load8(const bf16* p) { return load_bf16_lanes<f32x8, u32x8>(p); }

// The bf16 bits of each float (in the low 16 bits of its lane): to nearest even, NaN as 0xFFFF.
template <class F, class U>  // a float vector and the uint32 vector of its width
inline U bf16_bits(F v) {
  U u;
  std::memcpy(&u, &v, sizeof u);
  const U nan = (U)(v != v);
  return (((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) & ~nan) | (0xFFFFu & nan);
}

inline void store8(bf16* p, f32x8 v) {
#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  if (__builtin_expect(_mm256_fpclass_ps_mask((__m256)v, 0x01 | 0x20 | 0x80) == 0, 1)) {  // QNaN, denormal, SNaN
    const __m128bh h = _mm256_cvtneps_pbh((__m256)v);
    std::memcpy(p, &h, sizeof h);
    return;
  }
#endif
  const u16x8 h = __builtin_convertvector((bf16_bits<f32x8, u32x8>(v)), u16x8);
  std::memcpy(p, &h, sizeof h);
}

// 16 values at once, the lane-popcount path's output vector (popcount.h): bf16 rounded as store8
// rounds, by one vcvtneps2bf16 with AVX512-BF16, otherwise as two halves.
inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

inline void store16(bf16* p, f32x16 v) {
#if defined(__AVX512BF16__) && defined(__AVX512DQ__)
  if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)v, 0x01 | 0x20 | 0x80) == 0, 1)) {  // QNaN, denormal, SNaN
    const __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    std::memcpy(p, &h, sizeof h);
    return;
  }
#endif
  f32x8 halves[2];
  std::memcpy(halves, &v, sizeof v);
  store8(p, halves[0]);
  store8(p + 8, halves[1]);
}

template <class T>
inline void store_lanes(T* p, f32x8 v) { store8(p, v); }

template <class T>
inline void store_lanes(T* p, f32x16 v) { store16(p, v); }

// The widest float vector of this build: 16 lanes with AVX-512, 8 otherwise.
#ifdef __AVX512F__
constexpr int64_t kWidth = 16;
typedef f32x16 fvec;
#else
constexpr int64_t kWidth = 8;
typedef f32x8 fvec;
#endif

inline fvec loadv(const float* p) { return load_lanes<fvec>(p); }

inline void storev(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }

typedef uint32_t uvec __attribute__((vector_size(kWidth * 4)));  // fvec's width in 32-bit words

inline uvec loaduv(const uint32_t* p) {
  uvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void storeuv(uint32_t* p, uvec v) { std::memcpy(p, &v, sizeof v); }

typedef int32_t ivec __attribute__((vector_size(kWidth * 4)));

inline fvec loadv(const bf16* p) { return load_bf16_lanes<fvec, uvec>(p); }

inline void storev(bf16* p, fvec v) { store_lanes(p, v); }

// v rounded to bf16 as store8 rounds it (to nearest even, NaN as 0xFFFF), in float32.
inline fvec rounded_bf16(fvec v) {
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512DQ__)
  if (__builtin_expect(_mm512_fpclass_ps_mask((__m512)v, 0x01 | 0x20 | 0x80) == 0, 1))  // as store16
    return (fvec)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh((__m512)v)), 16);
#endif
  const uvec w = bf16_bits<fvec, uvec>(v) << 16;
  fvec r;
  std::memcpy(&r, &w, sizeof r);
  return r;
}

#ifdef __AVX2__
// Bit i set where lane i of v compares true with 0 under kPredicate: _CMP_GT_OQ (> 0) or
// _CMP_NEQ_UQ (!= 0, NaN included).
template <int kPredicate>
inline uint64_t bits_against_zero(fvec v) {
#ifdef __AVX512F__
  return _mm512_cmp_ps_mask((__m512)v, _mm512_setzero_ps(), kPredicate);
#else
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_setzero_ps(), kPredicate)));
#endif
}
#endif

// |v| lane by lane (the sign bit cleared).
inline fvec abs_lanes(fvec v) {
  uvec w;
  std::memcpy(&w, &v, sizeof w);
  w &= 0x7FFFFFFFu;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// x clamped to [lo, hi] lane by lane, NaN kept (vmaxps / vminps return their second operand then).
inline fvec clamp_lanes(fvec x, float lo, float hi) {
#if defined(__AVX512F__)
  return (fvec)_mm512_min_ps(_mm512_set1_ps(hi), _mm512_max_ps(_mm512_set1_ps(lo), (__m512)x));
#elif defined(__AVX__)
  return (fvec)_mm256_min_ps(_mm256_set1_ps(hi), _mm256_max_ps(_mm256_set1_ps(lo), (__m256)x));
#else
  x = x < lo ? fvec{} + lo : x;
  return x > hi ? fvec{} + hi : x;
#endif
}

// exp(x) for x in [-87.3, 88] (outside it the value at the nearer end; NaN kept): 2^(x log2 e) split
// into an integer n and f in [-1/2, 1/2], 2^f by a degree-6 polynomial (relative error ~2e-7), 2^n
// in the exponent bits. Below -87.3 (2^-126) the result stays the smallest normal times 2^f, as good
// as 0 beside 1 (a softmax's largest term, SiLU's 1 + exp(-x)); above 88 it stays e^88 (~1.7e38).
// K vectors in place, step by step: their K chains of dependent steps interleave.
template <int K>
inline void exp_lanes(fvec (&x)[K]) {
  fvec n[K], p[K];
  for (int k = 0; k < K; ++k) {
    x[k] = clamp_lanes(x[k], -87.3f, 88.f);
    x[k] *= 1.44269504088896341f;
    n[k] = (x[k] + 12582912.f) - 12582912.f;  // to the nearest integer (1.5 * 2^23)
    x[k] -= n[k];                             // f
    p[k] = fvec{} + 1.535336188319500e-4f;
  }
  for (const float coefficient : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f,
                                  2.402264791363012e-1f, 6.931472028550421e-1f, 1.f})
    for (int k = 0; k < K; ++k) p[k] = p[k] * x[k] + coefficient;
  for (int k = 0; k < K; ++k) {
    const ivec bits = (__builtin_convertvector(n[k], ivec) + 127) << 23;
    fvec two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    x[k] = p[k] * two_n;
  }
}

// bf16 pairs: 32-bit words holding two bf16 values, the even-indexed one (a channel of an NHWC bf16
// row, a rank of the LRMB) in the low half: docs/kernel.md §4.
inline fvec low_bf16(uvec w) {
  w <<= 16;
  fvec v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline fvec high_bf16(uvec w) {
  w &= 0xFFFF0000u;
  fvec v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// Rounded to bf16 pairs as store8 rounds (to nearest even, NaN as 0xFFFF): low half from lo, high from hi.
inline uvec bf16_pairs(fvec lo, fvec hi) { return bf16_bits<fvec, uvec>(lo) | (bf16_bits<fvec, uvec>(hi) << 16); }

// acc + a.high * b.high + a.low * b.low in every lane, b the same pair in all: with AVX512-BF16 one
// vdpbf16ps (32 products); otherwise written out, for a test build (BIMACOSR_EMULATE_DOT_PAIRS)
// on other CPUs. Both round after each product's addition (a product of two bf16 values is exact
// in float32, short of overflow: the written-out form contracts to FMAs); the instruction also
// treats denormal inputs as 0 and flushes denormal results, which the written-out form does not.
#if defined(__AVX512BF16__) && defined(__AVX512F__) && !defined(BIMACOSR_EMULATE_DOT_PAIRS)
constexpr const char* kDotPairs = "AVX512-BF16";
constexpr bool kHasDotPairs = true;
inline fvec dot_pairs(fvec acc, uvec a, uint32_t b) {
  return (fvec)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)_mm512_set1_epi32(int(b)));
}
#else
#ifdef BIMACOSR_EMULATE_DOT_PAIRS
constexpr const char* kDotPairs = "written out (test build)";
constexpr bool kHasDotPairs = true;
#else
constexpr const char* kDotPairs = "";  // none: bf16 layers' side branches in float32
constexpr bool kHasDotPairs = false;
#endif
inline fvec dot_pairs(fvec acc, uvec a, uint32_t b) {
  float bl, bh;
  const uint32_t low = b << 16, high = b & 0xFFFF0000u;
  std::memcpy(&bl, &low, sizeof bl);
  std::memcpy(&bh, &high, sizeof bh);
  return (acc + high_bf16(a) * bh) + low_bf16(a) * bl;
}
#endif

// Lanes 8 h .. 8 h + 7 of v (h = 0 .. kWidth / 8 - 1).
inline f32x8 lanes8(fvec v, int64_t h) {
#ifdef __AVX512F__
  return h == 0 ? __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
                : __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  (void)h;
  return v;
#endif
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

// An 8 x 8 block of 32-bit words transposed in registers: dst[j * dst_stride + i] = word j of row i,
// for the 8 rows of bf16 pairs at src, src_stride bf16 apart; rows from `rows` on read as 0.
inline void transpose_words8(const bf16* src, int64_t src_stride, int64_t rows, uint32_t* dst, int64_t dst_stride) {
  f32x8 r[8];
  for (int64_t i = 0; i < 8; ++i) {
    r[i] = f32x8{};
    if (i < rows) std::memcpy(&r[i], src + i * src_stride, sizeof r[i]);
  }
  transpose8(r);
  for (int64_t j = 0; j < 8; ++j) std::memcpy(dst + j * dst_stride, &r[j], sizeof r[j]);
}

}  // namespace bimacosr
