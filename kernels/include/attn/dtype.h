// Element types of tensors, their sizes and names, and scalar conversions to and from float.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace attn {

// kInt32 is internal to the library: the index arrays of the KV-cache ops (page tables,
// lengths) travel through the executors as int32 tensors. It is never a tensor's dtype on the
// wire, never in kAllDTypes, and no variant claims it.
enum class DType : std::uint8_t { kFloat32, kFloat16, kBFloat16, kInt32 };

inline constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat16, DType::kBFloat16};

constexpr std::size_t element_size(DType t) { return t == DType::kFloat32 || t == DType::kInt32 ? 4 : 2; }

// "float32", "float16", "bfloat16".
std::string_view dtype_name(DType t);
std::optional<DType> parse_dtype(std::string_view name);  // also accepts f32, fp16, bf16, ...

// Round-to-nearest-even conversions; NaN stays NaN, overflow goes to infinity.
std::uint16_t float_to_half_bits(float f);
float half_bits_to_float(std::uint16_t h);
std::uint16_t float_to_bfloat16_bits(float f);
inline float bfloat16_bits_to_float(std::uint16_t b) {
  std::uint32_t u = std::uint32_t{b} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Reads element i of a buffer of dtype t as float.
inline float load_as_float(const void* data, DType t, std::size_t i) {
  switch (t) {
    case DType::kFloat32: {
      float f;
      std::memcpy(&f, static_cast<const char*>(data) + 4 * i, 4);
      return f;
    }
    case DType::kFloat16: {
      std::uint16_t h;
      std::memcpy(&h, static_cast<const char*>(data) + 2 * i, 2);
      return half_bits_to_float(h);
    }
    case DType::kBFloat16: {
      std::uint16_t b;
      std::memcpy(&b, static_cast<const char*>(data) + 2 * i, 2);
      return bfloat16_bits_to_float(b);
    }
    case DType::kInt32: {
      std::int32_t v;
      std::memcpy(&v, static_cast<const char*>(data) + 4 * i, 4);
      return static_cast<float>(v);
    }
  }
  return 0.0f;
}

// Writes f, rounded to dtype t, as element i of a buffer.
inline void store_from_float(void* data, DType t, std::size_t i, float f) {
  switch (t) {
    case DType::kFloat32:
      std::memcpy(static_cast<char*>(data) + 4 * i, &f, 4);
      return;
    case DType::kFloat16: {
      std::uint16_t h = float_to_half_bits(f);
      std::memcpy(static_cast<char*>(data) + 2 * i, &h, 2);
      return;
    }
    case DType::kBFloat16: {
      std::uint16_t b = float_to_bfloat16_bits(f);
      std::memcpy(static_cast<char*>(data) + 2 * i, &b, 2);
      return;
    }
    case DType::kInt32: {
      const auto v = static_cast<std::int32_t>(f);
      std::memcpy(static_cast<char*>(data) + 4 * i, &v, 4);
      return;
    }
  }
}

}  // namespace attn
