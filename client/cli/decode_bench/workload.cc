#include "workload.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "attn/wire.h"

namespace attn::cli::decode_bench {
namespace {

// "N" or "MIN:MAX" (uniform, from `rng`), one length per sequence.
Result<std::vector<std::int64_t>> context_lengths(const std::string& spec, int seqs,
                                                  std::mt19937_64& rng) {
  std::int64_t lo = 0, hi = 0;
  try {
    std::size_t used = 0;
    const auto colon = spec.find(':');
    lo = std::stoll(spec.substr(0, colon), &used);
    if (used != spec.substr(0, colon).size()) throw std::invalid_argument(spec);
    hi = lo;
    if (colon != std::string::npos) {
      hi = std::stoll(spec.substr(colon + 1), &used);
      if (used != spec.size() - colon - 1) throw std::invalid_argument(spec);
    }
  } catch (const std::exception&) {
    return invalid_argument("--context: expected N or MIN:MAX, got \"" + spec + "\"");
  }
  if (lo < 1 || hi < lo)
    return invalid_argument("--context: expected 1 <= MIN <= MAX, got \"" + spec + "\"");
  std::uniform_int_distribution<std::int64_t> dist(lo, hi);
  std::vector<std::int64_t> lens(static_cast<std::size_t>(seqs));
  for (auto& n : lens) n = dist(rng);
  return lens;
}

// `rows` rows of `row_elements` random values in `dtype`, as wire bytes: a random block tiled
// (what the values are does not change the work).
std::string random_rows(DType dtype, std::int64_t rows, std::int64_t row_elements,
                        std::mt19937_64& rng) {
  const std::int64_t block = std::min<std::int64_t>(rows * row_elements, 1 << 16);
  Tensor t(dtype, {block});
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (std::int64_t i = 0; i < block; ++i) t.set(static_cast<std::size_t>(i), dist(rng));
  std::string out(static_cast<std::size_t>(rows * row_elements) * element_size(dtype), '\0');
  for (std::size_t off = 0; off < out.size(); off += t.bytes())
    std::memcpy(out.data() + off, t.data(), std::min(t.bytes(), out.size() - off));
  return out;
}

}  // namespace

Result<Workload> plan_workload(const DecodeBenchOptions& o, std::mt19937_64& rng) {
  Workload w;
  w.dtype = *parse_dtype(o.dtype);
  ATTN_ASSIGN_OR_RETURN(lens, context_lengths(o.context, o.seqs, rng));
  w.lens = std::move(lens);
  const std::int64_t decoded = o.warmup + o.steps;
  w.page = o.page_size > 0 ? o.page_size : 16;
  for (auto n : w.lens)
    w.capacity += (n + decoded + w.page - 1) / w.page * w.page, w.prompt_tokens += n;
  for (int i = 0; i < o.seqs; ++i) w.ids.push_back(std::string(1, 's').append(std::to_string(i)));
  return w;
}

v1::KvCacheConfig cache_config(const DecodeBenchOptions& o, const Workload& w) {
  v1::KvCacheConfig config;
  config.set_layers(o.layers);
  config.set_kv_heads(o.kv_heads);
  config.set_head_dim(o.head_dim);
  config.set_dtype(wire::to_proto(w.dtype));
  if (o.fp8) config.set_kv_storage(v1::D_TYPE_FLOAT8_E4M3);  // scales computed on append
  config.set_page_size(o.page_size);
  config.set_capacity_tokens(w.capacity);
  return config;
}

Pools random_pools(const DecodeBenchOptions& o, const Workload& w, std::mt19937_64& rng) {
  const std::int64_t rows =
      std::max<std::int64_t>(std::min(o.prefill_chunk, w.prompt_tokens), o.seqs);
  Pools p;
  p.q = random_rows(w.dtype, rows, std::int64_t{o.q_heads} * o.head_dim, rng);
  p.kv = random_rows(w.dtype, rows, std::int64_t{o.kv_heads} * o.head_dim, rng);
  return p;
}

void set_tensor(v1::Tensor* t, DType dtype, std::int64_t rows, std::int64_t heads, std::int64_t dim,
                const std::string& pool) {
  t->set_dtype(wire::to_proto(dtype));
  t->clear_shape();
  t->add_shape(rows);
  t->add_shape(heads);
  t->add_shape(dim);
  t->set_data(pool.data(), static_cast<std::size_t>(rows * heads * dim) * element_size(dtype));
}

}  // namespace attn::cli::decode_bench
