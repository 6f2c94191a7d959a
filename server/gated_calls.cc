#include "gated_calls.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/impl/rpc_service_method.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/server_callback.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <charconv>
#include <functional>
#include <thread>

#include "attn/wire.h"
#include "attn_service.h"
#include "metrics.h"

namespace attn::server {

struct GatedMethods::Shared {
  AttnService& service;
  TokenCheck token;
  MemoryBudget* budget;
  Metrics* metrics;
  std::size_t max_message_bytes;
};

namespace {

// After a call that held this much, freed memory goes back to the system at once.
constexpr std::size_t kReturnMemoryAfterBytes = std::size_t{64} << 20;
// Requests and response fields from this size on are read and sent without extra copies.
constexpr std::size_t kLargeBytes = std::size_t{1} << 20;
// Requests from this size on are parsed and handed to their handler on a thread of their own.
constexpr std::size_t kOwnThreadBytes = std::size_t{16} << 20;

// A request's bytes as gRPC received them (a chain of slices), handed to the parser one slice at a
// time, each let go as soon as the parser has moved past it (protobuf keeps no pointer into a
// buffer once it asks for the next), so the request never exists twice in full.
class ConsumingSliceStream final : public google::protobuf::io::ZeroCopyInputStream {
 public:
  explicit ConsumingSliceStream(grpc::ByteBuffer& buffer) {
    (void)buffer.Dump(&slices_);  // references, not copies; fails only on a compressed buffer
    buffer.Clear();
  }
  bool Next(const void** data, int* size) override {
    if (backed_up_ > 0) {
      const grpc::Slice& s = slices_[next_ - 1];
      *data = s.end() - backed_up_;
      *size = backed_up_;
      position_ += backed_up_;
      backed_up_ = 0;
      return true;
    }
    if (next_ > 0) slices_[next_ - 1] = grpc::Slice();
    if (next_ == slices_.size()) return false;
    const grpc::Slice& s = slices_[next_++];
    *data = s.begin();
    *size = static_cast<int>(s.size());
    position_ += static_cast<std::int64_t>(s.size());
    return true;
  }
  void BackUp(int count) override {
    backed_up_ = count;
    position_ -= count;
  }
  bool Skip(int count) override {
    const void* data;
    int size;
    while (count > 0) {
      if (!Next(&data, &size)) return false;
      if (size > count) {
        BackUp(size - count);
        return true;
      }
      count -= size;
    }
    return true;
  }
  std::int64_t ByteCount() const override { return position_; }

 private:
  std::vector<grpc::Slice> slices_;
  std::size_t next_ = 0;
  int backed_up_ = 0;
  std::int64_t position_ = 0;
};

bool is_tensor(const google::protobuf::FieldDescriptor* f) {
  return f->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE && !f->is_repeated() &&
         f->message_type() == v1::Tensor::descriptor();
}

// Parses a large request so that its big fields (its Tensors' data) are read into
// strings that already have room for them: protobuf would otherwise grow them by doubling, and a
// 1 GB field would exist twice while it is copied to its next size. The room is address space
// (the pages are touched only as bytes arrive). Tensor fields the request did not carry are
// left unset as before.
bool parse_large(grpc::ByteBuffer& buffer, std::size_t size, google::protobuf::Message& message) {
  const auto* descriptor = message.GetDescriptor();
  const auto* reflection = message.GetReflection();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const auto* f = descriptor->field(i);
    if (!is_tensor(f)) continue;
    std::string* data = static_cast<v1::Tensor*>(reflection->MutableMessage(&message, f))->mutable_data();
    data->reserve(size);
    advise_huge_pages(data->data(), data->capacity());
  }
  ConsumingSliceStream stream(buffer);
  google::protobuf::io::CodedInputStream coded(&stream);
  if (!message.MergeFromCodedStream(&coded)) return false;
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const auto* f = descriptor->field(i);
    if (is_tensor(f) && reflection->GetMessage(message, f).ByteSizeLong() == 0) reflection->ClearField(&message, f);
  }
  return true;
}

