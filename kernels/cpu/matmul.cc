// matmul/cpu_blocked: operands converted to float32 and laid out row-major on load (this is
// where transpose flags and float16/bfloat16 are handled), then C is computed in 64x256 tiles,
// one tile per task, with K in blocks of 256 so a block of B stays in cache; the inner loop over
// columns is a plain multiply-add that the compiler vectorizes.
#include <algorithm>
#include <vector>

#include "convert.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace attn::cpu {
namespace {

constexpr std::int64_t kTileM = 64, kTileN = 256, kBlockK = 256;

// Rows x cols float32 copy of a 2-D slice (starting at element `offset`) of `t`, transposed when
// `transposed` (the slice is stored cols x rows).
std::vector<float> pack(const TensorView& t, std::int64_t offset, std::int64_t rows,
                        std::int64_t cols, bool transposed) {
  std::vector<float> out(static_cast<std::size_t>(rows * cols));
  if (!transposed) {
    load_floats(t, offset, rows * cols, out.data());
    return out;
  }
  std::vector<float> stored(static_cast<std::size_t>(rows * cols));
  load_floats(t, offset, rows * cols, stored.data());
  for (std::int64_t r = 0; r < cols; ++r)
    for (std::int64_t c = 0; c < rows; ++c) out[c * cols + r] = stored[r * rows + c];
  return out;
}

}  // namespace

Status matmul_blocked(const MatmulArgs& args, Stream&) {
  auto dims = matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b);
  ATTN_RETURN_IF_ERROR(dims.status());
  const std::int64_t batch = dims->batch, m = dims->m, n = dims->n, k = dims->k;
  const bool b_batched = dims->b_batched;
  std::vector<float> b_shared;
  if (!b_batched) b_shared = pack(args.b, 0, k, n, args.transpose_b);

  const std::int64_t tiles_m = (m + kTileM - 1) / kTileM, tiles_n = (n + kTileN - 1) / kTileN;
  for (std::int64_t bi = 0; bi < batch; ++bi) {
    const std::vector<float> a = pack(args.a, bi * m * k, m, k, args.transpose_a);
    const std::vector<float> b_own = b_batched ? pack(args.b, bi * k * n, k, n, args.transpose_b)
                                               : std::vector<float>{};
    const float* b = b_batched ? b_own.data() : b_shared.data();
    parallel_for(tiles_m * tiles_n, kTileM * kTileN * k, [&](std::int64_t tile) {
      const std::int64_t i0 = (tile / tiles_n) * kTileM, j0 = (tile % tiles_n) * kTileN;
      const std::int64_t rows = std::min(kTileM, m - i0), cols = std::min(kTileN, n - j0);
      std::vector<float> acc(static_cast<std::size_t>(rows * cols), 0.0f);
      for (std::int64_t k0 = 0; k0 < k; k0 += kBlockK) {
        const std::int64_t k1 = std::min(k, k0 + kBlockK);
        for (std::int64_t i = 0; i < rows; ++i) {
          float* c_row = acc.data() + i * cols;
          const float* a_row = a.data() + (i0 + i) * k;
          for (std::int64_t kk = k0; kk < k1; ++kk) {
            const float a_ik = a_row[kk];
            const float* b_row = b + kk * n + j0;
            for (std::int64_t j = 0; j < cols; ++j) c_row[j] += a_ik * b_row[j];
          }
        }
      }
      for (std::int64_t i = 0; i < rows; ++i)
        store_floats(args.c, (bi * m + i0 + i) * n + j0, cols, acc.data() + i * cols);
    });
  }
  return Status::Ok();
}

}  // namespace attn::cpu
