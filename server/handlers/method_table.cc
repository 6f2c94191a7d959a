// The table of attn.v1.AttnService: one entry per method, binding it to its handler. Everything
// else about a method is declared once in the proto (its MethodTraits option: the label of its
// logs and metrics, whether it changes state, which gives both clients' retry policies), and the
// server refuses to start when this table and the proto disagree. A new RPC is its proto entry,
// one line here, its handler and its kernels.
#include "handlers/attn_service.h"
#include "rpc/gated_call.h"

namespace attn::server {

void bind_methods(GatedMethods& gate) {
  // One-shot ops and self-description (op_handlers.cc).
  gate.unary("Matmul", &AttnService::Matmul);
  gate.unary("Softmax", &AttnService::Softmax);
  gate.unary("Attention", &AttnService::Attention);
  gate.unary("ListKernels", &AttnService::ListKernels);
  gate.unary("GetServerInfo", &AttnService::GetServerInfo);
  // Resident tensors (tensor_handlers.cc).
  gate.client_streaming("PutTensor", &AttnService::PutTensor);
  gate.server_streaming("GetTensor", &AttnService::GetTensor);
  gate.unary("DeleteTensor", &AttnService::DeleteTensor);
  gate.unary("ListTensors", &AttnService::ListTensors);
  // Timing and transport (benchmark_handler.cc).
  gate.unary("Benchmark", &AttnService::Benchmark);
  gate.unary("Echo", &AttnService::Echo);
  // KV caches (kv_handlers.cc).
  gate.unary("CreateKvCache", &AttnService::CreateKvCache);
  gate.unary("DescribeKvCache", &AttnService::DescribeKvCache);
  gate.unary("ListKvCaches", &AttnService::ListKvCaches);
  gate.unary("DeleteKvCache", &AttnService::DeleteKvCache);
  gate.unary("ReleaseSequences", &AttnService::ReleaseSequences);
  gate.unary("ForkSequence", &AttnService::ForkSequence);
  gate.unary("Decode", &AttnService::Decode);
  gate.unary("Prefill", &AttnService::Prefill);
  gate.server_streaming("ReadKv", &AttnService::ReadKv);
  // Shared memory (shm_handlers.cc).
  gate.unary("RegisterSharedMemory", &AttnService::RegisterSharedMemory);
  gate.unary("UnregisterSharedMemory", &AttnService::UnregisterSharedMemory);
  gate.unary("SharedMemoryStatus", &AttnService::SharedMemoryStatus);
}

}  // namespace attn::server