// A response whose large tensors' bytes go out from where the handler wrote them, without a serialized
// copy: the message without them, then for each tensor a second occurrence of its field holding only
// its data (protobuf merges repeated occurrences of a message field, so every parser reads the
// same message). The strings live until gRPC has sent them.
grpc::Status serialize_large(google::protobuf::Message& message, grpc::ByteBuffer* out) {
  using google::protobuf::internal::WireFormatLite;
  const auto* descriptor = message.GetDescriptor();
  const auto* reflection = message.GetReflection();
  const auto* data_field = v1::Tensor::descriptor()->FindFieldByName("data");
  struct Taken {
    int field;
    std::string* bytes;
  };
  std::vector<Taken> taken;
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const auto* f = descriptor->field(i);
    if (!is_tensor(f) || !reflection->HasField(message, f)) continue;
    auto* tensor = static_cast<v1::Tensor*>(reflection->MutableMessage(&message, f));
    if (tensor->data().size() < kLargeBytes) continue;
    auto* bytes = new std::string;
    tensor->mutable_data()->swap(*bytes);
    taken.push_back({f->number(), bytes});
  }
  std::vector<grpc::Slice> slices;
  slices.emplace_back(message.SerializeAsString());
  for (const Taken& t : taken) {
    std::string frame;
    google::protobuf::io::StringOutputStream frame_stream(&frame);
    {
      google::protobuf::io::CodedOutputStream coded(&frame_stream);
      const std::uint32_t n = static_cast<std::uint32_t>(t.bytes->size());
      coded.WriteTag(WireFormatLite::MakeTag(t.field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
      const std::uint32_t data_tag = WireFormatLite::MakeTag(data_field->number(), WireFormatLite::WIRETYPE_LENGTH_DELIMITED);
      coded.WriteVarint32(static_cast<std::uint32_t>(google::protobuf::io::CodedOutputStream::VarintSize32(data_tag) +
                                                     google::protobuf::io::CodedOutputStream::VarintSize32(n)) + n);
      coded.WriteTag(data_tag);
      coded.WriteVarint32(n);
    }
    slices.emplace_back(std::move(frame));
    // gRPC lets go of it on its own thread: unmapping a GB takes ~50 ms, which are not its to spend.
    slices.emplace_back(t.bytes->data(), t.bytes->size(),
                        [](void* s) { std::thread([s] { delete static_cast<std::string*>(s); }).detach(); }, t.bytes);
  }
  *out = grpc::ByteBuffer(slices.data(), slices.size());
  return grpc::Status::OK;
}

// Room held for a request whose client did not declare its size.
constexpr std::size_t kUndeclaredRequestBytes = std::size_t{4} << 20;

// The size a call's client declares for its request (kRequestBytesKey), -1 when it declares
// none, or why the declaration is refused.
Result<std::int64_t> declared_request_bytes(const grpc::ServerContextBase& ctx, std::size_t max_message_bytes) {
  const auto& metadata = ctx.client_metadata();
  const auto it = metadata.find(kRequestBytesKey);
  if (it == metadata.end()) return std::int64_t{-1};
  const std::string value(it->second.data(), it->second.size());
  std::int64_t bytes = -1;
  const auto [end, error] = std::from_chars(value.data(), value.data() + value.size(), bytes);
  if (error != std::errc() || end != value.data() + value.size() || bytes < 0) {
    return invalid_argument(std::string(kRequestBytesKey) + ": expected the request's size in bytes, got \"" +
                            value.substr(0, 32) + "\"");
  }
  if (static_cast<std::size_t>(bytes) > max_message_bytes) {
    return resource_exhausted(std::string(kRequestBytesKey) + ": " + std::to_string(bytes) +
                              " bytes, over this server's largest message of " + std::to_string(max_message_bytes) +
                              " (--max-message-mb)");
  }
  return bytes;
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
  using Handler = grpc::ServerUnaryReactor* (AttnService::*)(grpc::CallbackServerContext*, const Request*, Response*);

  GatedUnaryCall(const GatedMethods::Shared& shared, Handler handler, const char* op,
                 grpc::CallbackServerContext* ctx)
      : shared_(shared), handler_(handler), op_(op), ctx_(ctx), hold_(shared.budget) {
    if (Status s = shared_.token.check(*ctx_); !s.ok()) {
      refuse(s);
      return;
    }
    // Room for the request before it is read, so that a call past the limit is refused before
    // its bytes come: the size its client declares, else room for a small one (a larger body
    // must then find room once it has come, and gRPC's quota bounds it while it arrives).
    auto declared = declared_request_bytes(*ctx_, shared_.max_message_bytes);
    if (!declared.ok()) {
      refuse(declared.status());
      return;
    }
    declared_ = *declared;
    if (shared_.metrics) shared_.metrics->record_request_size(op_, declared_ >= 0);
    const std::size_t room = declared_ >= 0 ? static_cast<std::size_t>(declared_) : kUndeclaredRequestBytes;
    if (Status s = hold_.add(room, declared_ >= 0 ? std::string(kRequestBytesKey) : "request (undeclared)"); !s.ok()) {
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
      refuse(invalid_argument(std::string(kRequestBytesKey) + ": declared " + std::to_string(declared_) +
                              " bytes, the request brought " + std::to_string(bytes_in_)));
      return;
    }
    hold_.release();
    if (Status s = hold_.add(bytes_in_, "request"); !s.ok()) {
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
    if (auto* reactor = unary_.load()) reactor->OnCancel();
  }

  void OnDone() override {
    if (auto* reactor = unary_.load()) reactor->OnDone();
    const bool big = hold_.bytes() >= kReturnMemoryAfterBytes;
    delete this;
    if (big) return_free_memory();
  }

 private:
  // Parses the request and hands it to the unary handler.
  void dispatch() {
    bool parsed;
    if (bytes_in_ >= kLargeBytes) {
      parsed = parse_large(request_bytes_, bytes_in_, request_);
    } else {
      grpc::ProtoBufferReader reader(&request_bytes_);
      parsed = request_.ParseFromZeroCopyStream(&reader);
    }
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
    const grpc::Status serialized =
        response_.ByteSizeLong() >= kLargeBytes
            ? serialize_large(response_, &response_bytes_)
            : grpc::SerializationTraits<Response>::Serialize(response_, &response_bytes_, &own_buffer);
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
  std::int64_t declared_ = -1;  // attn-request-bytes, -1: not sent
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
  void Write(const Response* msg, grpc::WriteOptions options) override { on_write(msg, options, nullptr); }
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
  using Handler = grpc::ServerWriteReactor<Response>* (AttnService::*)(grpc::CallbackServerContext*, const Request*);

  GatedWriterCall(const GatedMethods::Shared& shared, Handler handler, const char* op, grpc::CallbackServerContext* ctx)
      : shared_(shared), handler_(handler), op_(op), ctx_(ctx), hold_(shared.budget) {
    if (Status s = shared_.token.check(*ctx_); !s.ok()) {
      refuse(s);
      return;
    }
    StartRead(&request_bytes_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      refuse(ctx_->IsCancelled() ? cancelled("request: the call ended while its message arrived")
                                 : invalid_argument("request: expected one " + Request::descriptor()->full_name() +
                                                    ", got none (the call ended before its message)"));
      return;
    }
    const std::size_t bytes = request_bytes_.Length();
    grpc::ProtoBufferReader reader(&request_bytes_);
    Status held = hold_.add(bytes, "request");
    const bool parsed = held.ok() && request_.ParseFromZeroCopyStream(&reader);
    request_bytes_.Clear();
    if (!held.ok()) return refuse(held);
    if (!parsed) {
      refuse(invalid_argument("request: expected a serialized " + Request::descriptor()->full_name() + " of " +
                              std::to_string(bytes) + " bytes, got bytes that do not parse as one"));
      return;
    }
    bridge_.on_write = [this](const Response* msg, grpc::WriteOptions options, const grpc::Status* last) {
      response_bytes_.Clear();
      bool own_buffer = false;
      const grpc::Status serialized = grpc::SerializationTraits<Response>::Serialize(*msg, &response_bytes_, &own_buffer);
      if (!serialized.ok()) return Finish(serialized);
      if (last) return StartWriteAndFinish(&response_bytes_, options, *last);
      StartWrite(&response_bytes_, options);
    };
    bridge_.on_finish = [this](grpc::Status s) { Finish(std::move(s)); };
    bridge_.on_send_initial_metadata = [this] { StartSendInitialMetadata(); };
    grpc::ServerWriteReactor<Response>* reactor = (shared_.service.*handler_)(ctx_, &request_);
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
  Handler handler_;
  const char* op_;
  grpc::CallbackServerContext* ctx_;
  MemoryHold hold_;
  grpc::ByteBuffer request_bytes_, response_bytes_;
  Request request_;
  WriterCallBridge<Response> bridge_;
  std::atomic<grpc::ServerWriteReactor<Response>*> writer_{nullptr};
};

class UnimplementedCall final : public grpc::ServerGenericBidiReactor {
 public:
  explicit UnimplementedCall(const std::string& method) {
    Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "method: expected a method of this server's services, got \"" + method + "\""));
  }
  void OnDone() override { delete this; }
};

}  // namespace

template <class Call, class Handler>
void GatedMethods::add_method(const char* method, const char* op, Handler handler) {
  const std::string& path = paths_.emplace_back("/attn.v1.AttnService/" + std::string(method));
  Shared* shared = shared_.get();
  AddMethod(new grpc::internal::RpcServiceMethod(path.c_str(), grpc::internal::RpcMethod::BIDI_STREAMING, nullptr));
  MarkMethodRawCallback(static_cast<int>(paths_.size() - 1),
                        new grpc::internal::CallbackBidiHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
                            [shared, handler, op](grpc::CallbackServerContext* ctx) {
                              return new Call(*shared, handler, op, ctx);
                            }));
}

