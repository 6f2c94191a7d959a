#include "attn/tensor.h"

#include <limits>

namespace attn {

std::string shape_to_string(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

Result<std::int64_t> checked_element_count(const Shape& shape, const std::string& what) {
  std::int64_t n = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 1) {
      return invalid_argument(what + "[" + std::to_string(i) + "]: expected a dimension >= 1, got " +
                              std::to_string(shape[i]) + " (shape " + shape_to_string(shape) + ")");
    }
    if (n > std::numeric_limits<std::int64_t>::max() / shape[i]) {
      return invalid_argument(what + ": the element count of shape " + shape_to_string(shape) +
                              " overflows a 64-bit integer");
    }
    n *= shape[i];
  }
  return n;
}

std::int64_t element_count(const Shape& shape) {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

Tensor::Tensor(DType dtype, Shape shape)
    : dtype_(dtype),
      shape_(std::move(shape)),
      bytes_(static_cast<std::size_t>(element_count(shape_)) * element_size(dtype)) {}

Tensor Tensor::from_floats(DType dtype, Shape shape, const std::vector<float>& values) {
  Tensor t(dtype, std::move(shape));
  for (std::size_t i = 0; i < values.size() && i < static_cast<std::size_t>(t.numel()); ++i)
    t.set(i, values[i]);
  return t;
}

std::vector<float> Tensor::to_floats() const {
  std::vector<float> out(static_cast<std::size_t>(numel()));
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = get(i);
  return out;
}

}  // namespace attn
