// Float64 reference implementations, for the tests and the Benchmark RPC's checks:
// straightforward loops in double, reading the inputs through the same views the kernels take, or
// element by element (sampled_error) for inputs that live on a device.
#pragma once

#include <functional>
#include <random>
#include <vector>

#include "attn/ops.h"
#include "attn/paged_ops.h"

namespace attn::reference {

// C as float64, shape of args.c.
std::vector<double> matmul(const MatmulArgs& args);
std::vector<double> softmax(const SoftmaxArgs& args);
// O as float64; `lse` receives the log-sum-exp per row when non-null.
std::vector<double> attention(const AttentionArgs& args, std::vector<double>* lse = nullptr);

// The KV-cache ops as float64, [tokens, Hq, D], from host views: cached tokens read through
// the page tables, the call's new tokens from k_new/v_new (the reference never writes the cache).
// A float8 cache (PagedKvLayer::fp8) is read whole, the new tokens included, each element
// dequantized as stored (code x its page's scale): call it after the kernel's append, to judge
// the attention over exactly what the cache holds.
std::vector<double> paged_decode(const PagedDecodeArgs& args, std::vector<double>* lse = nullptr);
std::vector<double> paged_prefill(const PagedPrefillArgs& args, std::vector<double>* lse = nullptr);

// ||got - want||_F / ||want||_F; infinite when got has a NaN or an infinity where want has not.
double relative_frobenius_error(const TensorView& got, const std::vector<double>& want);
double relative_frobenius_error(const std::vector<double>& got, const std::vector<double>& want);

// The relative Frobenius error of a matmul's result, with the denominator floored at
// || |op(A)| |op(B)| ||_F / sqrt(K): where a random draw makes the sums cancel (a 1 x 1 result
// near 0), a correct float32 result is off by its rounding of the products, not of the result,
// and ||got - want|| / ||want|| grows without bound. For well-spread inputs it is
// relative_frobenius_error exactly. Infinite on a NaN or an infinity.
double matmul_error(const TensorView& got, const MatmulArgs& args);

// The log-sum-exp's error: max over rows of |got - want| / max(1, |want|). A row's LSE can be
// near 0 (one visible key with a small score), where a relative error means nothing; the
// absolute error is what the scores' rounding sets. Infinite on a NaN or a mismatched infinity.
double lse_error(const TensorView& got, const std::vector<double>& want);

// The tolerance on relative_frobenius_error for results in dtype t whose values are sums of
// `terms` products (K of a matmul, the keys of attention): float32 rounding grows with
// sqrt(terms), 1e-5 up to ~2500 terms; float16/bfloat16 results are bound by their own rounding.
double tolerance(DType t, std::int64_t terms = 1);

// Inputs read one element at a time (row-major index), as float64.
using Elements = std::function<double(std::int64_t index)>;
// Reads `count` output elements from row-major index `first` into `out`, as float64.
using OutputReader = std::function<Status(std::int64_t first, std::int64_t count, std::vector<double>& out)>;

// The relative error of an op's output at positions drawn from `rng` (a few dozen values),
// against float64 values computed from the inputs (`inputs` in OpDesc<Args>::inputs order), and
// the tolerance for it. NaN in the output gives an infinite error.
struct SampledCheck {
  double error = 0;
  double tolerance = 0;
  bool passed() const { return error <= tolerance; }  // false for NaN
};
Result<SampledCheck> sampled_error(const MatmulArgs& args, const std::vector<Elements>& inputs,
                                   const OutputReader& output, std::mt19937_64& rng);
Result<SampledCheck> sampled_error(const SoftmaxArgs& args, const std::vector<Elements>& inputs,
                                   const OutputReader& output, std::mt19937_64& rng);
Result<SampledCheck> sampled_error(const AttentionArgs& args, const std::vector<Elements>& inputs,
                                   const OutputReader& output, std::mt19937_64& rng);

}  // namespace attn::reference
