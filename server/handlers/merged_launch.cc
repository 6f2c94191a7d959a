#include "handlers/merged_launch.h"

#include <cstring>

namespace attn::server {
namespace {

// A part seen as [outer, rows along the axis, inner bytes].
struct Rows {
  std::int64_t outer = 1, rows = 0;
  std::size_t inner_bytes = 0;
};

Rows rows_of(const TensorView& v, int axis) {
  Rows r;
  for (int i = 0; i < axis; ++i) r.outer *= v.dim(i);
  r.rows = v.dim(axis);
  r.inner_bytes = element_size(v.dtype);
  for (int i = axis + 1; i < v.rank(); ++i) r.inner_bytes *= static_cast<std::size_t>(v.dim(i));
  return r;
}

// Copies between the whole and its parts, one run of rows per part and outer index.
template <bool kToWhole>
void copy_rows(void* whole, const std::vector<TensorView>& parts, int axis) {
  std::int64_t total = 0;
  for (const TensorView& p : parts) total += p.dim(axis);
  std::int64_t at = 0;  // the part's first row in the whole
  for (const TensorView& p : parts) {
    const Rows r = rows_of(p, axis);
    const std::size_t run = static_cast<std::size_t>(r.rows) * r.inner_bytes;
    for (std::int64_t o = 0; o < r.outer; ++o) {
      char* w =
          static_cast<char*>(whole) + (static_cast<std::size_t>(o * total + at)) * r.inner_bytes;
      char* part = static_cast<char*>(p.data) + static_cast<std::size_t>(o) * run;
      if constexpr (kToWhole)
        std::memcpy(w, part, run);
      else
        std::memcpy(part, w, run);
    }
    at += r.rows;
  }
}

}  // namespace

Tensor stacked_shape(const std::vector<TensorView>& parts, int axis) {
  Shape shape = parts.front().shape;
  shape[static_cast<std::size_t>(axis)] = 0;
  for (const TensorView& p : parts) shape[static_cast<std::size_t>(axis)] += p.dim(axis);
  return Tensor(parts.front().dtype, shape);
}

Tensor stack(const std::vector<TensorView>& parts, int axis) {
  Tensor whole = stacked_shape(parts, axis);
  copy_rows<true>(whole.data(), parts, axis);
  return whole;
}

void unstack(const TensorView& whole, const std::vector<TensorView>& parts, int axis) {
  copy_rows<false>(whole.data, parts, axis);
}

std::string sinks_key(const TensorView& sinks) {
  if (sinks.empty()) return "";
  static constexpr char kHex[] = "0123456789abcdef";
  std::string key = " sinks ";
  const auto* b = static_cast<const unsigned char*>(sinks.data);
  for (std::size_t i = 0; i < sinks.bytes(); ++i) {
    key += kHex[b[i] >> 4];
    key += kHex[b[i] & 15];
  }
  return key;
}

}  // namespace attn::server
