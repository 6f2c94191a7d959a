// matmul/cpu_openblas: C = op(A) op(B) on OpenBLAS's cblas_sgemm. Transposes go to sgemm as
// CblasTrans, so both operands are read as stored. float32 operands go to sgemm in place;
// float16/bfloat16 ones are converted to float32 one block at a time (of A, of B and of the
// float32 result), so a huge input never gets a whole float32 copy: blocks of 2048 x 2048 (48 MiB
// of scratch at most) for a product OpenBLAS threads, converted across our threads first; of
// 1024 x 1024 (12 MiB a thread) for the products of a batch run one per thread.
// Threads: a single large product runs on OpenBLAS's threads. A batch of products whose each is
// small runs one product per thread of ours, sgemm single-threaded inside (SingleThreadedBlas):
// OpenBLAS splits a small matrix poorly and pays a thread hand-off per call.
#include <cblas.h>

#include <algorithm>
#include <climits>
#include <memory>

#include "cpu_kernels.h"
#include "openblas.h"
#include "parallel.h"
#include "vectorized.h"

namespace attn::cpu {
namespace {

// Block sides of the converting path: measured at 2048^3 bfloat16, 1024-blocks converted A and B
// twice each (20M conversions, 0.69x the float32 rate), 2048-blocks once (12M).
constexpr std::int64_t kSharedBlock = 2048, kThreadBlock = 1024;
// Below this many flops a product is too small for OpenBLAS to split across threads well.
constexpr std::int64_t kSmallProductFlops = std::int64_t{1} << 26;

// One product C (m x n, row-major) = op(A) op(B): A stored m x k (k x m when transposed), B stored
// k x n (n x k when transposed); the pointers are to this product's first elements.
struct Product {
  const char* a;
  const char* b;
  char* c;
};

struct Shape2 {
  std::int64_t m, n, k;
  bool ta, tb;
};

CBLAS_TRANSPOSE trans(bool t) { return t ? CblasTrans : CblasNoTrans; }

void sgemm_f32(const Shape2& s, const Product& p) {
  const auto m = static_cast<blasint>(s.m), n = static_cast<blasint>(s.n),
             k = static_cast<blasint>(s.k);
  cblas_sgemm(CblasRowMajor, trans(s.ta), trans(s.tb), m, n, k, 1.0f,
              reinterpret_cast<const float*>(p.a), s.ta ? m : k,
              reinterpret_cast<const float*>(p.b), s.tb ? k : n, 0.0f,
              reinterpret_cast<float*>(p.c), n);
}

// Calls convert(r) for each of `rows` rows: across threads when `spread` (the caller is not in a
// parallel loop of its own), on the calling thread otherwise.
template <class Convert>
void for_rows(std::int64_t rows, std::int64_t cols, bool spread, Convert&& convert) {
  if (spread)
    parallel_for(rows, cols, convert);
  else
    for (std::int64_t r = 0; r < rows; ++r) convert(r);
}

// Rows [r0, r0 + rows) x columns [c0, c0 + cols) of a row-major matrix with `ld` columns, as
// float32 into `out` (rows x cols, dense).
void load_block(const char* m, DType dtype, std::int64_t ld, std::int64_t r0, std::int64_t rows,
                std::int64_t c0, std::int64_t cols, float* out, bool spread) {
  const auto size = static_cast<std::int64_t>(element_size(dtype));
  for_rows(rows, cols, spread, [&](std::int64_t r) {
    convert_to_float(m + ((r0 + r) * ld + c0) * size, dtype, cols, out + r * cols);
  });
}

// A float32 buffer that grows without zero-filling: every element is written before it is read
// (a zero-fill of the 12 MiB cost ~1 ms a call, 10% of a 1024^3 bfloat16 matmul).
class FloatBuffer {
 public:
  float* data() { return data_.get(); }
  void resize(std::size_t n) {
    if (n > size_) data_ = std::make_unique_for_overwrite<float[]>(n), size_ = n;
  }

