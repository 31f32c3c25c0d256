// The bound probe: a plain XOR-popcount GEMM on packed words, the fused kernel's binary work and
// nothing else (no packing, scales, taps, epilogue or side branches), on the same micro-kernel and
// task split (docs/kernel.md §5). Its rate at a layer's K is what this CPU's popcount path allows.
//
// bimacosr::xor_popcount(a [M, Wd] int64, b [OB, Wd, 16] int64 in the weight block layout)
//   -> int32 [M, OB*16], out[m, 16*ob + o] = sum_i popcount(a[m, i] ^ b[ob, i, lane of o]).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "popcount.h"

namespace bimacosr {
namespace {

at::Tensor xor_popcount_op(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kLong && a.is_contiguous() && a.is_cpu(),
              "xor_popcount: a must be a contiguous int64 CPU tensor [M, Wd]");
  TORCH_CHECK(b.dim() == 3 && b.scalar_type() == at::kLong && b.is_contiguous() && b.size(1) == a.size(1) &&
                  b.size(2) == kLanes,
              "xor_popcount: b must be contiguous int64 [OB, Wd, 16] with a's Wd, got ", b.sizes());
  const int64_t rows = a.size(0), words = a.size(1), blocks = b.size(0);
  at::Tensor out = at::empty({rows, blocks * kLanes}, a.options().dtype(at::kInt));
  const uint64_t* ap = reinterpret_cast<const uint64_t*>(a.data_ptr<int64_t>());
  const uint64_t* bp = reinterpret_cast<const uint64_t*>(b.data_ptr<int64_t>());
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t chunks = (rows + kPixels - 1) / kPixels;
  const int64_t group = task_group(chunks, blocks, at::get_num_threads()), groups = (blocks + group - 1) / group;
  at::parallel_for(0, chunks * groups, 1, [&](int64_t begin, int64_t end) {
    const std::vector<uint64_t> zero_row(words, 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m0 = (task / groups) * kPixels, n = std::min(kPixels, rows - m0);
      const int64_t b0 = (task % groups) * group, b1 = std::min(blocks, b0 + group);
      for (int64_t blk = b0; blk < b1; ++blk)
        for (int64_t q0 = 0; q0 < n; q0 += kRows) {
          const uint64_t* x[kRows];
          for (int r = 0; r < kRows; ++r) x[r] = q0 + r < n ? ap + (m0 + q0 + r) * words : zero_row.data();
          ilanes differ[kRows][kHalves];
          xor_popcount<kRows>(x, nullptr, bp + blk * words * kLanes, words, differ);
          for (int r = 0; r < kRows && q0 + r < n; ++r)
            std::memcpy(op + (m0 + q0 + r) * blocks * kLanes + blk * kLanes, differ[r], sizeof differ[r]);
        }
    }
  });
  return out;
}

}  // namespace
}  // namespace bimacosr

TORCH_LIBRARY_FRAGMENT(bimacosr, m) {
  m.def("xor_popcount(Tensor a, Tensor b) -> Tensor");  // the bound probe
  m.impl("xor_popcount", c10::DispatchKey::CPU, TORCH_FN(bimacosr::xor_popcount_op));
}
