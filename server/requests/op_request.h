// Requests to kernel-library arguments: every field checked, the variant chosen, the outputs
// allocated inside the response (kernels write there directly), or a Status naming the problem.
#pragma once

#include <vector>

#include "attn/registry.h"
#include "attn/v1/attn.pb.h"
#include "attn/wire.h"
#include "rpc/call_context.h"
#include "state/shared_memory.h"
#include "state/tensor_store.h"

namespace attn::server {

struct RequestContext {
  const Registry* registry = nullptr;
  // Where variants may run, the device first: a CUDA server keeps the CPU as a fallback for
  // what its GPU variants cannot take.
  std::vector<Target> targets;
  wire::TensorLimits limits;
  // Resident tensors (null: none): inputs given by handle, outputs kept on a device.
  TensorStore* store = nullptr;
  // Every executor's target, by executor index (the index ResidentTensor::executor uses), and
  // the device it runs on: a GPU's executors (one per stream) share its memory.
  std::vector<Target> executor_targets;
  std::vector<int> executor_devices;
  // Each executor's CUDA ordinal, -1 for the CPU's (CUDA shared-memory regions pin ops to theirs).
  std::vector<int> executor_cuda_ordinals;
  // Shared-memory regions (null: --shared-memory is off): inputs named by region, outputs
  // written into one, of the call's caller (CallContext::caller).
  SharedMemoryRegistry* shm = nullptr;
};

// A tiny op costs less than a GPU round trip (copies, a launch, a sync: ~30 us) or a hand-off to
// a worker thread (~20 us): with no variant named it runs on the CPU, on the gRPC thread when the
// CPU is idle.
inline constexpr std::int64_t kTinyOpMaxFlops = 1 << 20;
inline constexpr std::int64_t kTinyOpMaxBytes = 256 << 10;
inline bool tiny(const OpCost& c) {
  return c.flops <= kTinyOpMaxFlops && c.bytes <= kTinyOpMaxBytes;
}

// Whether `info` can run on one of the context's targets.
bool available(const VariantInfo& info, const RequestContext& ctx);

// What a call's tensors hold while it runs, whatever their source (inline, resident, shared
// memory, CUDA IPC): the buffers and holds behind its views, and the device they pin it to.
struct RequestTensors {
  std::vector<wire::DecodedTensor> inputs;                // keeps inputs given as `values` alive
  std::vector<std::shared_ptr<ResidentTensor>> resident;  // inputs given by handle, held in use
  std::vector<std::shared_ptr<ResidentTensor>> kept;      // outputs to publish once the op succeeds
  // Host buffers of inputs read from shared memory and of outputs bound for it.
  std::vector<StagingBuffer> shm_buffers;
  struct ShmOutput {
    SharedMemoryRegistry::Slice slice;
    std::string field;
    const void* data = nullptr;
  };
  std::vector<ShmOutput> shm_outputs;  // written once the op succeeds
  // CUDA regions the op reads or writes in place, held open until it is done.
  std::vector<std::shared_ptr<SharedMemoryRegion>> shm_regions;
  // An executor of the device that must run it (where its resident inputs or kept outputs live;
  // any executor of that device will do), or -1.
  int executor = -1;

