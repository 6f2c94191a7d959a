// The gate's call reactors and the table's registration templates (included by the table,
// handlers/method_table.cc, which instantiates them for each method). See gate.h.
#pragma once

#include <grpcpp/impl/codegen/proto_utils.h>
#include <grpcpp/impl/codegen/server_callback_handlers.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/server_callback.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <functional>
#include <thread>

#include "attn/wire.h"
#include "rpc/codec.h"
#include "rpc/gate.h"
#include "rpc/metrics.h"

namespace attn::server {

struct GatedMethods::Shared {
  TokenCheck token;
  MemoryBudget* budget;
  Metrics* metrics;
  std::size_t max_message_bytes;
};

namespace gated {

// After a call that held this much, freed memory goes back to the system at once.
inline constexpr std::size_t kReturnMemoryAfterBytes = std::size_t{64} << 20;
// Requests from this size on are parsed and handed to their handler on a thread of their own.
inline constexpr std::size_t kOwnThreadBytes = std::size_t{16} << 20;
// Room held for an undeclared request of a method whose requests carry no tensors.
inline constexpr std::size_t kSmallRequestRoom = std::size_t{4} << 20;
// What a request whose client did not declare its size is charged while it arrives.
inline constexpr const char* kUndeclaredRoom =
    "request (its size undeclared: room for the largest request, --max-message-mb, until it "
    "has come; declare it in attn-request-bytes to be charged its size)";

// The size a call's client declares for its request (kRequestBytesKey), -1 when it declares
// none, or why the declaration is refused.
Result<std::int64_t> declared_request_bytes(const grpc::ServerContextBase& ctx,
                                            std::size_t max_message_bytes);

// Whether a request of this type can carry tensors (a Tensor field, at any depth): such a request
// may be as large as the largest message. Others (GetServerInfo's, ReleaseSequence's...) are small.
bool carries_tensors(const google::protobuf::Descriptor* request);

// The call's context as the gate builds it for every method: its gRPC context, method and memory
// hold, then its caller once the token is checked (the refusal otherwise).
inline Status admit(const GatedMethods::Shared& shared, grpc::CallbackServerContext* ctx,
                    const MethodInfo& method, MemoryHold& hold, CallContext& call) {
  call.grpc = ctx;
  call.method = &method;
  call.hold = &hold;
  ATTN_RETURN_IF_ERROR(shared.token.check(*ctx));
  call.caller = shared.token.owner(*ctx);
  return Status::Ok();
}

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
  using Handler = GatedMethods::UnaryHandler<Request, Response>;

  GatedUnaryCall(const GatedMethods::Shared& shared, const Handler& handler,
                 const MethodInfo& method, grpc::CallbackServerContext* ctx)
      : shared_(shared),
        handler_(handler),
        op_(method.op.c_str()),
        ctx_(ctx),
        hold_(shared.budget) {
    if (Status s = admit(shared_, ctx, method, hold_, call_); !s.ok()) {
      refuse(s);
      return;
    }
    // Room for the request before it is read, so that a call past the limit is refused before
    // its bytes come: the size its client declares, else the largest a request may be. gRPC reads
    // a message whole before the call sees it, so an undeclared body charged less could bring the
    // server past the bound before it could be refused (measured: 1.6x the bound with eight
    // undeclared 1 GB calls when it was charged 4 MiB). Both clients declare every request. An
    // undeclared call waits for that room (its body unread: HTTP/2 flow control holds the client
    // back) instead of being refused, so clients that do not declare are slowed, not failed, by
    // the bound; only a declared call past it is refused at once. A method whose requests carry no
    // tensors is charged a small room, so that probes (grpcurl's GetServerInfo) answer however
    // full the budget; gRPC's quota bounds a body past it.
    auto declared = declared_request_bytes(*ctx_, shared_.max_message_bytes);
    if (!declared.ok()) {
      refuse(declared.status());
      return;
    }
    declared_ = *declared;
    if (shared_.metrics) shared_.metrics->record_request_size(op_, declared_ >= 0);
    static const bool may_be_large = carries_tensors(Request::descriptor());
    const std::size_t room = declared_ >= 0 ? static_cast<std::size_t>(declared_)
                             : may_be_large ? shared_.max_message_bytes
                                            : kSmallRequestRoom;
    // A large request leaves a little of the budget free, so small calls answer beside it.
    const std::string what = declared_ >= 0 ? std::string(kRequestBytesKey)
                             : may_be_large ? kUndeclaredRoom
                                            : "request (undeclared)";
    if (declared_ < 0 && may_be_large && shared_.budget) {
      auto ticket = shared_.budget->take_when_free(room, what, shared_.budget->small_call_reserve(),
                                                   [this, room] { read_in(room); });
      if (!ticket.ok()) {
        refuse(ticket.status());
      } else if (*ticket == 0) {
        read_in(room);
      } else {
        waiting_ticket_.store(*ticket);
      }
      return;
    }
    if (Status s = room >= kOwnThreadBytes ? hold_.add_large(room, what) : hold_.add(room, what);
        !s.ok()) {
      refuse(s);
      return;
    }
    StartRead(&request_bytes_);
  }

