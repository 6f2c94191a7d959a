// softmax/cpu: one row per task; the row is loaded once as float32, then max, sum of
// exp(x - max) and the normalized store, so float16/bfloat16 cost one conversion each way.
#include <cmath>
#include <limits>
#include <vector>

#include "convert.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace attn::cpu {

Status softmax_rows(const SoftmaxArgs& args, Stream&) {
  auto dims = softmax_dims(args.x);
  ATTN_RETURN_IF_ERROR(dims.status());
  const std::int64_t rows = dims->rows, cols = dims->cols;
  parallel_for(rows, cols * 4, [&](std::int64_t r) {
    thread_local std::vector<float> row;
    row.resize(static_cast<std::size_t>(cols));
    load_floats(args.x, r * cols, cols, row.data());
    float mx = -std::numeric_limits<float>::infinity();
    for (float v : row) mx = std::max(mx, v);
    // A row of -inf (everything masked) would give NaN from -inf - -inf; it stays NaN, like torch.
    double sum = 0.0;
    for (float& v : row) {
      v = std::exp(v - mx);
      sum += v;
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (float& v : row) v *= inv;
    store_floats(args.y, r * cols, cols, row.data());
  });
  return Status::Ok();
}

}  // namespace attn::cpu