  // The bytes of inputs read from host shared memory (for the metrics).
  std::size_t shm_bytes_in() const {
    std::size_t n = 0;
    for (const auto& in : inputs)
      for (const auto& b : shm_buffers)
        if (in.view.data == b.get()) n += in.view.bytes();
    return n;
  }
};

template <class Args>
struct PreparedOp : RequestTensors {
  Args args;
  const Variant<Args>* variant = nullptr;
};

// The one decoder of a request's input tensors, for every op: `t` inline (data or values), by
// handle (a resident tensor, which pins `held` to its device) or in a shared-memory region (host:
// read into a staging buffer charged to the call; CUDA: viewed in place, pinning `held` to its
// GPU). What keeps the view valid is added to `held`; refusals name `field`.
Result<wire::DecodedTensor> any_input(const v1::Tensor& t, bool present, const char* field,
                                      const RequestContext& ctx, const CallContext& call,
                                      RequestTensors& held);

// An op's optional attention sinks (AttentionArgs::sinks): none when absent (an empty view), else
// decoded from any source as any_input does, float32 [heads_q], each value finite where it can be
// read here (host memory); refusals name `sinks`.
Result<TensorView> sinks_input(const v1::Tensor& t, bool present, std::int64_t heads_q,
                               const RequestContext& ctx, const CallContext& call,
                               RequestTensors& held);

// Outputs (the requests' output_shm, one-shot ops' and Decode/Prefill's alike). Where outputs go
// into registered shared memory, in the order a request is parsed:
// - check_output_refs: at most `outputs` entries (INVALID_ARGUMENT naming output_shm otherwise);
// - pin_output_regions: entries naming a CUDA region pin `held` to its GPU, before a variant is
//   chosen;
// - output_ref(refs, i): output i's entry, or null (then, or with an empty region, it is inline);
// - shm_output: an output placed in the region `to_shm` names, its range checked (refusals name
//   "output_shm (<field>)"); `out` (the response's tensor) then carries dtype, shape and shm. A
//   host region's output is staged in a buffer charged to the call and written by
//   write_shm_outputs once the op has succeeded; a CUDA region's is written in place.
Status check_output_refs(const google::protobuf::RepeatedPtrField<v1::SharedMemoryRef>& refs,
                         int outputs);
Status pin_output_regions(const google::protobuf::RepeatedPtrField<v1::SharedMemoryRef>& refs,
                          const RequestContext& ctx, const CallContext& call, RequestTensors& held);
const v1::SharedMemoryRef* output_ref(
    const google::protobuf::RepeatedPtrField<v1::SharedMemoryRef>& refs, int i);
Result<TensorView> shm_output(DType dtype, const Shape& shape, v1::Tensor* out,
                              const v1::SharedMemoryRef& to_shm, const char* field,
                              const RequestContext& ctx, const CallContext& call,
                              RequestTensors& held);
// Writes the staged outputs of `held` into their host regions; `written` gets their bytes.
Status write_shm_outputs(SharedMemoryRegistry& shm, const RequestTensors& held,
                         std::size_t* written);

Result<PreparedOp<MatmulArgs>> parse_matmul(const v1::MatmulRequest& req, v1::MatmulResponse* resp,
                                            const RequestContext& ctx, const CallContext& call);
Result<PreparedOp<SoftmaxArgs>> parse_softmax(const v1::SoftmaxRequest& req,
                                              v1::SoftmaxResponse* resp, const RequestContext& ctx,
                                              const CallContext& call);
Result<PreparedOp<AttentionArgs>> parse_attention(const v1::AttentionRequest& req,
                                                  v1::AttentionResponse* resp,
                                                  const RequestContext& ctx,
                                                  const CallContext& call);

// Each RPC of an op, described once for the generic handler (OpHandlers::serve): its Args, its
// decoding and the response tensors that carry its outputs.
template <class Request>
struct RpcOp;

template <>
struct RpcOp<v1::MatmulRequest> {
  using Args = MatmulArgs;
  static constexpr auto parse = parse_matmul;
  static std::vector<v1::Tensor*> outputs(const v1::MatmulRequest&, v1::MatmulResponse* r) {
    return {r->mutable_c()};
  }
};

template <>
struct RpcOp<v1::SoftmaxRequest> {
  using Args = SoftmaxArgs;
  static constexpr auto parse = parse_softmax;
  static std::vector<v1::Tensor*> outputs(const v1::SoftmaxRequest&, v1::SoftmaxResponse* r) {
    return {r->mutable_y()};
  }
};

template <>
struct RpcOp<v1::AttentionRequest> {
  using Args = AttentionArgs;
  static constexpr auto parse = parse_attention;
  static std::vector<v1::Tensor*> outputs(const v1::AttentionRequest& req,
                                          v1::AttentionResponse* r) {
    if (!req.return_lse()) return {r->mutable_o()};
    return {r->mutable_o(), r->mutable_lse()};
  }
};

}  // namespace attn::server
