// `attn decode-bench`: decode serving over a KV cache, as a model would drive it. Creates a
// cache, prefills N sequences (in chunks of a token budget per call), then decodes S steps over
// L layers, one Decode call per layer per step with every sequence, and reports steps/s,
// sequence-steps/s, step and call latency percentiles, and the server's kernel time against
// the time seen here.
#pragma once

#include <cstdint>
#include <string>

#include "attn/client.h"

namespace attn::cli {

struct DecodeBenchOptions {
  int seqs = 32;
  // Concurrent decode streams, the sequences split among them (a step of each is one Decode per
  // layer over its share): what the server's dynamic batching merges.
  int clients = 1;
  // Prompt tokens per sequence: "N", or "MIN:MAX" for lengths drawn uniformly (seeded).
  std::string context = "4096";
  int steps = 32;
  int warmup = 2;  // untimed steps before the timed ones
  int layers = 32;
  int q_heads = 32;
  int kv_heads = 8;
  int head_dim = 128;
  std::string dtype = "bfloat16";
  // --fp8: the cache stores K/V in float8 e4m3, scales computed on append (a float16 or bfloat16
  // cache); the wire keeps `dtype`.
  bool fp8 = false;
  int page_size = 16;
  std::int64_t prefill_chunk = 8192;  // tokens per Prefill call at most
  std::string kernel;                 // Decode's variant; empty: the server picks
  std::string device;                 // where the cache goes; empty: the server picks
  std::uint64_t seed = 1;
  // --shm: each stream's q, k_new, v_new and o in a POSIX shared-memory region the bench makes
  // and registers (the server on this host, run with --shared-memory system); --cuda-ipc DEVICE:
  // in device memory of that CUDA device, exported by CUDA IPC (--shared-memory cuda, the cache
  // on that device). The prefill stays inline.
  bool shm = false;
  int cuda_ipc_device = -1;
  bool keep = false;  // leave the cache on the server
  bool json = false;  // print JSON instead of the table
  std::string json_path;
};

int run_decode_bench(const DecodeBenchOptions& options, Client& client);

}  // namespace attn::cli
