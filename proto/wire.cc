#include "attn/wire.h"

#include <cstring>

namespace attn::wire {

std::optional<DType> from_proto(v1::DType t) {
  switch (t) {
    case v1::D_TYPE_FLOAT32: return DType::kFloat32;
    case v1::D_TYPE_FLOAT16: return DType::kFloat16;
    case v1::D_TYPE_BFLOAT16: return DType::kBFloat16;
    default: return std::nullopt;
  }
}

v1::DType to_proto(DType t) {
  switch (t) {
    case DType::kFloat32: return v1::D_TYPE_FLOAT32;
    case DType::kFloat16: return v1::D_TYPE_FLOAT16;
    case DType::kBFloat16: return v1::D_TYPE_BFLOAT16;
  }
  return v1::D_TYPE_UNSPECIFIED;
}

Result<DecodedTensor> decode_tensor(const v1::Tensor& t, const std::string& field,
                                    const TensorLimits& limits) {
  const auto dtype = from_proto(t.dtype());
  if (!dtype) {
    return invalid_argument(field + ".dtype: expected D_TYPE_FLOAT32, D_TYPE_FLOAT16 or " +
                            "D_TYPE_BFLOAT16, got " +
                            (t.dtype() == v1::D_TYPE_UNSPECIFIED
                                 ? std::string("D_TYPE_UNSPECIFIED (unset)")
                                 : std::to_string(static_cast<int>(t.dtype()))));
  }
  if (t.shape_size() == 0) {
    return invalid_argument(field + ".shape: expected at least one dimension, got none (is " +
                            field + " set?)");
  }
  Shape shape(t.shape().begin(), t.shape().end());
  auto count = checked_element_count(shape, field + ".shape");
  ATTN_RETURN_IF_ERROR(count.status());
  if (*count > limits.max_elements) {
    return resource_exhausted(field + ".shape: " + shape_to_string(shape) + " has " +
                              std::to_string(*count) + " elements, over this server's limit of " +
                              std::to_string(limits.max_elements));
  }
  const bool has_data = !t.data().empty(), has_values = t.values_size() > 0;
  if (has_data == has_values) {
    return invalid_argument(field + ": expected exactly one of data (raw bytes) or values (floats), got " +
                            (has_data ? "both" : "neither"));
  }
  DecodedTensor out;
  if (has_data) {
    const std::size_t expected = static_cast<std::size_t>(*count) * element_size(*dtype);
    if (t.data().size() != expected) {
      return invalid_argument(field + ".data: expected " + std::to_string(expected) + " bytes (" +
                              std::to_string(*count) + " x " + std::string(dtype_name(*dtype)) +
                              " for shape " + shape_to_string(shape) + "), got " +
                              std::to_string(t.data().size()));
    }
    out.view = {*dtype, std::move(shape), const_cast<char*>(t.data().data()), MemoryKind::kHost};
    return out;
  }
  if (t.values_size() != *count) {
    return invalid_argument(field + ".values: expected " + std::to_string(*count) +
                            " values for shape " + shape_to_string(shape) + ", got " +
                            std::to_string(t.values_size()));
  }
  out.owned = Tensor(*dtype, shape);
  if (*dtype == DType::kFloat32) {
    std::memcpy(out.owned.data(), t.values().data(), out.owned.bytes());
  } else {
    for (int i = 0; i < t.values_size(); ++i) out.owned.set(static_cast<std::size_t>(i), t.values(i));
  }
  out.view = out.owned.view();
  return out;
}

TensorView prepare_output(DType dtype, const Shape& shape, v1::Tensor* out) {
  out->set_dtype(to_proto(dtype));
  out->mutable_shape()->Assign(shape.begin(), shape.end());
  std::string* data = out->mutable_data();
  data->resize(static_cast<std::size_t>(element_count(shape)) * element_size(dtype));
  return {dtype, shape, data->data(), MemoryKind::kHost};
}

void convert_to_values(v1::Tensor* t) {
  const auto dtype = from_proto(t->dtype());
  if (!dtype || t->data().empty()) return;
  const std::size_t n = t->data().size() / element_size(*dtype);
  auto* values = t->mutable_values();
  values->Resize(static_cast<int>(n), 0.0f);
  for (std::size_t i = 0; i < n; ++i)
    values->Set(static_cast<int>(i), load_as_float(t->data().data(), *dtype, i));
  t->clear_data();
}

void encode_tensor(const TensorView& view, v1::Tensor* out) {
  out->set_dtype(to_proto(view.dtype));
  out->mutable_shape()->Assign(view.shape.begin(), view.shape.end());
  out->set_data(static_cast<const char*>(view.data), view.bytes());
}

grpc::Status to_grpc(const Status& s) {
  grpc::StatusCode code = grpc::StatusCode::UNKNOWN;
  switch (s.code()) {
    case StatusCode::kOk: return grpc::Status::OK;
    case StatusCode::kInvalidArgument: code = grpc::StatusCode::INVALID_ARGUMENT; break;
    case StatusCode::kResourceExhausted: code = grpc::StatusCode::RESOURCE_EXHAUSTED; break;
    case StatusCode::kNotFound: code = grpc::StatusCode::NOT_FOUND; break;
    case StatusCode::kFailedPrecondition: code = grpc::StatusCode::FAILED_PRECONDITION; break;
    case StatusCode::kUnavailable: code = grpc::StatusCode::UNAVAILABLE; break;
    case StatusCode::kInternal: code = grpc::StatusCode::INTERNAL; break;
    case StatusCode::kUnauthenticated: code = grpc::StatusCode::UNAUTHENTICATED; break;
    case StatusCode::kDeadlineExceeded: code = grpc::StatusCode::DEADLINE_EXCEEDED; break;
    case StatusCode::kCancelled: code = grpc::StatusCode::CANCELLED; break;
  }
  return {code, s.message()};
}

Status from_grpc(const grpc::Status& s) {
  switch (s.error_code()) {
    case grpc::StatusCode::OK: return Status::Ok();
    case grpc::StatusCode::INVALID_ARGUMENT: return invalid_argument(s.error_message());
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return resource_exhausted(s.error_message());
    case grpc::StatusCode::NOT_FOUND: return not_found(s.error_message());
    case grpc::StatusCode::FAILED_PRECONDITION: return failed_precondition(s.error_message());
    case grpc::StatusCode::UNAVAILABLE: return unavailable(s.error_message());
    case grpc::StatusCode::UNAUTHENTICATED: return unauthenticated(s.error_message());
    case grpc::StatusCode::DEADLINE_EXCEEDED: return deadline_exceeded(s.error_message());
    case grpc::StatusCode::CANCELLED: return cancelled(s.error_message());
    default: return internal_error(s.error_message());
  }
}

}  // namespace attn::wire
