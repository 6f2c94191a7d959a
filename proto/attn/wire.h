// The one place where wire types (attn.v1 protobuf) meet the library's types: tensors, dtypes
// and statuses, in both directions. Used by the server and by the client.
#pragma once

#include <grpcpp/support/status.h>

#include <optional>
#include <string>

#include "attn/tensor.h"
#include "attn/v1/attn.pb.h"

namespace attn::wire {

std::optional<DType> from_proto(v1::DType t);
v1::DType to_proto(DType t);
// The dtype, or INVALID_ARGUMENT naming `field` ("x.dtype"), the dtypes expected and what came.
Result<DType> dtype_from_proto(v1::DType t, const std::string& field);

// What decoding accepts.
struct TensorLimits {
  std::int64_t max_elements = std::int64_t{1} << 31;

  // The element count of `shape`, or why it cannot be had: INVALID_ARGUMENT for a dim < 1 or an
  // overflow, RESOURCE_EXHAUSTED over max_elements; messages start with `field`. Every tensor the
  // server receives or makes (inputs, outputs, Benchmark inputs) passes here.
  Result<std::int64_t> check(const Shape& shape, const std::string& field) const;
};

// A decoded input tensor: a view of the request's own bytes when it came as `data` (read in
// place, no copy), or of `owned` when it came as float32 `values` and was rounded to its dtype.
struct DecodedTensor {
  TensorView view;
  Tensor owned;
};

// Checks `t` and views it. Errors name `field` ("a", "q", ...), the expectation and what came:
// INVALID_ARGUMENT for an unspecified dtype, a dim < 1, an overflowing shape, both or neither of
// data/values, or a byte/value count that does not match the shape; RESOURCE_EXHAUSTED for more
// than limits.max_elements elements. The view points into `t`, which must outlive it.
Result<DecodedTensor> decode_tensor(const v1::Tensor& t, const std::string& field,
                                    const TensorLimits& limits);

// Sets `out` to dtype and shape, sizes its `data` and returns a view of those bytes, so a kernel
// writes its output straight into the response.
TensorView prepare_output(DType dtype, const Shape& shape, v1::Tensor* out);

// Replaces `data` by float32 `values` (for clients that asked for values).
void convert_to_values(v1::Tensor* t);

// Copies a host tensor into a wire tensor, as `data` bytes.
void encode_tensor(const TensorView& view, v1::Tensor* out);

// The status mapping, both directions.
grpc::Status to_grpc(const Status& s);
Status from_grpc(const grpc::Status& s);

}  // namespace attn::wire