  void OnReadDone(bool ok) override {
    if (!ok && ctx_->IsCancelled()) {
      // Reset while its request arrived: by its client, or by gRPC's resource quota (the client
      // then has RESOURCE_EXHAUSTED).
      refuse(cancelled("request: the call ended while its message arrived"));
      return;
    }
    if (!ok) {
      refuse(invalid_argument("request: expected one " + Request::descriptor()->full_name() +
                              ", got none (the call ended before its message)"));
      return;
    }
    bytes_in_ = request_bytes_.Length();
    if (declared_ >= 0 && bytes_in_ != static_cast<std::size_t>(declared_)) {
      request_bytes_.Clear();
      refuse(invalid_argument(std::string(kRequestBytesKey) + ": declared " +
                              std::to_string(declared_) + " bytes, the request brought " +
                              std::to_string(bytes_in_)));
      return;
    }
    // The room becomes the request's size. What is left goes back for this call's outputs: calls
    // waiting for room have it once this one is done, not between its request and its outputs.
    if (bytes_in_ <= hold_.bytes()) {
      hold_.shrink_to(bytes_in_);
    } else if (Status s = hold_.add(bytes_in_ - hold_.bytes(), "request"); !s.ok()) {
      request_bytes_.Clear();
      refuse(s);
      return;
    }
    if (bytes_in_ >= kOwnThreadBytes) {
      // Parsing it and allocating its outputs take a while (~0.3 s a GB): on gRPC's thread they
      // would hold up every other call's I/O, so a large request gets a thread of its own (the
      // budget bounds how many there are).
      std::thread([this] { dispatch(); }).detach();
      return;
    }
    dispatch();
  }

  void OnCancel() override {
    // Cancelled (or past its deadline) while it waited for room: it stops waiting and ends here.
    if (const std::uint64_t t = waiting_ticket_.exchange(0); t && shared_.budget->withdraw(t)) {
      refuse(
          cancelled("request: the call ended while it waited for room for its body "
                    "(--max-inflight-mb; its size undeclared)"));
      return;
    }
    if (auto* reactor = unary_.load()) reactor->OnCancel();
  }

  void OnDone() override {
    if (auto* reactor = unary_.load()) reactor->OnDone();
    const bool big = hold_.bytes() >= kReturnMemoryAfterBytes;
    delete this;
    if (big) return_free_memory();
  }

 private:
  // The room for the body is the call's: read it.
  void read_in(std::size_t room) {
    hold_.adopt(room);
    StartRead(&request_bytes_);
  }

