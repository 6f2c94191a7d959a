#include "rpc/gate.h"

#include <algorithm>
#include <charconv>
#include <vector>

#include "handlers/attn_service.h"
#include "rpc/gated_call.h"

namespace attn::server {

Result<std::int64_t> gated::declared_request_bytes(const grpc::ServerContextBase& ctx,
                                                   std::size_t max_message_bytes) {
  const auto& metadata = ctx.client_metadata();
  const auto it = metadata.find(kRequestBytesKey);
  if (it == metadata.end()) return std::int64_t{-1};
  const std::string value(it->second.data(), it->second.size());
  std::int64_t bytes = -1;
  const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), bytes);
  if (error != std::errc() || end != value.data() + value.size() || bytes < 0) {
    return invalid_argument(std::string(kRequestBytesKey) +
                            ": expected the request's size in bytes, got \"" + value.substr(0, 32) +
                            "\"");
  }
  if (static_cast<std::size_t>(bytes) > max_message_bytes) {
    return resource_exhausted(std::string(kRequestBytesKey) + ": " + std::to_string(bytes) +
                              " bytes, over this server's largest message of " +
                              std::to_string(max_message_bytes) + " (--max-message-mb)");
  }
  return bytes;
}

namespace {

bool reaches_tensor(const google::protobuf::Descriptor* d,
                    std::vector<const google::protobuf::Descriptor*>& seen) {
  if (d == v1::Tensor::descriptor()) return true;
  if (std::find(seen.begin(), seen.end(), d) != seen.end()) return false;
  seen.push_back(d);
  for (int i = 0; i < d->field_count(); ++i) {
    const auto* f = d->field(i);
    if (f->message_type() && reaches_tensor(f->message_type(), seen)) return true;
  }
  return false;
}

}  // namespace

bool gated::carries_tensors(const google::protobuf::Descriptor* request) {
  std::vector<const google::protobuf::Descriptor*> seen;
  return reaches_tensor(request, seen);
}

namespace {

class UnimplementedCall final : public grpc::ServerGenericBidiReactor {
 public:
  explicit UnimplementedCall(const std::string& method) {
    Finish(grpc::Status(
        grpc::StatusCode::UNIMPLEMENTED,
        "method: expected a method of this server's services, got \"" + method + "\""));
  }
  void OnDone() override { delete this; }
};

}  // namespace

const MethodInfo& GatedMethods::add_path(const char* method,
                                         grpc::internal::RpcMethod::RpcType type) {
  const MethodInfo* info = find_method(method);
  if (!info) {
    spdlog::critical("the method table names {}, which attn.v1.AttnService does not have", method);
    std::abort();
  }
  const std::string& path = paths_.emplace_back(info->path);
  served_.emplace_back(method);
  AddMethod(new grpc::internal::RpcServiceMethod(path.c_str(), type, nullptr));
  return *info;
}

GatedMethods::GatedMethods(AttnService& service, GateConfig config)
    : shared_(new Shared{TokenCheck(config.token), config.budget, config.metrics,
                         config.max_message_bytes}) {
  bind_methods(*this, service);
  if (const std::string problems = check_served_methods(served_); !problems.empty()) {
    // A method of the proto without its table entry would go unserved.
    spdlog::critical("the method table and attn.v1.AttnService disagree: {}", problems);
    std::abort();
  }
}

GatedMethods::~GatedMethods() = default;

grpc::ServerGenericBidiReactor* UnknownMethods::CreateReactor(
    grpc::GenericCallbackServerContext* ctx) {
  return new UnimplementedCall(ctx->method());
}

}  // namespace attn::server
