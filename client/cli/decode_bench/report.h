// decode-bench's report: steps/s, sequence-steps/s, step and call latency percentiles, and the
// server's time against the time seen here; as a table, or JSON.
#pragma once

#include <cstdint>

#include "traffic.h"

namespace attn::cli::decode_bench {

// What the report is made from.
struct Measured {
  const v1::KvCacheInfo& cache;
  std::int64_t cache_bytes;  // after the decode
  const PrefillStats& prefill;
  const Samples& decode;
};

// The JSON record to --json-out, and to stdout with --json, else the table.
void report(const DecodeBenchOptions& o, const Workload& w, const Measured& m);

}  // namespace attn::cli::decode_bench