  // Parses the request and hands it to the unary handler.
  void dispatch() {
    bool parsed;
    call_.received = std::chrono::steady_clock::now();
    call_.bytes_in = bytes_in_;
    if (bytes_in_ >= kLargeMessageBytes) {
      parsed = parse_large(request_bytes_, bytes_in_, request_);
    } else {
      grpc::ProtoBufferReader reader(&request_bytes_);
      parsed = request_.ParseFromZeroCopyStream(&reader);
    }
    request_bytes_.Clear();
    if (!parsed) {
      refuse(invalid_argument(
          "request: expected a serialized " + Request::descriptor()->full_name() + " of " +
          std::to_string(bytes_in_) + " bytes, got bytes that do not parse as one"));
      return;
    }
    bridge_.on_finish = [this](grpc::Status s) { respond(std::move(s)); };
    bridge_.on_send_initial_metadata = [this] { StartSendInitialMetadata(); };
    grpc::ServerUnaryReactor* reactor = handler_(call_, &request_, &response_);
    unary_.store(reactor);
    bridge_.bind(reactor);
  }

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
    // The request is no longer needed (the handler is done): its memory goes first.
    request_.Clear();
    bool own_buffer = false;
    const grpc::Status serialized = response_.ByteSizeLong() >= kLargeMessageBytes
                                        ? serialize_large(response_, &response_bytes_)
                                        : grpc::SerializationTraits<Response>::Serialize(
                                              response_, &response_bytes_, &own_buffer);
    response_.Clear();
    if (!serialized.ok()) {
      Finish(serialized);
      return;
    }
    StartWriteAndFinish(&response_bytes_, grpc::WriteOptions(), grpc::Status::OK);
  }

  const GatedMethods::Shared& shared_;
  // The table's, shared by every copy of the registration's function: alive as long as the server.
  const Handler& handler_;
  const char* op_;
  grpc::CallbackServerContext* ctx_;
  MemoryHold hold_;
  CallContext call_;
  std::int64_t declared_ = -1;                    // attn-request-bytes, -1: not sent
  std::atomic<std::uint64_t> waiting_ticket_{0};  // MemoryBudget::take_when_free's, while waiting
  std::size_t bytes_in_ = 0;
  grpc::ByteBuffer request_bytes_, response_bytes_;
  Request request_;
  Response response_;
  UnaryCallBridge bridge_;
  std::atomic<grpc::ServerUnaryReactor*> unary_{nullptr};
};

// The call object a server-streaming handler's reactor writes through: each message is
// serialized and written on the streaming call that carries it.
template <class Response>
class WriterCallBridge final : public grpc::ServerCallbackWriter<Response> {
 public:
  std::function<void(const Response*, grpc::WriteOptions, const grpc::Status*)> on_write;
  std::function<void(grpc::Status)> on_finish;
  std::function<void()> on_send_initial_metadata;

  void Finish(grpc::Status s) override { on_finish(std::move(s)); }
  void SendInitialMetadata() override { on_send_initial_metadata(); }
  void Write(const Response* msg, grpc::WriteOptions options) override {
    on_write(msg, options, nullptr);
  }
  void WriteAndFinish(const Response* msg, grpc::WriteOptions options, grpc::Status s) override {
    on_write(msg, options, &s);
  }
  void bind(grpc::ServerWriteReactor<Response>* reactor) {
    reactor_ = reactor;
    this->BindReactor(reactor);
  }

 private:
  grpc::internal::ServerReactor* reactor() override { return reactor_; }
  void CallOnDone() override {}
  grpc::ServerWriteReactor<Response>* reactor_ = nullptr;
};

