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
    case DType::kInt32: break;  // internal to the library: never on the wire
  }
  return v1::D_TYPE_UNSPECIFIED;
}

Result<DType> dtype_from_proto(v1::DType t, const std::string& field) {
  if (const auto dtype = from_proto(t)) return *dtype;
  const std::string got = t == v1::D_TYPE_UNSPECIFIED ? "D_TYPE_UNSPECIFIED (unset)"
                          : v1::DType_IsValid(t)      ? v1::DType_Name(t)
                                                      : std::to_string(static_cast<int>(t));
  return invalid_argument(field + ": expected D_TYPE_FLOAT32, D_TYPE_FLOAT16 or D_TYPE_BFLOAT16, got " + got);
}

Result<std::int64_t> TensorLimits::check(const Shape& shape, const std::string& field) const {
  ATTN_ASSIGN_OR_RETURN(count, checked_element_count(shape, field));
  if (count > max_elements) {
    return resource_exhausted(field + ": " + shape_to_string(shape) + " has " + std::to_string(count) +
                              " elements, over this server's limit of " + std::to_string(max_elements));
  }
  return count;
}

Result<DecodedTensor> decode_tensor(const v1::Tensor& t, const std::string& field,
                                    const TensorLimits& limits) {
  ATTN_ASSIGN_OR_RETURN(dtype, dtype_from_proto(t.dtype(), field + ".dtype"));
  if (t.shape_size() == 0) {
    return invalid_argument(field + ".shape: expected at least one dimension, got none (is " +
                            field + " set?)");
  }
  Shape shape(t.shape().begin(), t.shape().end());
  auto count = limits.check(shape, field + ".shape");
  ATTN_RETURN_IF_ERROR(count.status());
  const bool has_data = !t.data().empty(), has_values = t.values_size() > 0;
  if (has_data == has_values) {
    return invalid_argument(field + ": expected exactly one of data (raw bytes) or values (floats), got " +
                            (has_data ? "both" : "neither"));
  }
  DecodedTensor out;
  if (has_data) {
    const std::size_t expected = static_cast<std::size_t>(*count) * element_size(dtype);
    if (t.data().size() != expected) {
      return invalid_argument(field + ".data: expected " + std::to_string(expected) + " bytes (" +
                              std::to_string(*count) + " x " + std::string(dtype_name(dtype)) +
                              " for shape " + shape_to_string(shape) + "), got " +
                              std::to_string(t.data().size()));
    }
    out.view = {dtype, std::move(shape), const_cast<char*>(t.data().data()), MemoryKind::kHost};
    return out;
  }
  if (t.values_size() != *count) {
    return invalid_argument(field + ".values: expected " + std::to_string(*count) +
                            " values for shape " + shape_to_string(shape) + ", got " +
                            std::to_string(t.values_size()));
  }
  out.owned = Tensor(dtype, shape);
  if (dtype == DType::kFloat32) {
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
  const std::size_t bytes = static_cast<std::size_t>(element_count(shape)) * element_size(dtype);
  data->reserve(bytes);
  advise_huge_pages(data->data(), data->capacity());
  data->resize(bytes);
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

// StatusCode is numbered as gRPC's codes are (status.h).
grpc::Status to_grpc(const Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return {static_cast<grpc::StatusCode>(s.code()), s.message()};
}

Status from_grpc(const grpc::Status& s) {
  if (s.ok()) return Status::Ok();
  return {status_code_from_canonical(static_cast<int>(s.error_code())), s.error_message()};
}

}  // namespace attn::wire
