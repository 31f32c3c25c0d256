// The popcount paths and the XOR-popcount micro-kernel shared by the fused layer op (binary.cpp)
// and the bound probe (bound.cpp): docs/kernel.md §2.
//
// xor_popcount<R, kMasked>(x, m, wb, words, differ): for R input rows x[r] (`words` 64-bit words
// each) and one weight block wb [words, 16] (the 16 words of one input word adjacent, lanes in
// kLaneOrder),
//   differ[r][o / kOut][o % kOut] = sum_i popcount((x[r][i] ^ wb[i, lane of output o]) & m[r][i]),
// o = 0..15 in natural order in kHalves vectors of kOut lanes (ilanes): one 16-lane vector with
// AVX-512 on the lane-popcount path, two 8-lane halves otherwise (16-lane vectors would be split
// element by element without AVX-512), the mask m (rows like x) applied
// only when kMasked (one more bitwise op per vector; with AVX-512 the XOR and AND are one
// vpternlogq).
// One of three paths, chosen by the compiler flags (-march=native): AVX-512 VPOPCNTDQ on 8-lane
// vectors (or that path with the popcount emulated, a test build for CPUs without it), an AVX2
// nibble table, or portable scalar code. kRows is the path's register blocking over rows (measured:
// docs/kernel.md §5).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "vec.h"