// A server-streaming method (GetTensor, ReadKv) judged like the unary ones: the token before its
// request is read, then the request handed to its handler, whose writes go out one by one.
template <class Request, class Response>
class GatedWriterCall final : public grpc::ServerBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  using Handler = GatedMethods::WriterHandler<Request, Response>;

  GatedWriterCall(const GatedMethods::Shared& shared, const Handler& handler,
                  const MethodInfo& method, grpc::CallbackServerContext* ctx)
      : shared_(shared),
        handler_(handler),
        op_(method.op.c_str()),
        ctx_(ctx),
        hold_(shared.budget) {
    if (Status s = admit(shared_, ctx, method, hold_, call_); !s.ok()) {
      refuse(s);
      return;
    }
    StartRead(&request_bytes_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      refuse(ctx_->IsCancelled()
                 ? cancelled("request: the call ended while its message arrived")
                 : invalid_argument("request: expected one " + Request::descriptor()->full_name() +
                                    ", got none (the call ended before its message)"));
      return;
    }
    const std::size_t bytes = request_bytes_.Length();
    call_.bytes_in = bytes;
    grpc::ProtoBufferReader reader(&request_bytes_);
    Status held = hold_.add(bytes, "request");
    const bool parsed = held.ok() && request_.ParseFromZeroCopyStream(&reader);
    request_bytes_.Clear();
    if (!held.ok()) return refuse(held);
    if (!parsed) {
      refuse(invalid_argument("request: expected a serialized " +
                              Request::descriptor()->full_name() + " of " + std::to_string(bytes) +
                              " bytes, got bytes that do not parse as one"));
      return;
    }
    bridge_.on_write = [this](const Response* msg, grpc::WriteOptions options,
                              const grpc::Status* last) {
      response_bytes_.Clear();
      bool own_buffer = false;
      const grpc::Status serialized =
          grpc::SerializationTraits<Response>::Serialize(*msg, &response_bytes_, &own_buffer);
      if (!serialized.ok()) return Finish(serialized);
      if (last) return StartWriteAndFinish(&response_bytes_, options, *last);
      StartWrite(&response_bytes_, options);
    };
    bridge_.on_finish = [this](grpc::Status s) { Finish(std::move(s)); };
    bridge_.on_send_initial_metadata = [this] { StartSendInitialMetadata(); };
    grpc::ServerWriteReactor<Response>* reactor = handler_(call_, &request_);
    writer_.store(reactor);
    bridge_.bind(reactor);
  }

  void OnSendInitialMetadataDone(bool ok) override {
    if (auto* reactor = writer_.load()) reactor->OnSendInitialMetadataDone(ok);
  }
  void OnWriteDone(bool ok) override {
    if (auto* reactor = writer_.load()) reactor->OnWriteDone(ok);
  }
  void OnCancel() override {
    if (auto* reactor = writer_.load()) reactor->OnCancel();
  }
  void OnDone() override {
    if (auto* reactor = writer_.load()) reactor->OnDone();
    delete this;
  }

 private:
  void refuse(const Status& s) {
    spdlog::warn("{} from {} failed: {}", op_, ctx_->peer(), s.to_string());
    const grpc::Status g = wire::to_grpc(s);
    if (shared_.metrics) shared_.metrics->record(op_, "", g.error_code(), nullptr, 0, 0);
    Finish(g);
  }

  const GatedMethods::Shared& shared_;
  // The table's, shared by every copy of the registration's function: alive as long as the server.
  const Handler& handler_;
  const char* op_;
  grpc::CallbackServerContext* ctx_;
  MemoryHold hold_;
  CallContext call_;
  grpc::ByteBuffer request_bytes_, response_bytes_;
  Request request_;
  WriterCallBridge<Response> bridge_;
  std::atomic<grpc::ServerWriteReactor<Response>*> writer_{nullptr};
};

}  // namespace gated

template <class Request, class Response>
void GatedMethods::unary(const char* method, UnaryHandler<Request, Response> handler) {
  const MethodInfo& info = add_path(method, grpc::internal::RpcMethod::BIDI_STREAMING);
  Shared* shared = shared_.get();
  MarkMethodRawCallback(
      static_cast<int>(paths_.size() - 1),
      new grpc::internal::CallbackBidiHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
          [shared,
           handler = std::make_shared<const UnaryHandler<Request, Response>>(std::move(handler)),
           &info](grpc::CallbackServerContext* ctx) {
            return new gated::GatedUnaryCall<Request, Response>(*shared, *handler, info, ctx);
          }));
}

template <class Request, class Response>
void GatedMethods::server_streaming(const char* method, WriterHandler<Request, Response> handler) {
  const MethodInfo& info = add_path(method, grpc::internal::RpcMethod::BIDI_STREAMING);
  Shared* shared = shared_.get();
  MarkMethodRawCallback(
      static_cast<int>(paths_.size() - 1),
      new grpc::internal::CallbackBidiHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
          [shared,
           handler = std::make_shared<const WriterHandler<Request, Response>>(std::move(handler)),
           &info](grpc::CallbackServerContext* ctx) {
            return new gated::GatedWriterCall<Request, Response>(*shared, *handler, info, ctx);
          }));
}

template <class Request, class Response>
void GatedMethods::client_streaming(const char* method, ReaderHandler<Request, Response> handler) {
  (void)add_path(method, grpc::internal::RpcMethod::CLIENT_STREAMING);
  MarkMethodCallback(
      static_cast<int>(paths_.size() - 1),
      new grpc::internal::CallbackClientStreamingHandler<Request, Response>(std::move(handler)));
}

}  // namespace attn::server
