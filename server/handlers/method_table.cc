// The table of attn.v1.AttnService: one entry per method, binding it to its handler. Everything
// else about a method is declared once in the proto (its MethodTraits option: the label of its
// logs and metrics, whether it changes state, which gives both clients' retry policies), and the
// server refuses to start when this table and the proto disagree. A new RPC is its proto entry,
// one line here, its handler and its kernels.
#include "handlers/attn_service.h"
#include "rpc/gated_call.h"

namespace attn::server {

void bind_methods(GatedMethods& gate, AttnService& s) {
  // One-shot ops and self-description (op_handlers.cc).
  gate.unary("Matmul", s.ops, &OpHandlers::Matmul);
  gate.unary("Softmax", s.ops, &OpHandlers::Softmax);
  gate.unary("Attention", s.ops, &OpHandlers::Attention);
  gate.unary("ListKernels", s.ops, &OpHandlers::ListKernels);
  gate.unary("GetServerInfo", s.ops, &OpHandlers::GetServerInfo);
  // Resident tensors (tensor_handlers.cc).
  gate.client_streaming("PutTensor", s.tensors, &TensorHandlers::PutTensor);
  gate.server_streaming("GetTensor", s.tensors, &TensorHandlers::GetTensor);
  gate.unary("DeleteTensor", s.tensors, &TensorHandlers::DeleteTensor);
  gate.unary("ListTensors", s.tensors, &TensorHandlers::ListTensors);
  // Timing and transport (benchmark_handlers.cc).
  gate.unary("Benchmark", s.benchmarks, &BenchmarkHandlers::Benchmark);
  gate.unary("Echo", s.benchmarks, &BenchmarkHandlers::Echo);
  // KV caches (kv_handlers.cc).
  gate.unary("CreateKvCache", s.kv, &KvHandlers::CreateKvCache);
  gate.unary("DescribeKvCache", s.kv, &KvHandlers::DescribeKvCache);
  gate.unary("ListKvCaches", s.kv, &KvHandlers::ListKvCaches);
  gate.unary("DeleteKvCache", s.kv, &KvHandlers::DeleteKvCache);
  gate.unary("ReleaseSequences", s.kv, &KvHandlers::ReleaseSequences);
  gate.unary("ForkSequence", s.kv, &KvHandlers::ForkSequence);
  gate.unary("TruncateSequence", s.kv, &KvHandlers::TruncateSequence);
  gate.unary("Decode", s.kv, &KvHandlers::Decode);
  gate.unary("Prefill", s.kv, &KvHandlers::Prefill);
  gate.server_streaming("ReadKv", s.kv, &KvHandlers::ReadKv);
  // Shared memory (shm_handlers.cc).
  gate.unary("RegisterSharedMemory", s.shm, &ShmHandlers::RegisterSharedMemory);
  gate.unary("UnregisterSharedMemory", s.shm, &ShmHandlers::UnregisterSharedMemory);
  gate.unary("SharedMemoryStatus", s.shm, &ShmHandlers::SharedMemoryStatus);
}

}  // namespace attn::server
