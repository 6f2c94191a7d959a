#include "gated_calls.h"

#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/server_callback.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <functional>

#include "attn/wire.h"
#include "attn_service.h"
#include "metrics.h"

namespace attn::server {

struct GatedMethods::Shared {
  AttnService& service;
  TokenCheck token;
  MemoryBudget* budget;
  Metrics* metrics;
};

namespace {

// After a call that held this much, freed memory goes back to the system at once.
constexpr std::size_t kReturnMemoryAfterBytes = std::size_t{64} << 20;

// The call object a unary handler's reactor finishes through: it forwards to the streaming call
// that carries it.
class UnaryCallBridge final : public grpc::ServerCallbackUnary {
 public:
  std::function<void(grpc::Status)> on_finish;
  std::function<void()> on_send_initial_metadata;

  void Finish(grpc::Status s) override { on_finish(std::move(s)); }
  void SendInitialMetadata() override { on_send_initial_metadata(); }
  void bind(grpc::ServerUnaryReactor* reactor) {
    reactor_ = reactor;
    BindReactor(reactor);
  }

 private:
  grpc::internal::ServerReactor* reactor() override { return reactor_; }
  void CallOnDone() override {}  // the streaming call's OnDone ends both
  grpc::ServerUnaryReactor* reactor_ = nullptr;
};

template <class Request, class Response>
class GatedUnaryCall final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  using Handler = grpc::ServerUnaryReactor* (AttnService::*)(grpc::CallbackServerContext*, const Request*, Response*);

  GatedUnaryCall(const GatedMethods::Shared& shared, Handler handler, const char* op,
                 grpc::CallbackServerContext* ctx)
      : shared_(shared), handler_(handler), op_(op), ctx_(ctx), hold_(shared.budget) {
    if (Status s = shared_.token.check(*ctx_); !s.ok()) {
      refuse(s);
      return;
    }
    StartRead(&request_bytes_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      refuse(invalid_argument("request: expected one " + Request::descriptor()->full_name() +
                              ", got none (the call ended before its message)"));
      return;
    }
    bytes_in_ = request_bytes_.Length();
    if (Status s = hold_.add(bytes_in_, "request"); !s.ok()) {
      request_bytes_.Clear();
      refuse(s);
      return;
    }
    grpc::ProtoBufferReader reader(&request_bytes_);
    const bool parsed = request_.ParseFromZeroCopyStream(&reader);
    request_bytes_.Clear();
    if (!parsed) {
      refuse(invalid_argument("request: expected a serialized " + Request::descriptor()->full_name() + " of " +
                              std::to_string(bytes_in_) + " bytes, got bytes that do not parse as one"));
      return;
    }
    bridge_.on_finish = [this](grpc::Status s) { respond(std::move(s)); };
    bridge_.on_send_initial_metadata = [this] { StartSendInitialMetadata(); };
    grpc::ServerUnaryReactor* reactor;
    {
      CurrentCallHold current(&hold_);
      reactor = (shared_.service.*handler_)(ctx_, &request_, &response_);
    }
    unary_.store(reactor);
    bridge_.bind(reactor);
  }

  void OnCancel() override {
    if (auto* reactor = unary_.load()) reactor->OnCancel();
  }

  void OnDone() override {
    if (auto* reactor = unary_.load()) reactor->OnDone();
    const bool big = hold_.bytes() >= kReturnMemoryAfterBytes;
    delete this;
    if (big) return_free_memory();
  }

 private:
  void refuse(const Status& s) {
    spdlog::warn("{} from {} failed: {}", op_, ctx_->peer(), s.to_string());
    const grpc::Status g = wire::to_grpc(s);
    if (shared_.metrics) shared_.metrics->record(op_, "", g.error_code(), nullptr, bytes_in_, 0);
    Finish(g);
  }

  // The handler finished: its response (when OK) is the one message back.
  void respond(grpc::Status s) {
    if (!s.ok()) {
      Finish(std::move(s));
      return;
    }
    bool own_buffer = false;
    const grpc::Status serialized =
        grpc::SerializationTraits<Response>::Serialize(response_, &response_bytes_, &own_buffer);
    response_.Clear();
    if (!serialized.ok()) {
      Finish(serialized);
      return;
    }
    StartWriteAndFinish(&response_bytes_, grpc::WriteOptions(), grpc::Status::OK);
  }

