// libFuzzer target: arbitrary bytes as each request message, through the server's validation and
// dispatch path on the CPU backend. The first byte picks the request type (0 matmul, 1 softmax,
// 2 attention), the rest is parsed as that message; whatever decodes is run and its outputs
// encoded as a response would be. Any crash, sanitizer report or leak is a finding.
#include <cstddef>
#include <cstdint>

#include <google/protobuf/stubs/logging.h>

#include "attn/executor.h"
#include "attn/registry.h"
#include "decode.h"

namespace {

struct Env {
  std::unique_ptr<attn::Executor> cpu = attn::make_cpu_executor();
  attn::server::DecodeContext ctx;
  Env() {
    google::protobuf::SetLogHandler(nullptr);  // parse errors of invalid UTF-8 are expected here
    ctx.registry = &attn::default_registry();
    ctx.targets = {cpu->target()};
    ctx.limits.max_elements = 1 << 12;  // small tensors keep each input fast
  }
};

template <class Args>
void run(Env& env, attn::Result<attn::server::PreparedOp<Args>> op, std::initializer_list<attn::v1::Tensor*> outputs,
         bool return_values) {
  if (!op.ok()) return;
  attn::ExecTimings t;
  const attn::OpCall call = attn::make_call(*op->variant, op->args);
  if (!env.cpu->execute(call, t).ok()) return;
  if (return_values)
    for (auto* out : outputs) attn::wire::convert_to_values(out);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static Env env;
  if (size < 1) return 0;
  const int which = data[0] % 3;
  const void* body = data + 1;
  const int body_size = static_cast<int>(size - 1);
  using namespace attn;
  switch (which) {
    case 0: {
      v1::MatmulRequest req;
      if (!req.ParseFromArray(body, body_size)) return 0;
      v1::MatmulResponse resp;
      run(env, server::decode_matmul(req, &resp, env.ctx), {resp.mutable_c()}, req.return_values());
      break;
    }
    case 1: {
      v1::SoftmaxRequest req;
      if (!req.ParseFromArray(body, body_size)) return 0;
      v1::SoftmaxResponse resp;
      run(env, server::decode_softmax(req, &resp, env.ctx), {resp.mutable_y()}, req.return_values());
      break;
    }
    default: {
      v1::AttentionRequest req;
      if (!req.ParseFromArray(body, body_size)) return 0;
      v1::AttentionResponse resp;
      run(env, server::decode_attention(req, &resp, env.ctx), {resp.mutable_o(), resp.mutable_lse()},
          req.return_values());
      break;
    }
  }
  return 0;
}