namespace bimacosr {

constexpr int64_t kLanes = 16;  // output channels per weight block
constexpr int64_t kPixels = 32;  // output pixels (rows) per task of the op and of the bound probe

// Weight blocks per task of kPixels rows: as many as leave at least 4 tasks per thread (all blocks
// when the rows alone give that many), so that a task's per-row work (row setup, side branches)
// serves as many blocks as the threads allow.
inline int64_t task_group(int64_t chunks, int64_t blocks, int64_t threads) {
  const int64_t groups = std::min(blocks, std::max<int64_t>(1, (4 * threads + chunks - 1) / chunks));
  return (blocks + groups - 1) / groups;
}
// Runs body(next) once on each thread (at::parallel_for, torch.set_num_threads), next() handing out
// the task indices 0, 1, ... (>= tasks: none left) one at a time to whichever thread asks, so that
// a thread slowed by another process does not hold the others at the end (a static split did:
// 8-12 % of a 1x1 layer's time was threads waiting in OpenMP's barrier, perf). The layer op's
// tasks gain (2 % over a step); the bound probe's, far shorter, lose (7 %: the shared counter), so
// the probe keeps the static split (docs/kernel.md §5).
template <class F>
void parallel_tasks(int64_t tasks, const F& body) {
  std::atomic<int64_t> counter{0};
  at::parallel_for(0, std::min<int64_t>(tasks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    body([&] { return counter.fetch_add(1, std::memory_order_relaxed); });
  });
}
constexpr int kLaneOrder[kLanes] = {0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15};

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

#ifndef BIMACOSR_ROWS  // a test build may set the blocking
#if defined(BIMACOSR_LANE_POPCOUNT)
#define BIMACOSR_ROWS 8
#elif defined(__AVX2__) && defined(__AVX512VL__)  // 32 vector registers (AVX-512 without VPOPCNTDQ)
#define BIMACOSR_ROWS 4
#else  // AVX2's 16 registers: 8 byte counters, 4 weight vectors, table and mask
#define BIMACOSR_ROWS 2
#endif
#endif
constexpr int kRows = BIMACOSR_ROWS;  // input rows per micro-kernel call

#if defined(BIMACOSR_LANE_POPCOUNT) && defined(__AVX512F__)  // (not the emulating test build on AVX2)
constexpr int kHalves = 1;
typedef i32x16 ilanes;
typedef f32x16 flanes;
#else
constexpr int kHalves = 2;
typedef i32x8 ilanes;
typedef f32x8 flanes;
#endif
constexpr int kOut = kLanes / kHalves;  // outputs per ilanes / flanes vector

#if defined(BIMACOSR_LANE_POPCOUNT)
template <int R, bool kMasked = false>
inline void xor_popcount(const uint64_t* const* x, const uint64_t* const* m, const uint64_t* wb, int64_t words,
                         ilanes (*differ)[kHalves]) {
  u64x8 sum[R][2] = {};  // 64-bit lane counts, lanes in kLaneOrder
  for (int64_t i = 0; i < words; ++i) {
    u64x8 w0, w1;  // two variables, not an array: GCC kept an array's copy on the stack
    std::memcpy(&w0, wb + i * kLanes, sizeof w0);
    std::memcpy(&w1, wb + i * kLanes + 8, sizeof w1);
    for (int r = 0; r < R; ++r) {
      const uint64_t xv = x[r][i], mv = kMasked ? m[r][i] : ~uint64_t(0);
      sum[r][0] += popcount_lanes(kMasked ? (w0 ^ xv) & mv : w0 ^ xv);
      sum[r][1] += popcount_lanes(kMasked ? (w1 ^ xv) & mv : w1 ^ xv);
    }
  }
  // the low 32 bits of the counts in natural output order: lanes 0, 4, 1, 5, 2, 6, 3, 7 of each
  for (int r = 0; r < R; ++r) {
    const i32x16 counts = __builtin_shufflevector((i32x16)sum[r][0], (i32x16)sum[r][1], 0, 8, 2, 10, 4, 12, 6, 14,
                                                  16, 24, 18, 26, 20, 28, 22, 30);
    std::memcpy(differ[r], &counts, sizeof counts);  // one vector or two halves: the same 16 values
  }
}
#elif defined(__AVX2__)
// Byte-wise popcount of v (4-bit table lookups).
inline __m256i popcount_bytes(__m256i v) {
  const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  return _mm256_add_epi8(_mm256_shuffle_epi8(table, lo), _mm256_shuffle_epi8(table, hi));
}

template <int R, bool kMasked = false>
inline void xor_popcount(const uint64_t* const* x, const uint64_t* const* m, const uint64_t* wb, int64_t words,
                         ilanes (*differ)[kHalves]) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i sum[R][4];  // 64-bit lane counts, lanes in kLaneOrder
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 4; ++v) sum[r][v] = zero;
  constexpr int64_t kFlush = 31;  // byte counters hold 8 * 31 < 256
  for (int64_t i0 = 0; i0 < words; i0 += kFlush) {
    __m256i bytes[R][4];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) bytes[r][v] = zero;
    for (int64_t i = i0, i1 = std::min(words, i0 + kFlush); i < i1; ++i) {
      const __m256i* wp = reinterpret_cast<const __m256i*>(wb + i * kLanes);
      __m256i w[4];
      for (int v = 0; v < 4; ++v) w[v] = _mm256_loadu_si256(wp + v);
      for (int r = 0; r < R; ++r) {
        const __m256i xv = _mm256_set1_epi64x(int64_t(x[r][i]));
        for (int v = 0; v < 4; ++v) {
          __m256i d = _mm256_xor_si256(w[v], xv);
          if (kMasked) d = _mm256_and_si256(d, _mm256_set1_epi64x(int64_t(m[r][i])));
          bytes[r][v] = _mm256_add_epi8(bytes[r][v], popcount_bytes(d));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < 4; ++v) sum[r][v] = _mm256_add_epi64(sum[r][v], _mm256_sad_epu8(bytes[r][v], zero));
  }
  for (int r = 0; r < R; ++r)  // lanes (0,2,4,6) | (1,3,5,7) << 32 -> outputs 0..7, then 8..15
    for (int h = 0; h < 2; ++h)
      differ[r][h] = (i32x8)_mm256_or_si256(sum[r][2 * h], _mm256_slli_epi64(sum[r][2 * h + 1], 32));
}
#else
template <int R, bool kMasked = false>
inline void xor_popcount(const uint64_t* const* x, const uint64_t* const* m, const uint64_t* wb, int64_t words,
                         ilanes (*differ)[kHalves]) {
  for (int r = 0; r < R; ++r) {
    int32_t counts[kLanes] = {};
    for (int64_t i = 0; i < words; ++i)
      for (int64_t j = 0; j < kLanes; ++j)
        counts[kLaneOrder[j]] +=
            __builtin_popcountll((x[r][i] ^ wb[i * kLanes + j]) & (kMasked ? m[r][i] : ~uint64_t(0)));
    std::memcpy(differ[r], counts, sizeof counts);
  }
}
#endif

}  // namespace bimacosr