  const GatedMethods::Shared& shared_;
  Handler handler_;
  const char* op_;
  grpc::CallbackServerContext* ctx_;
  MemoryHold hold_;
  std::size_t bytes_in_ = 0;
  grpc::ByteBuffer request_bytes_, response_bytes_;
  Request request_;
  Response response_;
  UnaryCallBridge bridge_;
  std::atomic<grpc::ServerUnaryReactor*> unary_{nullptr};
};

class UnimplementedCall final : public grpc::ServerGenericBidiReactor {
 public:
  explicit UnimplementedCall(const std::string& method) {
    Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "method: expected a method of this server's services, got \"" + method + "\""));
  }
  void OnDone() override { delete this; }
};

}  // namespace

template <class Request, class Response>
void GatedMethods::add(const char* method, const char* op,
                       grpc::ServerUnaryReactor* (AttnService::*handler)(grpc::CallbackServerContext*, const Request*,
                                                                         Response*)) {
  const std::string& path = paths_.emplace_back("/attn.v1.AttnService/" + std::string(method));
  Shared* shared = shared_.get();
  AddMethod(new grpc::internal::RpcServiceMethod(path.c_str(), grpc::internal::RpcMethod::BIDI_STREAMING, nullptr));
  MarkMethodRawCallback(
      static_cast<int>(paths_.size() - 1),
      new grpc::internal::CallbackBidiHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
          [shared, handler, op](grpc::CallbackServerContext* ctx) {
            return new GatedUnaryCall<Request, Response>(*shared, handler, op, ctx);
          }));
}

GatedMethods::GatedMethods(AttnService& service, GateConfig config)
    : shared_(new Shared{service, TokenCheck(config.token), config.budget, config.metrics}) {
  // Every unary method of attn.v1.AttnService (AttnService leaves them to this service); the
  // labels are the ones their handlers log and count under.
  add("Matmul", "matmul", &AttnService::Matmul);
  add("Softmax", "softmax", &AttnService::Softmax);
  add("Attention", "attention", &AttnService::Attention);
  add("ListKernels", "list_kernels", &AttnService::ListKernels);
  add("GetServerInfo", "get_server_info", &AttnService::GetServerInfo);
  add("DeleteTensor", "delete_tensor", &AttnService::DeleteTensor);
  add("ListTensors", "list_tensors", &AttnService::ListTensors);
  add("Benchmark", "benchmark", &AttnService::Benchmark);
  add("Echo", "echo", &AttnService::Echo);
  add("CreateKvCache", "create_kv_cache", &AttnService::CreateKvCache);
  add("DescribeKvCache", "describe_kv_cache", &AttnService::DescribeKvCache);
  add("ListKvCaches", "list_kv_caches", &AttnService::ListKvCaches);
  add("DeleteKvCache", "delete_kv_cache", &AttnService::DeleteKvCache);
  add("ReleaseSequences", "release_sequences", &AttnService::ReleaseSequences);
  add("ForkSequence", "fork_sequence", &AttnService::ForkSequence);
  add("Decode", "paged_decode", &AttnService::Decode);
  add("Prefill", "paged_prefill", &AttnService::Prefill);
  int unary = 0;
  const auto* methods = v1::MatmulRequest::descriptor()->file()->FindServiceByName("AttnService");
  for (int i = 0; i < methods->method_count(); ++i)
    unary += !methods->method(i)->client_streaming() && !methods->method(i)->server_streaming();
  if (static_cast<std::size_t>(unary) != paths_.size()) {
    // AttnService leaves every unary method to this service: one missing here would be unserved.
    spdlog::critical("GatedMethods serves {} methods, attn.v1.AttnService has {} unary ones", paths_.size(), unary);
    std::abort();
  }
}

GatedMethods::~GatedMethods() = default;

grpc::ServerGenericBidiReactor* UnknownMethods::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new UnimplementedCall(ctx->method());
}

}  // namespace attn::server