template <class Request, class Response>
void GatedMethods::add(const char* method, const char* op,
                       grpc::ServerUnaryReactor* (AttnService::*handler)(grpc::CallbackServerContext*, const Request*,
                                                                         Response*)) {
  add_method<GatedUnaryCall<Request, Response>>(method, op, handler);
}

template <class Request, class Response>
void GatedMethods::add_streaming(const char* method, const char* op,
                                 grpc::ServerWriteReactor<Response>* (AttnService::*handler)(grpc::CallbackServerContext*,
                                                                                             const Request*)) {
  add_method<GatedWriterCall<Request, Response>>(method, op, handler);
}

GatedMethods::GatedMethods(AttnService& service, GateConfig config)
    : shared_(new Shared{service, TokenCheck(config.token), config.budget, config.metrics,
                         config.max_message_bytes}) {
  // Every method of attn.v1.AttnService with one request (AttnService leaves them to this
  // service), with the label its handler logs and counts it under.
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
  add("RegisterSharedMemory", "register_shared_memory", &AttnService::RegisterSharedMemory);
  add("UnregisterSharedMemory", "unregister_shared_memory", &AttnService::UnregisterSharedMemory);
  add("SharedMemoryStatus", "shared_memory_status", &AttnService::SharedMemoryStatus);
  add_streaming("GetTensor", "get_tensor", &AttnService::GetTensor);
  add_streaming("ReadKv", "read_kv", &AttnService::ReadKv);
  int gated = 0;
  const auto* methods = v1::MatmulRequest::descriptor()->file()->FindServiceByName("AttnService");
  for (int i = 0; i < methods->method_count(); ++i) gated += !methods->method(i)->client_streaming();
  if (static_cast<std::size_t>(gated) != paths_.size()) {
    // AttnService leaves these methods to this service: one missing here would be unserved.
    spdlog::critical("GatedMethods serves {} methods, attn.v1.AttnService has {} with one request", paths_.size(),
                     gated);
    std::abort();
  }
}

GatedMethods::~GatedMethods() = default;

grpc::ServerGenericBidiReactor* UnknownMethods::CreateReactor(grpc::GenericCallbackServerContext* ctx) {
  return new UnimplementedCall(ctx->method());
}

}  // namespace attn::server
