// decode-bench's calls: the prefill of every prompt, then the decode streams' steps, and what
// the timed ones measured.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "workload.h"

namespace attn::cli::decode_bench {

using Clock = std::chrono::steady_clock;

// Where the calls go.
struct Target {
  Client& client;
  v1::AttnService::Stub& stub;  // the cache's replica
  const std::string& cache;
};

struct PrefillStats {
  std::int64_t calls = 0, ns = 0, kernel_ns = 0;
};

// Chunks of at most --prefill-chunk tokens, each sent to every layer in turn (as a model runs a
// chunk through its layers); a long prompt spans several chunks.
Result<PrefillStats> prefill(const DecodeBenchOptions& o, const Workload& w, const Pools& pools,
                             const Target& to);

struct CallSample {
  std::int64_t latency_ns;
  v1::Timings timings;
};

// What the timed steps measured.
struct Samples {
  std::vector<CallSample> calls;
  std::vector<std::int64_t> step_ns, step_kernel_ns, step_server_ns;
  Clock::time_point start, end;  // of the timed steps
};

// --shm / --cuda-ipc: the region the decode streams' tensors lie in, and each stream's offsets
// in it (q, k_new, v_new, o); an empty name: inline.
struct InRegion {
  std::string name;
  std::vector<std::array<std::int64_t, 4>> offsets;
};

// Each stream's sequences (stream c gets sequences c, c + --clients, ...): how many.
std::vector<int> stream_sequences(const DecodeBenchOptions& o);

// --clients streams, each with its own sequences (round robin), each sending one Decode per
// layer per step over them; the same request every time (the values do not change the work).
// Concurrent streams' calls on one layer may share a launch (the server's batching). The first
// failure, or every stream's samples merged.
Result<Samples> decode(const DecodeBenchOptions& o, const Workload& w, const Pools& pools,
                       const Target& to, const InRegion& region = {});

}  // namespace attn::cli::decode_bench
