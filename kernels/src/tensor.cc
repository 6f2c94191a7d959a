#include "attn/tensor.h"

#include <cstdint>
#include <limits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

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

void advise_huge_pages(void* p, std::size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kHuge = std::uintptr_t{2} << 20;
  if (n < 2 * kHuge) return;
  const auto begin = (reinterpret_cast<std::uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<std::uintptr_t>(p) + n) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)p;
  (void)n;
#endif
}

Tensor::Tensor(DType dtype, Shape shape) : dtype_(dtype), shape_(std::move(shape)) {
  const std::size_t n = static_cast<std::size_t>(element_count(shape_)) * element_size(dtype);
  bytes_.reserve(n);  // room first, so that the zero fill below touches huge pages
  advise_huge_pages(bytes_.data(), bytes_.capacity());
  bytes_.resize(n);
}

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
