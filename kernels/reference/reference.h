// Float64 reference implementations, for tests only: straightforward loops in double, reading
// the inputs through the same views the kernels take.
#pragma once

#include <vector>

#include "attn/ops.h"

namespace attn::reference {

// C as float64, shape of args.c.
std::vector<double> matmul(const MatmulArgs& args);
std::vector<double> softmax(const SoftmaxArgs& args);
// O as float64; `lse` receives the log-sum-exp per row when non-null.
std::vector<double> attention(const AttentionArgs& args, std::vector<double>* lse = nullptr);

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

// The tolerance on relative_frobenius_error for results in dtype t.
double tolerance(DType t);

}  // namespace attn::reference
