// The element-wise loops of the CPU kernels that the compiler cannot vectorize for a baseline
// x86-64 target on its own: float16/bfloat16 <-> float32 conversion, a row's maximum and its
// exponentials. On a CPU with AVX2, FMA and F16C they run 8 lanes wide (F16C's conversion
// instructions, glibc's vector expf from libmvec); elsewhere as scalar loops. Picked once, at the
// first call.
#pragma once

#include <cstdint>

#include "attn/dtype.h"

namespace attn::cpu {

// out[i] = src[i] as float32, for i < n; `src` holds elements of `dtype`.
void convert_to_float(const void* src, DType dtype, std::int64_t n, float* out);
// dst[i] = in[i] rounded to `dtype` (nearest even; NaN stays NaN), for i < n.
void convert_from_float(const float* in, DType dtype, std::int64_t n, void* dst);

// The largest of x[0..n), -inf when n is 0 or every element is -inf.
float row_max(const float* x, std::int64_t n);
// x[i] = exp(x[i] - shift) for i < n and returns their sum; `shift` is finite. An element more
// than 87 below `shift` (-inf: a masked score) becomes 0: its exp is below float32's normal
// range, nothing next to the row's largest term, which is 1.
float exp_shifted_sum(float* x, std::int64_t n, float shift);
// x[i] = cap * tanh(x[i] / cap) for i < n (logit soft-capping); cap > 0.
void soft_cap(float* x, std::int64_t n, float cap);

// Whether the 8-wide versions run on this CPU (for the benchmark's report).
bool vectorized_with_avx2();

}  // namespace attn::cpu
