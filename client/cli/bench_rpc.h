// `attn bench-rpc`: a load generator. N concurrent clients call a mix of ops for a duration and
// report throughput, client-side latency percentiles and the server's own breakdown; then the
// same clients echo payloads of the same sizes (the transport baseline) for comparison.
#pragma once

#include <string>
#include <vector>

#include "attn/client.h"

namespace attn::cli {

struct BenchRpcOptions {
  std::string server;
  int clients = 8;
  double seconds = 5;
  // "softmax:1,1", "matmul:256,256,256", "attention:1,8,1024,64": the op and its input shape.
  std::vector<std::string> mix = {"softmax:1,1"};
  std::string dtype = "float32";
  bool resident = false;   // inputs put once as resident tensors, outputs kept (and deleted)
  // Inputs in a POSIX shared-memory region registered with the server (--shared-memory system),
  // copied in once; each client's outputs written into its own slot of the region.
  bool shm = false;
  // Inputs and outputs laid out as with --shm, in device memory of this CUDA device exported by
  // CUDA IPC (--shared-memory cuda): the server reads and writes it in place. -1: off.
  int cuda_ipc_device = -1;
  // Only the echo baseline (the transport alone): the mix's payload sizes echoed for `seconds`.
  bool echo_only = false;
  bool causal = false;     // attention entries
  std::string json_path;   // also write the results here
};

int run_bench_rpc(const BenchRpcOptions& options, const ClientOptions& client_options);

}  // namespace attn::cli
