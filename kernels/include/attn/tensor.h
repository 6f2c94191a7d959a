// Shapes with overflow-checked arithmetic, non-owning tensor views and owning host tensors.
// One tensor type for the server, the kernels, the client and the tests.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "attn/dtype.h"
#include "attn/status.h"

namespace attn {

using Shape = std::vector<std::int64_t>;

// "[2, 3, 4]".
std::string shape_to_string(const Shape& shape);

// Product of the dims. Errors name `what`: a dim < 1 is INVALID_ARGUMENT, a product that does not
// fit in int64 is INVALID_ARGUMENT.
Result<std::int64_t> checked_element_count(const Shape& shape, const std::string& what);

// Element count without checks, for shapes already validated.
std::int64_t element_count(const Shape& shape);

enum class MemoryKind : std::uint8_t { kHost, kDevice };

// A dense row-major tensor somewhere in memory; does not own it.
struct TensorView {
  DType dtype = DType::kFloat32;
  Shape shape;
  void* data = nullptr;
  MemoryKind memory = MemoryKind::kHost;

  std::int64_t numel() const { return element_count(shape); }
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * element_size(dtype); }
  std::int64_t dim(int i) const { return shape[static_cast<std::size_t>(i < 0 ? i + rank() : i)]; }
  int rank() const { return static_cast<int>(shape.size()); }
  bool empty() const { return data == nullptr; }
};

// A dense row-major tensor in host memory that owns its bytes.
// Asks the kernel to back the whole 2 MiB pages of [p, p + n) with huge pages when it first touches
// them (Linux transparent huge pages, where they are on or "madvise"): a fresh 50 MB buffer then
// takes 25 page faults instead of 12,800, which at that size cost more than the copy into it.
// Does nothing for buffers under 4 MiB or elsewhere.
void advise_huge_pages(void* p, std::size_t n);

class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, Shape shape);  // zero-filled

  // Float values rounded to dtype; values.size() must equal the shape's element count.
  static Tensor from_floats(DType dtype, Shape shape, const std::vector<float>& values);

  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  std::int64_t numel() const { return element_count(shape_); }
  std::size_t bytes() const { return bytes_.size(); }
  void* data() { return bytes_.data(); }
  const void* data() const { return bytes_.data(); }

  float get(std::size_t i) const { return load_as_float(data(), dtype_, i); }
  void set(std::size_t i, float f) { store_from_float(data(), dtype_, i, f); }
  std::vector<float> to_floats() const;

  TensorView view() { return {dtype_, shape_, data(), MemoryKind::kHost}; }
  TensorView view() const {  // kernels never write through an input view
    return {dtype_, shape_, const_cast<void*>(data()), MemoryKind::kHost};
  }

 private:
  DType dtype_ = DType::kFloat32;
  Shape shape_;
  std::vector<unsigned char> bytes_;
};

}  // namespace attn