 private:
  std::unique_ptr<float[]> data_;
  std::size_t size_ = 0;
};

// Scratch of one thread for the converting path: blocks of A and B and the float32 C.
struct Blocks {
  std::int64_t side = kThreadBlock;
  bool spread = false;  // convert across threads, then let go of them before OpenBLAS threads
  FloatBuffer a, b, c;
  // Which block a and b hold now (i0/k0 for A, k0/j0 for B), so one reused is not converted again.
  std::int64_t a_i0 = -1, a_k0 = -1, b_k0 = -1, b_j0 = -1;
  const char* a_src = nullptr;
  const char* b_src = nullptr;
};

// The product for float16/bfloat16 operands: C blocks of side x side, each summed over K in
// blocks of `side` with sgemm (beta 1 after the first), then rounded to the dtype once.
void sgemm_converted(const Shape2& s, const Product& p, DType dtype, Blocks& blk) {
  const auto size = static_cast<std::int64_t>(element_size(dtype));
  const std::int64_t side = blk.side;
  for (std::int64_t i0 = 0; i0 < s.m; i0 += side) {
    const std::int64_t mb = std::min(side, s.m - i0);
    for (std::int64_t j0 = 0; j0 < s.n; j0 += side) {
      const std::int64_t nb = std::min(side, s.n - j0);
      blk.c.resize(static_cast<std::size_t>(mb * nb));
      for (std::int64_t k0 = 0; k0 < s.k; k0 += side) {
        const std::int64_t kb = std::min(side, s.k - k0);
        if (blk.a_src != p.a || blk.a_i0 != i0 || blk.a_k0 != k0) {
          blk.a.resize(static_cast<std::size_t>(mb * kb));
          if (s.ta)  // stored k x m: rows k0.., columns i0..
            load_block(p.a, dtype, s.m, k0, kb, i0, mb, blk.a.data(), blk.spread);
          else
            load_block(p.a, dtype, s.k, i0, mb, k0, kb, blk.a.data(), blk.spread);
          blk.a_src = p.a, blk.a_i0 = i0, blk.a_k0 = k0;
        }
        if (blk.b_src != p.b || blk.b_k0 != k0 || blk.b_j0 != j0) {
          blk.b.resize(static_cast<std::size_t>(kb * nb));
          if (s.tb)  // stored n x k: rows j0.., columns k0..
            load_block(p.b, dtype, s.k, j0, nb, k0, kb, blk.b.data(), blk.spread);
          else
            load_block(p.b, dtype, s.n, k0, kb, j0, nb, blk.b.data(), blk.spread);
          blk.b_src = p.b, blk.b_k0 = k0, blk.b_j0 = j0;
        }
        if (blk.spread) release_openmp_threads();
        const auto m = static_cast<blasint>(mb), n = static_cast<blasint>(nb),
                   k = static_cast<blasint>(kb);
        cblas_sgemm(CblasRowMajor, trans(s.ta), trans(s.tb), m, n, k, 1.0f, blk.a.data(),
                    s.ta ? m : k, blk.b.data(), s.tb ? k : n, k0 == 0 ? 0.0f : 1.0f, blk.c.data(),
                    n);
      }
      for_rows(mb, nb, blk.spread, [&](std::int64_t r) {
        convert_from_float(blk.c.data() + r * nb, dtype, nb, p.c + ((i0 + r) * s.n + j0) * size);
      });
    }
  }
}

bool fits_blasint(std::int64_t x) { return x <= INT_MAX; }

}  // namespace

Status matmul_openblas_supports(const MatmulArgs& args) {
  auto dims = matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b);
  ATTN_RETURN_IF_ERROR(dims.status());
  // sgemm takes 32-bit sizes (Debian's OpenBLAS is built without INTERFACE64); the leading
  // dimensions are m, n and k themselves.
  if (!fits_blasint(dims->m) || !fits_blasint(dims->n) || !fits_blasint(dims->k))
    return invalid_argument("kernel: matmul/cpu_openblas takes M, N and K below 2^31, got " +
                            std::to_string(dims->m) + " x " + std::to_string(dims->k) + " x " +
                            std::to_string(dims->n));
  return Status::Ok();
}

Status matmul_openblas(const MatmulArgs& args, Stream&) {
  ATTN_RETURN_IF_ERROR(matmul_openblas_supports(args));
  const MatmulDims d = matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b).value();
  configure_openblas_threads();
  const DType dtype = args.a.dtype;
  const auto size = static_cast<std::int64_t>(element_size(dtype));
  Shape2 s{d.m, d.n, d.k, args.transpose_a, args.transpose_b};
  std::int64_t products = d.batch;
  // A shared B under a batch of untransposed A: the batch is one product of batch x m rows.
  if (!d.b_batched && !args.transpose_a && d.batch > 1 && fits_blasint(d.batch * d.m)) {
    s.m = d.batch * d.m;
    products = 1;
  }
  const auto* a = static_cast<const char*>(args.a.data);
  const auto* b = static_cast<const char*>(args.b.data);
  auto* c = static_cast<char*>(args.c.data);
  auto product = [&](std::int64_t i) {
    return Product{a + i * s.m * s.k * size, d.b_batched ? b + i * s.k * s.n * size : b,
                   c + i * s.m * s.n * size};
  };
  auto run = [&](std::int64_t i, Blocks& blocks) {
    if (dtype == DType::kFloat32)
      sgemm_f32(s, product(i));
    else
      sgemm_converted(s, product(i), dtype, blocks);
  };

  const std::int64_t flops = 2 * s.m * s.n * s.k;
  const int threads = hardware_threads();
  if (products == 1 || threads == 1 ||
      (flops >= kSmallProductFlops && products < 4 * std::int64_t{threads})) {
    if (flops >= kSmallProductFlops) release_openmp_threads();  // OpenBLAS threads these
    Blocks blocks;
    blocks.side = kSharedBlock;
    blocks.spread = flops >= kSmallProductFlops;
    for (std::int64_t i = 0; i < products; ++i) run(i, blocks);
    return Status::Ok();
  }
  const SingleThreadedBlas one_thread_each;
  parallel_for(products, flops / 2, [&](std::int64_t i) {
    Blocks blocks;  // a product's own: small here, and not kept past the call
    run(i, blocks);
  });
  return Status::Ok();
}

}  // namespace attn::cpu
