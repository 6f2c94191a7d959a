#include "attn/executor.h"

namespace attn {

std::string DeviceInfo::label() const {
  if (backend == Backend::kCpu) return name;
  return "cuda:" + std::to_string(ordinal) + " " + name;
}

OpCall make_call(const MatmulVariant& v, MatmulArgs& args) {
  return {{&args.a, &args.b}, {&args.c}, [&v, &args](Stream& s) { return v.run(args, s); }};
}

OpCall make_call(const SoftmaxVariant& v, SoftmaxArgs& args) {
  return {{&args.x}, {&args.y}, [&v, &args](Stream& s) { return v.run(args, s); }};
}

OpCall make_call(const AttentionVariant& v, AttentionArgs& args) {
  OpCall call{{&args.q, &args.k, &args.v}, {&args.o},
              [&v, &args](Stream& s) { return v.run(args, s); }};
  if (!args.lse.empty()) call.outputs.push_back(&args.lse);
  return call;
}

}  // namespace attn
