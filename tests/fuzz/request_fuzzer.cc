// libFuzzer target: arbitrary bytes as each request message, through the server's validation and
// dispatch path on the CPU backend. The first byte picks the request type (0 matmul, 1 softmax,
// 2 attention, 3 Decode, 4 Prefill), the rest is parsed as that message; whatever decodes is run
// and its outputs encoded as a response would be (Decode and Prefill into a small KV cache made
// for the input: planned, run, committed; with expected_lengths, sent a second time as a repeat).
// Any crash, sanitizer report or leak is a finding.
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>

#include "attn/executor.h"
#include "attn/registry.h"
#include "requests/kv_request.h"
#include "requests/op_request.h"
#include "state/kv_cache.h"

namespace {

struct Env {
  std::unique_ptr<attn::Executor> cpu = attn::make_cpu_executor();
  attn::server::RequestContext ctx;
  attn::server::CallContext call;  // in-process: no gRPC call, no memory budget
  attn::server::TensorStore quota{{cpu.get()}, {}};
  attn::server::KvCacheStore caches{{cpu.get()}, &quota, {}};
  Env() {
    google::protobuf::SetLogHandler(nullptr);  // parse errors of invalid UTF-8 are expected here
    ctx.registry = &attn::default_registry();
    ctx.targets = {cpu->target()};
    ctx.limits.max_elements = 1 << 12;  // small tensors keep each input fast
  }
};

template <class Args>
void run(Env& env, attn::Result<attn::server::PreparedOp<Args>> op,
         std::initializer_list<attn::v1::Tensor*> outputs, bool return_values) {
  if (!op.ok()) return;
  attn::ExecTimings t;
  const attn::OpCall call = attn::make_call(*op->variant, op->args);
  if (!env.cpu->execute(call, t).ok()) return;
  if (return_values)
    for (auto* out : outputs) attn::wire::convert_to_values(out);
}

// A Decode or Prefill into a fresh cache of 2 layers, 2 kv heads, D 8, 16 pages of 4 tokens.
template <class Request, class Response>
void run_kv(Env& env, const Request& req, const attn::Result<std::vector<std::int64_t>>& fresh,
            bool create) {
  if (!fresh.ok()) return;
  attn::server::KvCacheConfig config;
  config.layers = 2;
  config.heads_kv = 2;
  config.head_dim = 8;
  config.page_size = 4;
  config.dtype = attn::DType::kFloat32;
  config.pages = 16;
  auto cache = env.caches.create(config, 0, 0);
  if (!cache.ok()) return;
  Response resp;
  auto call = attn::server::parse_kv_request(req, &resp, **cache, *fresh, env.ctx, env.call);
  if (call.ok()) {
    const std::vector<std::string> ids(req.sequence_ids().begin(), req.sequence_ids().end());
    // With expected_lengths, the same call twice: applied and recorded, then judged a repeat.
    const attn::server::Expectation* expect = call->expectation ? &*call->expectation : nullptr;
    for (int round = 0; round < (expect ? 2 : 1); ++round) {
      auto plan = (*cache)->plan_append(req.layer(), ids, *fresh, create, expect);
      if (!plan.ok() || plan->repeat_of) break;
      auto& args = call->args;
      attn::server::bind_plan(plan->plan, args);
      attn::ExecTimings t;
      if (!env.cpu->execute(attn::make_call(*call->variant, args), t).ok()) {
        (*cache)->abort(*plan);
        break;
      }
      if (plan->record) plan->record->o = resp.o();
      (*cache)->commit(*plan);
    }
  }
  (void)env.caches.erase((*cache)->handle());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Env env;
  if (size < 1) return 0;
  const int which = data[0] % 5;
  const void* body = data + 1;
  const int body_size = static_cast<int>(size - 1);
  using namespace attn;
  switch (which) {
    case 0: {
      v1::MatmulRequest req;
      if (!req.ParseFromArray(body, body_size)) return 0;
      v1::MatmulResponse resp;
      run(env, server::parse_matmul(req, &resp, env.ctx, env.call), {resp.mutable_c()},
          req.return_values());
      break;
    }
    case 1: {
      v1::SoftmaxRequest req;
      if (!req.ParseFromArray(body, body_size)) return 0;
      v1::SoftmaxResponse resp;
      run(env, server::parse_softmax(req, &resp, env.ctx, env.call), {resp.mutable_y()},
          req.return_values());
      break;
    }
    case 3: {
      v1::DecodeRequest req;
      if (!req.ParseFromArray(body, body_size)) return 0;
      run_kv<v1::DecodeRequest, v1::DecodeResponse>(
          env, req, std::vector<std::int64_t>(static_cast<std::size_t>(req.sequence_ids_size()), 1),
          false);
      break;
    }
    case 4: {
      v1::PrefillRequest req;
      if (!req.ParseFromArray(body, body_size)) return 0;
      run_kv<v1::PrefillRequest, v1::PrefillResponse>(env, req, server::prefill_lens(req), true);
      break;
    }
    default: {
      v1::AttentionRequest req;
      if (!req.ParseFromArray(body, body_size)) return 0;
      v1::AttentionResponse resp;
      run(env, server::parse_attention(req, &resp, env.ctx, env.call),
          {resp.mutable_o(), resp.mutable_lse()}, req.return_values());
      break;
    }
  }
  return 0;
}
