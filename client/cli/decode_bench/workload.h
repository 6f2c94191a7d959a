// decode-bench's workload: what the options ask for in tokens, the cache that holds it, and the
// random bytes every request is cut from.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "../decode_bench.h"
#include "attn/client.h"

namespace attn::cli::decode_bench {

struct Workload {
  DType dtype = DType::kFloat32;
  std::vector<std::int64_t> lens;  // each sequence's prompt
  std::vector<std::string> ids;    // each sequence's id: s0, s1, ...
  std::int64_t prompt_tokens = 0;
  std::int64_t page = 0;      // tokens per page (the server's default, 16, for 0)
  std::int64_t capacity = 0;  // every sequence's pages once it has decoded its last step
};

// The prompt lengths drawn from `rng`; fails on a bad --context. The dtype is checked already.
Result<Workload> plan_workload(const DecodeBenchOptions& o, std::mt19937_64& rng);

// A cache of the workload's capacity.
v1::KvCacheConfig cache_config(const DecodeBenchOptions& o, const Workload& w);

// The bytes every request's tensors are cut from: enough rows for a prefill chunk or a step.
struct Pools {
  std::string q, kv;
};

// Drawn from `rng` after the prompt lengths.
Pools random_pools(const DecodeBenchOptions& o, const Workload& w, std::mt19937_64& rng);

// A [rows, heads, dim] tensor of the pool's first bytes.
void set_tensor(v1::Tensor* t, DType dtype, std::int64_t rows, std::int64_t heads, std::int64_t dim,
                const std::string& pool);

}  // namespace attn::cli::decode_bench
