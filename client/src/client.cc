#include "attn/client.h"

#include <fcntl.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/wire_format_lite.h>
#include <grpcpp/alarm.h>
#include <grpcpp/create_channel.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include "attn/wire.h"

namespace attn {
namespace {

// A response tensor as an owned host tensor.
Result<Tensor> to_tensor(const v1::Tensor& t, const char* field) {
  wire::TensorLimits unlimited;
  unlimited.max_elements = std::numeric_limits<std::int64_t>::max();
  ATTN_ASSIGN_OR_RETURN(decoded,
                        wire::decode_tensor(t, std::string("response.") + field, unlimited));
  if (!decoded.owned.shape().empty()) return std::move(decoded.owned);
  Tensor out(decoded.view.dtype, decoded.view.shape);
  std::memcpy(out.data(), decoded.view.data, out.bytes());
  return out;
}

Result<std::string> read_file(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return invalid_argument(std::string(what) + ": cannot read \"" + path + "\"");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string trim(std::string s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.pop_back();
  std::size_t i = 0;
  while (i < s.size() && std::isspace(static_cast<unsigned char>(s[i]))) ++i;
  return s.substr(i);
}

// Inputs from this size on go out from the caller's memory (see call_with_inputs).
constexpr std::size_t kLargeInputBytes = std::size_t{1} << 20;

struct InputField {
  int field;  // the request's Tensor field number
  const Tensor* tensor;
};

// Each input's Tensor field once more, holding only its data: its tag and lengths, to go out
// before the data itself (protobuf merges repeated occurrences of a message field, as the
// server's large responses do).
std::string data_frame_header(int field, std::size_t n) {
  using google::protobuf::internal::WireFormatLite;
  using google::protobuf::io::CodedOutputStream;
  std::string frame;
  google::protobuf::io::StringOutputStream out(&frame);
  CodedOutputStream coded(&out);
  const std::uint32_t data_tag =
      WireFormatLite::MakeTag(3, WireFormatLite::WIRETYPE_LENGTH_DELIMITED);  // Tensor.data
  const auto len = static_cast<std::uint32_t>(n);
  coded.WriteTag(WireFormatLite::MakeTag(field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
  coded.WriteVarint32(static_cast<std::uint32_t>(CodedOutputStream::VarintSize32(data_tag) +
                                                 CodedOutputStream::VarintSize32(len)) +
                      len);
  coded.WriteTag(data_tag);
  coded.WriteVarint32(len);
  coded.Trim();
  return frame;
}

// Counts the input slices gRPC still holds, so that a call returns only once it has let go of
// the caller's bytes (a write on its way to the socket may hold them past the call's status).
struct BorrowedBytes {
  std::mutex mu;
  std::condition_variable cv;
  int held = 0;
  static void release(void* self) {
    auto* b = static_cast<BorrowedBytes*>(self);
    std::lock_guard lock(b->mu);
    if (--b->held == 0) b->cv.notify_all();
  }
  void wait() {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return held == 0; });
  }
};

// A unary call whose inputs' bytes go out from the caller's tensors: `request` carries each
// input's dtype and shape, then gRPC sends each input's data from where it lies, with no copy into
// the request and none into a serialized buffer. (At 50 MB an input copied twice into fresh
// memory cost the client about as much as the transport itself.)
grpc::Status call_with_inputs(const std::shared_ptr<grpc::Channel>& channel,
                              std::unique_ptr<grpc::ClientContext> ctx, const std::string& method,
                              const google::protobuf::Message& request,
                              const std::vector<InputField>& inputs,
                              grpc::ByteBuffer* response_bytes) {
  BorrowedBytes borrowed;
  grpc::Status status;
  {
    std::vector<grpc::Slice> slices;
    slices.emplace_back(request.SerializeAsString());
    for (const auto& in : inputs) {
      slices.emplace_back(data_frame_header(in.field, in.tensor->bytes()));
      {
        std::lock_guard lock(borrowed.mu);
        ++borrowed.held;
      }
      slices.emplace_back(const_cast<void*>(in.tensor->data()), in.tensor->bytes(),
                          &BorrowedBytes::release, &borrowed);
    }
    std::size_t total = 0;
    for (const auto& sl : slices) total += sl.size();
    ctx->AddMetadata("attn-request-bytes", std::to_string(total));
    const grpc::ByteBuffer request_bytes(slices.data(), slices.size());
    slices.clear();
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    grpc::GenericStub stub(channel);
    stub.UnaryCall(ctx.get(), method, grpc::StubOptions(), &request_bytes, response_bytes,
                   [&](grpc::Status s) {
                     std::lock_guard lock(mu);
                     status = std::move(s);
                     done = true;
                     cv.notify_one();
                   });
    {
      std::unique_lock lock(mu);
      cv.wait(lock, [&] { return done; });
    }
  }
  ctx.reset();  // the call goes with its context, and with it what gRPC still held of the request
  borrowed.wait();
  return status;
}

// Parses a response, except the data of its large Tensor fields named in `outputs`, which is read
// from the received bytes straight into a Tensor made from the field's dtype and shape (the
// server sends them ahead of the data): one copy where protobuf's string and then the Tensor
// would make two. Data that does not fit its dtype and shape stays in the message.
bool parse_with_outputs(grpc::ByteBuffer* bytes, google::protobuf::Message* response,
                        std::map<int, Tensor>* outputs) {
  using google::protobuf::internal::WireFormatLite;
  grpc::ProtoBufferReader reader(bytes);
  google::protobuf::io::CodedInputStream in(&reader);
  in.SetTotalBytesLimit(std::numeric_limits<int>::max());
  std::string rest;                 // every other field, as it came
  std::map<int, v1::Tensor> heads;  // the output fields without their data
  {
    google::protobuf::io::StringOutputStream rest_stream(&rest);
    google::protobuf::io::CodedOutputStream rest_out(&rest_stream);
    for (std::uint32_t tag; (tag = in.ReadTag()) != 0;) {
      const int field = static_cast<int>(WireFormatLite::GetTagFieldNumber(tag));
      if (!outputs->count(field) ||
          WireFormatLite::GetTagWireType(tag) != WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
        if (!WireFormatLite::SkipField(&in, tag, &rest_out)) return false;
        continue;
      }
      std::uint32_t length = 0;
      if (!in.ReadVarint32(&length)) return false;
      const auto limit = in.PushLimit(static_cast<int>(length));
      v1::Tensor& head = heads[field];
      for (std::uint32_t inner; (inner = in.ReadTag()) != 0;) {
        if (WireFormatLite::GetTagFieldNumber(inner) == 3 &&
            WireFormatLite::GetTagWireType(inner) ==
                WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {  // data
          std::uint32_t n = 0;
          if (!in.ReadVarint32(&n)) return false;
          const auto dtype = wire::from_proto(head.dtype());
          std::size_t expected = dtype ? element_size(*dtype) : 0;
          for (std::int64_t d : head.shape()) {
            if (d < 1 || expected > n) expected = 0;
            expected *= static_cast<std::size_t>(std::max<std::int64_t>(d, 0));
          }
          if (expected == n && n > 0) {
            Tensor t(*dtype, Shape(head.shape().begin(), head.shape().end()));
            if (!in.ReadRaw(t.data(), static_cast<int>(n))) return false;
            (*outputs)[field] = std::move(t);
            head.clear_data();
          } else if (!in.ReadString(head.mutable_data(), static_cast<int>(n))) {
            return false;
          }
          continue;
        }
        std::string one;
        {
          google::protobuf::io::StringOutputStream one_stream(&one);
          google::protobuf::io::CodedOutputStream one_out(&one_stream);
          if (!WireFormatLite::SkipField(&in, inner, &one_out)) return false;
        }
        if (!head.MergeFromString(one)) return false;
      }
      if (!in.ConsumedEntireMessage()) return false;
      in.PopLimit(limit);
    }
  }
  if (!response->ParseFromString(rest)) return false;
  for (auto& [field, head] : heads) {
    const auto* f = response->GetDescriptor()->FindFieldByNumber(field);
    if (!f) continue;
    response->GetReflection()->MutableMessage(response, f)->MergeFrom(head);
  }
  for (auto it = outputs->begin(); it != outputs->end();)  // fields that carried no data here
    it = it->second.shape().empty() ? outputs->erase(it) : std::next(it);
  return true;
}

// An output: the Tensor its data was read into, or decoded from the message.
Result<Tensor> take_output(std::map<int, Tensor>& outputs, int field, const v1::Tensor& t,
                           const char* name) {
  if (auto it = outputs.find(field); it != outputs.end()) return std::move(it->second);
  return to_tensor(t, name);
}

}  // namespace

Result<std::string> load_client_token(const std::string& token_file) {
  if (!token_file.empty()) {
    ATTN_ASSIGN_OR_RETURN(text, read_file(token_file, "token file"));
    return trim(text);
  }
  const char* env = std::getenv("ATTN_TOKEN");
  return std::string(env ? trim(env) : "");
}

// The channel's retry policy, from what the proto declares of each method (MethodTraits): a
// method that changes no state is a pure function of its request, so a call that never reached a
// server (a replica that just went away) is safe to send again, and gRPC retries small requests
// (those within its retry buffer) on UNAVAILABLE. A method that changes state (appends a token,
// creates a cache) is not: an UNAVAILABLE may come after the server applied it (a reset
// connection), and gRPC cannot tell a second Decode from a new one. Those get gRPC's transparent
// retries only (calls sent nowhere yet); Client::decode/prefill resend the calls that carry
// expected_lengths themselves (send_kv), which the server recognises when they repeat an applied
// call.
std::string retry_service_config() {
  const auto* service = v1::MatmulRequest::descriptor()->file()->FindServiceByName("AttnService");
  std::string once;
  for (int i = 0; i < service->method_count(); ++i) {
    const auto* m = service->method(i);
    if (!m->options().GetExtension(v1::method_traits).changes_state()) continue;
    once += std::string(once.empty() ? "" : ", ") + R"({"service": ")" + service->full_name() +
            R"(", "method": ")" + m->name() + "\"}";
  }
  std::string config = R"({"methodConfig": [{
      "name": [{"service": ")" +
                       service->full_name() + R"("}],
      "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
                      "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}})";
  if (!once.empty()) config += R"(, {"name": [)" + once + "]}";
  return config + "]}";
}

Result<std::shared_ptr<grpc::Channel>> make_channel(const std::string& target,
                                                    const ClientOptions& options) {
  grpc::ChannelArguments args;
  const int max_bytes =
      static_cast<int>(std::min<std::int64_t>(options.max_message_mb, 2047) << 20);
  args.SetMaxReceiveMessageSize(max_bytes);
  args.SetMaxSendMessageSize(max_bytes);
  if (!options.load_balancing.empty()) args.SetLoadBalancingPolicyName(options.load_balancing);
  if (const char* extra = std::getenv("ATTN_GRPC_ARGS")) {  // EXPERIMENT: name=int,...
    std::stringstream in(extra);
    for (std::string kv; std::getline(in, kv, ',');)
      if (auto eq = kv.find('='); eq != std::string::npos)
        args.SetInt(kv.substr(0, eq), std::stoi(kv.substr(eq + 1)));
  }
  args.SetServiceConfigJSON(retry_service_config());
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (options.tls) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca_file.empty()) {
      ATTN_ASSIGN_OR_RETURN(ca, read_file(options.tls_ca_file, "TLS CA file"));
      ssl.pem_root_certs = ca;
    }
    if (!options.tls_cert_file.empty() || !options.tls_key_file.empty()) {
      ATTN_ASSIGN_OR_RETURN(cert, read_file(options.tls_cert_file, "TLS client certificate"));
      ATTN_ASSIGN_OR_RETURN(key, read_file(options.tls_key_file, "TLS client key"));
      ssl.pem_cert_chain = cert;
      ssl.pem_private_key = key;
    }
    if (!options.tls_server_name.empty()) args.SetSslTargetNameOverride(options.tls_server_name);
    credentials = grpc::SslCredentials(ssl);
  }
  return grpc::CreateCustomChannel(target, credentials, args);
}

Client::Client(const std::string& target, const ClientOptions& options)
    : options_(options), target_(target) {
  auto channel = make_channel(target, options);
  if (!channel.ok()) {
    channel_status_ = channel.status();
    // Calls fail at once with the reason (see call paths below), on a channel that goes nowhere.
    channel_ = grpc::CreateChannel("unix:/nonexistent", grpc::InsecureChannelCredentials());
  } else {
    channel_ = *channel;
  }
  stub_ = v1::AttnService::NewStub(channel_);
}

Client::Client(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options)
    : channel_(std::move(channel)), stub_(v1::AttnService::NewStub(channel_)), options_(options) {}

std::unique_ptr<grpc::ClientContext> Client::make_context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (options_.timeout.count() > 0)
    ctx->set_deadline(std::chrono::system_clock::now() + options_.timeout);
  if (!options_.token.empty()) ctx->AddMetadata("authorization", "Bearer " + options_.token);
  return ctx;
}

template <class Request, class Response>
Status Client::call(Request& request, const std::vector<std::pair<int, const Tensor*>>& inputs,
                    Response* response, std::map<int, Tensor>* outputs, const char* method,
                    grpc::Status (v1::AttnService::Stub::*unary)(grpc::ClientContext*,
                                                                 const Request&, Response*)) {
  const auto* descriptor = Request::descriptor();
  std::vector<InputField> large;
  for (const auto& [field, tensor] : inputs) {
    auto* t = static_cast<v1::Tensor*>(
        request.GetReflection()->MutableMessage(&request, descriptor->FindFieldByNumber(field)));
    if (tensor->bytes() >= kLargeInputBytes) {
      t->set_dtype(wire::to_proto(tensor->dtype()));
      t->mutable_shape()->Assign(tensor->shape().begin(), tensor->shape().end());
      large.push_back({field, tensor});
    } else {
      wire::encode_tensor(tensor->view(), t);
    }
  }
  outputs->clear();
  if (large.empty())
    return wire::from_grpc((stub_.get()->*unary)(make_context(request).get(), request, response));
  grpc::ByteBuffer response_bytes;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(
      call_with_inputs(channel_, make_context(), std::string("/attn.v1.AttnService/") + method,
                       request, large, &response_bytes)));
  // The outputs (Tensor fields) a large call's response carries: read into Tensors directly.
  for (int i = 0; i < Response::descriptor()->field_count(); ++i) {
    const auto* f = Response::descriptor()->field(i);
    if (f->message_type() == v1::Tensor::descriptor() && !f->is_repeated())
      (*outputs)[f->number()] = Tensor();
  }
  if (!parse_with_outputs(&response_bytes, response, outputs))
    return internal_error(std::string(method) + " response: could not be parsed");
  return Status::Ok();
}

std::unique_ptr<grpc::ClientContext> Client::make_context(
    const google::protobuf::MessageLite& request) const {
  auto ctx = make_context();
  ctx->AddMetadata("attn-request-bytes", std::to_string(request.ByteSizeLong()));
  return ctx;
}

Result<OpResult> Client::matmul(const Tensor& a, const Tensor& b, const MatmulOptions& options) {
  v1::MatmulRequest req;
  req.set_transpose_a(options.transpose_a);
  req.set_transpose_b(options.transpose_b);
  req.set_kernel(options.kernel);
  v1::MatmulResponse resp;
  ATTN_RETURN_IF_ERROR(channel_status_);
  std::map<int, Tensor> outputs;
  ATTN_RETURN_IF_ERROR(
      call(req, {{1, &a}, {2, &b}}, &resp, &outputs, "Matmul", &v1::AttnService::Stub::Matmul));
  ATTN_ASSIGN_OR_RETURN(c, take_output(outputs, 1, resp.c(), "c"));
  return OpResult{std::move(c), {}, resp.timings()};
}

Result<OpResult> Client::softmax(const Tensor& x, const std::string& kernel) {
  v1::SoftmaxRequest req;
  req.set_kernel(kernel);
  v1::SoftmaxResponse resp;
  ATTN_RETURN_IF_ERROR(channel_status_);
  std::map<int, Tensor> outputs;
  ATTN_RETURN_IF_ERROR(
      call(req, {{1, &x}}, &resp, &outputs, "Softmax", &v1::AttnService::Stub::Softmax));
  ATTN_ASSIGN_OR_RETURN(y, take_output(outputs, 1, resp.y(), "y"));
  return OpResult{std::move(y), {}, resp.timings()};
}

Result<OpResult> Client::attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const AttentionOptions& options) {
  v1::AttentionRequest req;
  req.set_causal(options.causal);
  req.set_scale(options.scale);
  req.set_return_lse(options.return_lse);
  req.set_kernel(options.kernel);
  // -1 is the server's default for an unset side; anything else goes as given (it checks).
  if (options.window_left != -1) req.set_window_left(options.window_left);
  if (options.window_right != -1) req.set_window_right(options.window_right);
  req.set_softcap(options.softcap);
  v1::AttentionResponse resp;
  ATTN_RETURN_IF_ERROR(channel_status_);
  std::map<int, Tensor> outputs;
  std::vector<std::pair<int, const Tensor*>> inputs{{1, &q}, {2, &k}, {3, &v}};
  if (!options.sinks.shape().empty()) inputs.emplace_back(14, &options.sinks);  // sinks
  ATTN_RETURN_IF_ERROR(
      call(req, inputs, &resp, &outputs, "Attention", &v1::AttnService::Stub::Attention));
  ATTN_ASSIGN_OR_RETURN(o, take_output(outputs, 1, resp.o(), "o"));
  OpResult result{std::move(o), {}, resp.timings()};
  if (options.return_lse) {
    ATTN_ASSIGN_OR_RETURN(lse, take_output(outputs, 2, resp.lse(), "lse"));
    result.lse = std::move(lse);
  }
  return result;
}

Result<v1::ListKernelsResponse> Client::list_kernels(const std::string& op) {
  v1::ListKernelsRequest req;
  req.set_op(op);
  v1::ListKernelsResponse resp;
  ATTN_RETURN_IF_ERROR(channel_status_);
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->ListKernels(make_context(req).get(), req, &resp)));
  return resp;
}

Result<v1::GetServerInfoResponse> Client::server_info() {
  v1::GetServerInfoResponse resp;
  ATTN_RETURN_IF_ERROR(channel_status_);
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->GetServerInfo(
      make_context(v1::GetServerInfoRequest()).get(), v1::GetServerInfoRequest(), &resp)));
  return resp;
}

Result<v1::TensorInfo> Client::put_tensor(const Tensor& t, std::int64_t ttl_ms,
                                          const std::string& device, std::size_t chunk_bytes) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  if (chunk_bytes == 0) return invalid_argument("chunk_bytes: expected > 0");
  auto ctx = make_context();
  v1::PutTensorResponse resp;
  auto writer = stub_->PutTensor(ctx.get(), &resp);
  v1::PutTensorRequest header;
  header.mutable_header()->set_dtype(wire::to_proto(t.dtype()));
  header.mutable_header()->mutable_shape()->Assign(t.shape().begin(), t.shape().end());
  header.mutable_header()->set_ttl_ms(ttl_ms);
  header.mutable_header()->set_device(device);
  bool ok = writer->Write(header);
  const auto* bytes = static_cast<const char*>(t.data());
  for (std::size_t off = 0; ok && off < t.bytes(); off += chunk_bytes) {
    v1::PutTensorRequest chunk;
    chunk.set_chunk(bytes + off, std::min(chunk_bytes, t.bytes() - off));
    ok = writer->Write(chunk);
  }
  writer->WritesDone();
  ATTN_RETURN_IF_ERROR(wire::from_grpc(writer->Finish()));
  return resp.tensor();
}

Result<Tensor> Client::get_tensor(const std::string& handle, std::size_t chunk_bytes) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  auto ctx = make_context();
  v1::GetTensorRequest req;
  req.set_handle(handle);
  req.set_chunk_bytes(static_cast<std::int64_t>(chunk_bytes));
  auto reader = stub_->GetTensor(ctx.get(), req);
  v1::GetTensorResponse msg;
  Tensor out;
  std::size_t got = 0;
  bool have_header = false;
  while (reader->Read(&msg)) {
    if (msg.has_tensor()) {
      const auto dtype = wire::from_proto(msg.tensor().dtype());
      if (!dtype) return internal_error("GetTensor: the server sent an unknown dtype");
      out = Tensor(*dtype, Shape(msg.tensor().shape().begin(), msg.tensor().shape().end()));
      have_header = true;
    } else if (have_header && got + msg.chunk().size() <= out.bytes()) {
      std::memcpy(static_cast<char*>(out.data()) + got, msg.chunk().data(), msg.chunk().size());
      got += msg.chunk().size();
    } else {
      return internal_error("GetTensor: the server sent more bytes than the shape holds");
    }
  }
  ATTN_RETURN_IF_ERROR(wire::from_grpc(reader->Finish()));
  if (!have_header || got != out.bytes())
    return internal_error("GetTensor: the stream ended early");
  return out;
}

Result<std::int64_t> Client::delete_tensor(const std::string& handle) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::DeleteTensorRequest req;
  req.set_handle(handle);
  v1::DeleteTensorResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->DeleteTensor(make_context(req).get(), req, &resp)));
  return resp.freed_bytes();
}

Result<v1::ListTensorsResponse> Client::list_tensors() {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::ListTensorsResponse resp;
  ATTN_RETURN_IF_ERROR(
      wire::from_grpc(stub_->ListTensors(make_context(v1::ListTensorsRequest()).get(), {}, &resp)));
  return resp;
}

v1::Tensor Client::resident(const std::string& handle) {
  v1::Tensor t;
  t.set_handle(handle);
  return t;
}

// ---- shared memory ----

Result<SharedMemoryBuffer> SharedMemoryBuffer::create(std::size_t bytes, const std::string& key) {
  static std::atomic<unsigned> counter{0};
  SharedMemoryBuffer b;
  b.key_ =
      key.empty() ? "/attn-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) : key;
  b.fd_ = ::shm_open(b.key_.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
  if (b.fd_ < 0) return failed_precondition("shm_open " + b.key_ + ": " + std::strerror(errno));
  b.size_ = bytes;
  if (::ftruncate(b.fd_, static_cast<off_t>(bytes)) != 0) {
    ::shm_unlink(b.key_.c_str());
    return failed_precondition("ftruncate " + b.key_ + ": " + std::strerror(errno));
  }
  void* p = ::mmap(nullptr, std::max<std::size_t>(bytes, 1), PROT_READ | PROT_WRITE, MAP_SHARED,
                   b.fd_, 0);
  if (p == MAP_FAILED) {
    ::shm_unlink(b.key_.c_str());
    return failed_precondition("mmap " + b.key_ + ": " + std::strerror(errno));
  }
  b.data_ = p;
  return b;
}

SharedMemoryBuffer& SharedMemoryBuffer::operator=(SharedMemoryBuffer&& o) noexcept {
  if (this != &o) {
    this->~SharedMemoryBuffer();
    key_ = std::move(o.key_);
    size_ = o.size_;
    data_ = o.data_;
    fd_ = o.fd_;
    o.key_.clear();
    o.data_ = nullptr;
    o.fd_ = -1;
    o.size_ = 0;
  }
  return *this;
}

SharedMemoryBuffer::~SharedMemoryBuffer() {
  if (data_) ::munmap(data_, std::max<std::size_t>(size_, 1));
  if (fd_ >= 0) ::close(fd_);
  if (!key_.empty()) ::shm_unlink(key_.c_str());
  data_ = nullptr;
  fd_ = -1;
  key_.clear();
}

Result<v1::SharedMemoryRegionInfo> Client::register_region(
    const v1::RegisterSharedMemoryRequest& req) {
  v1::RegisterSharedMemoryResponse resp;
  ATTN_RETURN_IF_ERROR(
      wire::from_grpc(stub_->RegisterSharedMemory(make_context(req).get(), req, &resp)));
  return resp.region();
}

Result<v1::SharedMemoryRegionInfo> Client::register_shared_memory(const std::string& name,
                                                                  const std::string& key,
                                                                  std::int64_t offset,
                                                                  std::int64_t bytes) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::RegisterSharedMemoryRequest req;
  req.set_name(name);
  req.set_kind(v1::SHARED_MEMORY_KIND_SYSTEM);
  req.set_key(key);
  req.set_offset(offset);
  req.set_bytes(bytes);
  return register_region(req);
}

Result<v1::SharedMemoryRegionInfo> Client::register_cuda_memory(const std::string& name,
                                                                const std::string& ipc_handle,
                                                                int device, std::int64_t offset,
                                                                std::int64_t bytes) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::RegisterSharedMemoryRequest req;
  req.set_name(name);
  req.set_kind(v1::SHARED_MEMORY_KIND_CUDA);
  req.set_cuda_ipc_handle(ipc_handle);
  req.set_device_id(device);
  req.set_offset(offset);
  req.set_bytes(bytes);
  return register_region(req);
}

Result<int> Client::unregister_shared_memory(const std::string& name) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::UnregisterSharedMemoryRequest req;
  req.set_name(name);
  v1::UnregisterSharedMemoryResponse resp;
  ATTN_RETURN_IF_ERROR(
      wire::from_grpc(stub_->UnregisterSharedMemory(make_context(req).get(), req, &resp)));
  return resp.unregistered();
}

Result<v1::SharedMemoryStatusResponse> Client::shared_memory_status(const std::string& name) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::SharedMemoryStatusRequest req;
  req.set_name(name);
  v1::SharedMemoryStatusResponse resp;
  ATTN_RETURN_IF_ERROR(
      wire::from_grpc(stub_->SharedMemoryStatus(make_context(req).get(), req, &resp)));
  return resp;
}

v1::Tensor Client::in_shared_memory(DType dtype, const Shape& shape, const std::string& region,
                                    std::int64_t offset) {
  v1::Tensor t;
  t.set_dtype(wire::to_proto(dtype));
  t.mutable_shape()->Assign(shape.begin(), shape.end());
  *t.mutable_shm() = shared_memory_ref(region, offset);
  return t;
}

v1::SharedMemoryRef Client::shared_memory_ref(const std::string& region, std::int64_t offset,
                                              std::int64_t bytes) {
  v1::SharedMemoryRef r;
  r.set_region(region);
  r.set_offset(offset);
  r.set_bytes(bytes);
  return r;
}

Result<OpResult> Client::attention_shm(const std::string& region, const SharedMemoryBuffer& buffer,
                                       DType dtype, const Shape& q_shape, const Shape& kv_shape,
                                       const std::int64_t offsets[3], std::int64_t o_offset,
                                       const AttentionOptions& options, bool copy_out) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::AttentionRequest req;
  *req.mutable_q() = in_shared_memory(dtype, q_shape, region, offsets[0]);
  *req.mutable_k() = in_shared_memory(dtype, kv_shape, region, offsets[1]);
  *req.mutable_v() = in_shared_memory(dtype, kv_shape, region, offsets[2]);
  req.set_causal(options.causal);
  req.set_scale(options.scale);
  req.set_return_lse(options.return_lse);
  req.set_kernel(options.kernel);
  if (options.window_left != -1) req.set_window_left(options.window_left);
  if (options.window_right != -1) req.set_window_right(options.window_right);
  req.set_softcap(options.softcap);
  if (!options.sinks.shape().empty())
    wire::encode_tensor(options.sinks.view(), req.mutable_sinks());
  *req.add_output_shm() = shared_memory_ref(region, o_offset);
  v1::AttentionResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->Attention(make_context(req).get(), req, &resp)));
  OpResult result{Tensor(), {}, resp.timings()};
  if (copy_out) {
    Tensor o(dtype, q_shape);
    if (o_offset < 0 || static_cast<std::size_t>(o_offset) + o.bytes() > buffer.size())
      return invalid_argument("o_offset: the output does not fit in the buffer");
    std::memcpy(o.data(), static_cast<const char*>(buffer.data()) + o_offset, o.bytes());
    result.output = std::move(o);
  }
  if (options.return_lse) {
    ATTN_ASSIGN_OR_RETURN(lse, to_tensor(resp.lse(), "lse"));
    result.lse = std::move(lse);
  }
  return result;
}

Result<v1::BenchmarkResponse> Client::benchmark(const v1::BenchmarkRequest& request) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::BenchmarkResponse resp;
  ATTN_RETURN_IF_ERROR(
      wire::from_grpc(stub_->Benchmark(make_context(request).get(), request, &resp)));
  return resp;
}

Result<v1::EchoResponse> Client::echo(const std::string& payload) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::EchoRequest req;
  req.set_payload(payload);
  v1::EchoResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->Echo(make_context(req).get(), req, &resp)));
  return resp;
}

// ---- KV caches ----

void Client::learn_replica(const v1::KvCacheInfo& info) {
  std::lock_guard lock(routes_->mu);
  if (routes_->pinned.count(info.handle())) return;
  if (info.replica().empty())
    routes_->replica_of.erase(info.handle());
  else
    routes_->replica_of[info.handle()] = info.replica();
}

void Client::set_kv_cache_replica(const std::string& handle, const std::string& replica) {
  std::lock_guard lock(routes_->mu);
  routes_->replica_of[handle] = replica;
  routes_->pinned.insert(handle);
}

std::string Client::kv_cache_replica(const std::string& handle) const {
  std::lock_guard lock(routes_->mu);
  auto it = routes_->replica_of.find(handle);
  return it == routes_->replica_of.end() ? std::string() : it->second;
}

Result<v1::AttnService::Stub*> Client::stub_for_replica(const std::string& replica) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  if (replica.empty() || replica == target_) return stub_.get();
  std::lock_guard lock(routes_->mu);
  auto& stub = routes_->stubs[replica];
  if (!stub) {
    // One replica: pick_first, whatever policy spreads the main channel's calls.
    ClientOptions one = options_;
    one.load_balancing.clear();
    auto channel = make_channel(replica, one);
    if (!channel.ok()) {
      routes_->stubs.erase(replica);
      return channel.status();
    }
    stub = v1::AttnService::NewStub(*channel);
  }
  return stub.get();  // stubs are never dropped while the client lives
}

Result<v1::AttnService::Stub*> Client::kv_stub(const std::string& cache) {
  return stub_for_replica(kv_cache_replica(cache));
}

Result<v1::KvCacheInfo> Client::create_kv_cache(const v1::KvCacheConfig& config,
                                                std::int64_t ttl_ms, const std::string& device) {
  ATTN_RETURN_IF_ERROR(channel_status_);
  v1::CreateKvCacheRequest req;
  *req.mutable_config() = config;
  req.set_ttl_ms(ttl_ms);
  req.set_device(device);
  v1::CreateKvCacheResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->CreateKvCache(make_context(req).get(), req, &resp)));
  learn_replica(resp.cache());
  return resp.cache();
}

Result<v1::KvCacheInfo> Client::describe_kv_cache(const std::string& handle) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(handle));
  v1::DescribeKvCacheRequest req;
  req.set_handle(handle);
  v1::DescribeKvCacheResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub->DescribeKvCache(make_context(req).get(), req, &resp)));
  learn_replica(resp.cache());
  return resp.cache();
}

Result<v1::ListKvCachesResponse> Client::list_kv_caches(const std::string& replica) {
  ATTN_ASSIGN_OR_RETURN(stub, stub_for_replica(replica));
  v1::ListKvCachesResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(
      stub->ListKvCaches(make_context(v1::ListKvCachesRequest()).get(), {}, &resp)));
  for (const auto& info : resp.caches()) learn_replica(info);
  return resp;
}

Result<std::int64_t> Client::delete_kv_cache(const std::string& handle) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(handle));
  v1::DeleteKvCacheRequest req;
  req.set_handle(handle);
  v1::DeleteKvCacheResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub->DeleteKvCache(make_context(req).get(), req, &resp)));
  std::lock_guard lock(routes_->mu);
  routes_->replica_of.erase(handle);
  routes_->pinned.erase(handle);
  return resp.freed_bytes();
}

Result<std::int64_t> Client::release_sequences(const std::string& cache,
                                               const std::vector<std::string>& sequence_ids) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(cache));
  v1::ReleaseSequencesRequest req;
  req.set_cache(cache);
  for (const auto& id : sequence_ids) req.add_sequence_ids(id);
  v1::ReleaseSequencesResponse resp;
  ATTN_RETURN_IF_ERROR(
      wire::from_grpc(stub->ReleaseSequences(make_context(req).get(), req, &resp)));
  return resp.freed_pages();
}

Result<v1::ForkSequenceResponse> Client::fork_sequence(const std::string& cache,
                                                       const std::string& source_id,
                                                       const std::string& new_id) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(cache));
  v1::ForkSequenceRequest req;
  req.set_cache(cache);
  req.set_source_id(source_id);
  req.set_new_id(new_id);
  v1::ForkSequenceResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub->ForkSequence(make_context(req).get(), req, &resp)));
  return resp;
}

Result<v1::TruncateSequenceResponse> Client::truncate_sequence(const std::string& cache,
                                                               const std::string& sequence_id,
                                                               std::int64_t length) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(cache));
  v1::TruncateSequenceRequest req;
  req.set_cache(cache);
  req.set_sequence_id(sequence_id);
  req.set_length(length);
  v1::TruncateSequenceResponse resp;
  ATTN_RETURN_IF_ERROR(
      wire::from_grpc(stub->TruncateSequence(make_context(req).get(), req, &resp)));
  return resp;
}

namespace {

template <class Response>
Result<KvOpResult> kv_op_result(const Response& resp, bool with_lse, int attempts) {
  ATTN_ASSIGN_OR_RETURN(o, to_tensor(resp.o(), "o"));
  KvOpResult result{std::move(o),    {},
                    resp.timings(),  {resp.lengths().begin(), resp.lengths().end()},
                    resp.replayed(), attempts};
  if (with_lse) {
    ATTN_ASSIGN_OR_RETURN(lse, to_tensor(resp.lse(), "lse"));
    result.lse = std::move(lse);
  }
  return result;
}

// How one Decode or Prefill is sent, and sent again (KvRetryOptions): an exactly-once call after
// an attempt whose outcome is unknown (the connection failed, or the attempt's own deadline
// passed) while attempts remain, after a jittered wait growing from initial_backoff; any other
// call once. The blocking and the asynchronous calls both follow it.
class KvAttempts {
 public:
  KvAttempts(const KvRetryOptions& retry, bool exactly_once, bool own_deadline)
      : retry_(retry),
        most_(exactly_once ? std::max(1, retry.max_attempts) : 1),
        exactly_once_(exactly_once),
        own_deadline_(own_deadline),
        backoff_ms_(static_cast<double>(retry.initial_backoff.count())) {}

  // The context of the next attempt, counting it.
  std::unique_ptr<grpc::ClientContext> next(const Client& client,
                                            const google::protobuf::MessageLite& request) {
    ++count_;
    auto ctx = client.make_context(request);
    // With a deadline of its own, an attempt waits for the channel to connect again (after a
    // reset) rather than failing at once while it reconnects: gRPC makes progress on a
    // connection only while a call waits on it.
    if (exactly_once_ && own_deadline_) ctx->set_wait_for_ready(true);
    return ctx;
  }

  // After the attempt ended with `s`: how long to wait before sending the call again, or nothing
  // when the call ends with `s`.
  std::optional<std::chrono::nanoseconds> retry_after(const grpc::Status& s) {
    const bool unknown = s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                         (own_deadline_ && s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED);
    if (s.ok() || count_ >= most_ || !unknown) return std::nullopt;
    // Half to all of the backoff, so that clients cut off together do not come back together.
    static thread_local std::mt19937_64 jitter{std::random_device{}()};
    std::uniform_real_distribution<double> share(0.5, 1.0);
    const std::chrono::duration<double, std::milli> wait(backoff_ms_ * share(jitter));
    backoff_ms_ =
        std::min(backoff_ms_ * retry_.multiplier, static_cast<double>(retry_.max_backoff.count()));
    return std::chrono::duration_cast<std::chrono::nanoseconds>(wait);
  }

  // The status the call ends with: `s`, saying how many attempts it took when more than one.
  Status outcome(const grpc::Status& s) const {
    Status out = wire::from_grpc(s);
    if (!out.ok() && count_ > 1)
      return Status(out.code(), out.message() + " (after " + std::to_string(count_) + " attempts)");
    return out;
  }

  int count() const { return count_; }

 private:
  KvRetryOptions retry_;
  int most_;
  bool exactly_once_, own_deadline_;
  double backoff_ms_;
  int count_ = 0;
};

// The fields every Decode and Prefill request starts with.
template <class Request>
Request kv_request(const std::string& cache, int layer,
                   const std::vector<std::string>& sequence_ids) {
  Request req;
  req.set_cache(cache);
  req.set_layer(layer);
  for (const auto& id : sequence_ids) req.add_sequence_ids(id);
  return req;
}

// A Decode request's options, whatever carries its tensors.
void set_options(const DecodeOptions& options, v1::DecodeRequest* req) {
  req->set_scale(options.scale);
  req->set_kernel(options.kernel);
  req->set_return_lse(options.return_lse);
  if (options.window_left != -1) req->set_window_left(options.window_left);
  req->set_softcap(options.softcap);
  if (!options.sinks.shape().empty())
    wire::encode_tensor(options.sinks.view(), req->mutable_sinks());
  req->mutable_expected_lengths()->Assign(options.expected_lengths.begin(),
                                          options.expected_lengths.end());
}

void set_options(const PrefillOptions& options, v1::PrefillRequest* req) {
  req->set_non_causal(options.non_causal);
  req->set_scale(options.scale);
  req->set_kernel(options.kernel);
  req->set_return_lse(options.return_lse);
  if (options.window_left != -1) req->set_window_left(options.window_left);
  if (options.window_right != -1) req->set_window_right(options.window_right);
  req->set_softcap(options.softcap);
  if (!options.sinks.shape().empty())
    wire::encode_tensor(options.sinks.view(), req->mutable_sinks());
  req->mutable_expected_lengths()->Assign(options.expected_lengths.begin(),
                                          options.expected_lengths.end());
}

// A Decode with its inputs inline (decode, decode_async).
v1::DecodeRequest decode_request(const std::string& cache, int layer,
                                 const std::vector<std::string>& sequence_ids, const Tensor& q,
                                 const Tensor& k_new, const Tensor& v_new,
                                 const DecodeOptions& options) {
  auto req = kv_request<v1::DecodeRequest>(cache, layer, sequence_ids);
  wire::encode_tensor(q.view(), req.mutable_q());
  wire::encode_tensor(k_new.view(), req.mutable_k_new());
  wire::encode_tensor(v_new.view(), req.mutable_v_new());
  set_options(options, &req);
  return req;
}

// A Prefill with its inputs inline (prefill, prefill_async).
v1::PrefillRequest prefill_request(const std::string& cache, int layer,
                                   const std::vector<std::string>& sequence_ids,
                                   const std::vector<std::int64_t>& lens, const Tensor& q,
                                   const Tensor& k, const Tensor& v,
                                   const PrefillOptions& options) {
  auto req = kv_request<v1::PrefillRequest>(cache, layer, sequence_ids);
  req.mutable_lens()->Assign(lens.begin(), lens.end());
  wire::encode_tensor(q.view(), req.mutable_q());
  wire::encode_tensor(k.view(), req.mutable_k());
  wire::encode_tensor(v.view(), req.mutable_v());
  set_options(options, &req);
  return req;
}

// The callback stub's unary call for each request.
void start_call(v1::AttnService::Stub* stub, grpc::ClientContext* ctx, const v1::DecodeRequest* req,
                v1::DecodeResponse* resp, std::function<void(grpc::Status)> done) {
  stub->async()->Decode(ctx, req, resp, std::move(done));
}

void start_call(v1::AttnService::Stub* stub, grpc::ClientContext* ctx,
                const v1::PrefillRequest* req, v1::PrefillResponse* resp,
                std::function<void(grpc::Status)> done) {
  stub->async()->Prefill(ctx, req, resp, std::move(done));
}

// One Decode or Prefill in flight (decode_async, prefill_async): its request, the attempt under
// way and what is left of its retries. Each attempt ends in a gRPC callback, which either sends
// the call again after a wait on a gRPC timer (no thread held) or delivers the result; the call
// then deletes itself, and `release` says it is gone.
template <class Request, class Response>
class AsyncKvCall {
 public:
  AsyncKvCall(const Client& client, v1::AttnService::Stub* stub, Request request,
              KvAttempts attempts, KvCallback done, std::function<void()> release)
      : client_(client),
        stub_(stub),
        request_(std::move(request)),
        attempts_(std::move(attempts)),
        done_(std::move(done)),
        release_(std::move(release)) {}

  void send() {
    response_.Clear();
    ctx_ = attempts_.next(client_, request_);
    start_call(stub_, ctx_.get(), &request_, &response_,
               [this](grpc::Status s) { ended(std::move(s)); });
  }

 private:
  void ended(grpc::Status s) {
    if (const auto wait = attempts_.retry_after(s)) {
      alarm_ = std::make_unique<grpc::Alarm>();
      alarm_->Set(std::chrono::system_clock::now() +
                      std::chrono::duration_cast<std::chrono::system_clock::duration>(*wait),
                  [this](bool) { send(); });
      return;
    }
    std::function<void()> release = std::move(release_);
    {
      Result<KvOpResult> result =
          s.ok() ? kv_op_result(response_, request_.return_lse(), attempts_.count())
                 : Result<KvOpResult>(attempts_.outcome(s));
      KvCallback done = std::move(done_);
      delete this;
      done(std::move(result));
    }  // the callback, and what it holds, go before the client learns that the call ended
    release();
  }

  const Client& client_;
  v1::AttnService::Stub* stub_;
  const Request request_;
  Response response_;
  std::unique_ptr<grpc::ClientContext> ctx_;
  std::unique_ptr<grpc::Alarm> alarm_;
  KvAttempts attempts_;
  KvCallback done_;
  std::function<void()> release_;
};

// A future for a call that delivers its result to a callback.
std::pair<std::future<Result<KvOpResult>>, KvCallback> kv_future() {
  auto promise = std::make_shared<std::promise<Result<KvOpResult>>>();
  auto future = promise->get_future();
  return {std::move(future), [promise](Result<KvOpResult> r) { promise->set_value(std::move(r)); }};
}

}  // namespace

template <class Request, class Response>
Status Client::send_kv(v1::AttnService::Stub* stub, const Request& request, Response* response,
                       grpc::Status (v1::AttnService::Stub::*unary)(grpc::ClientContext*,
                                                                    const Request&, Response*),
                       bool exactly_once, int* attempts) {
  KvAttempts tries(options_.kv_retry, exactly_once, options_.timeout.count() > 0);
  grpc::Status status;
  for (;;) {
    response->Clear();
    status = (stub->*unary)(tries.next(*this, request).get(), request, response);
    const auto wait = tries.retry_after(status);
    if (!wait) break;
    std::this_thread::sleep_for(*wait);
  }
  *attempts = tries.count();
  return tries.outcome(status);
}

template <class Request, class Response>
void Client::send_kv_async(const std::string& cache, Request request, KvCallback done) {
  auto stub = kv_stub(cache);
  if (!stub.ok()) {
    done(stub.status());
    return;
  }
  {
    std::lock_guard lock(in_flight_->mu);
    ++in_flight_->calls;
  }
  const bool exactly_once = request.expected_lengths_size() > 0;
  auto* call = new AsyncKvCall<Request, Response>(
      *this, *stub, std::move(request),
      KvAttempts(options_.kv_retry, exactly_once, options_.timeout.count() > 0), std::move(done),
      [in_flight = in_flight_.get()] {
        std::lock_guard lock(in_flight->mu);
        if (--in_flight->calls == 0) in_flight->cv.notify_all();
      });
  call->send();
}

Client::~Client() {
  if (!in_flight_) return;
  std::unique_lock lock(in_flight_->mu);
  in_flight_->cv.wait(lock, [&] { return in_flight_->calls == 0; });
}

Result<KvOpResult> Client::decode(const std::string& cache, int layer,
                                  const std::vector<std::string>& sequence_ids, const Tensor& q,
                                  const Tensor& k_new, const Tensor& v_new,
                                  const DecodeOptions& options) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(cache));
  const auto req = decode_request(cache, layer, sequence_ids, q, k_new, v_new, options);
  v1::DecodeResponse resp;
  int attempts = 0;
  ATTN_RETURN_IF_ERROR(send_kv(stub, req, &resp, &v1::AttnService::Stub::Decode,
                               !options.expected_lengths.empty(), &attempts));
  return kv_op_result(resp, options.return_lse, attempts);
}

Result<KvOpResult> Client::prefill(const std::string& cache, int layer,
                                   const std::vector<std::string>& sequence_ids,
                                   const std::vector<std::int64_t>& lens, const Tensor& q,
                                   const Tensor& k, const Tensor& v,
                                   const PrefillOptions& options) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(cache));
  const auto req = prefill_request(cache, layer, sequence_ids, lens, q, k, v, options);
  v1::PrefillResponse resp;
  int attempts = 0;
  ATTN_RETURN_IF_ERROR(send_kv(stub, req, &resp, &v1::AttnService::Stub::Prefill,
                               !options.expected_lengths.empty(), &attempts));
  return kv_op_result(resp, options.return_lse, attempts);
}

void Client::decode_async(const std::string& cache, int layer,
                          const std::vector<std::string>& sequence_ids, const Tensor& q,
                          const Tensor& k_new, const Tensor& v_new, const DecodeOptions& options,
                          KvCallback done) {
  send_kv_async<v1::DecodeRequest, v1::DecodeResponse>(
      cache, decode_request(cache, layer, sequence_ids, q, k_new, v_new, options), std::move(done));
}

std::future<Result<KvOpResult>> Client::decode_async(const std::string& cache, int layer,
                                                     const std::vector<std::string>& sequence_ids,
                                                     const Tensor& q, const Tensor& k_new,
                                                     const Tensor& v_new,
                                                     const DecodeOptions& options) {
  auto [future, done] = kv_future();
  decode_async(cache, layer, sequence_ids, q, k_new, v_new, options, std::move(done));
  return std::move(future);
}

void Client::prefill_async(const std::string& cache, int layer,
                           const std::vector<std::string>& sequence_ids,
                           const std::vector<std::int64_t>& lens, const Tensor& q, const Tensor& k,
                           const Tensor& v, const PrefillOptions& options, KvCallback done) {
  send_kv_async<v1::PrefillRequest, v1::PrefillResponse>(
      cache, prefill_request(cache, layer, sequence_ids, lens, q, k, v, options), std::move(done));
}

std::future<Result<KvOpResult>> Client::prefill_async(const std::string& cache, int layer,
                                                      const std::vector<std::string>& sequence_ids,
                                                      const std::vector<std::int64_t>& lens,
                                                      const Tensor& q, const Tensor& k,
                                                      const Tensor& v,
                                                      const PrefillOptions& options) {
  auto [future, done] = kv_future();
  prefill_async(cache, layer, sequence_ids, lens, q, k, v, options, std::move(done));
  return std::move(future);
}

namespace {

// A region's bytes at `offset` as a tensor of `dtype` and `shape`, or why they do not fit.
Result<Tensor> from_region(const SharedMemoryBuffer& buffer, std::int64_t offset, DType dtype,
                           const Shape& shape, const char* field) {
  Tensor t(dtype, shape);
  if (offset < 0 || static_cast<std::size_t>(offset) + t.bytes() > buffer.size())
    return invalid_argument(std::string(field) + ": the output does not fit in the buffer");
  std::memcpy(t.data(), static_cast<const char*>(buffer.data()) + offset, t.bytes());
  return t;
}

// A Decode or Prefill request's inputs and outputs in `region` (decode_shm, prefill_shm).
template <class Request>
void place_in_region(Request& req, v1::Tensor* q, v1::Tensor* k, v1::Tensor* v,
                     const std::string& region, DType dtype, const Shape& q_shape,
                     const Shape& kv_shape, const std::int64_t offsets[3], std::int64_t o_offset,
                     bool return_lse, std::int64_t lse_offset) {
  *q = Client::in_shared_memory(dtype, q_shape, region, offsets[0]);
  *k = Client::in_shared_memory(dtype, kv_shape, region, offsets[1]);
  *v = Client::in_shared_memory(dtype, kv_shape, region, offsets[2]);
  *req.add_output_shm() = Client::shared_memory_ref(region, o_offset);
  if (return_lse && lse_offset >= 0)
    *req.add_output_shm() = Client::shared_memory_ref(region, lse_offset);
}

// The result of a Decode or Prefill whose outputs went into `buffer` (the LSE inline when
// `lse_offset` is -1).
template <class Response>
Result<KvOpResult> kv_shm_result(const Response& resp, const SharedMemoryBuffer& buffer,
                                 DType dtype, const Shape& q_shape, std::int64_t o_offset,
                                 bool return_lse, std::int64_t lse_offset, bool copy_out,
                                 int attempts) {
  KvOpResult result{Tensor(),        {},
                    resp.timings(),  {resp.lengths().begin(), resp.lengths().end()},
                    resp.replayed(), attempts};
  if (copy_out) {
    ATTN_ASSIGN_OR_RETURN(o, from_region(buffer, o_offset, dtype, q_shape, "o_offset"));
    result.output = std::move(o);
  }
  if (return_lse && lse_offset < 0) {
    ATTN_ASSIGN_OR_RETURN(lse, to_tensor(resp.lse(), "lse"));
    result.lse = std::move(lse);
  } else if (return_lse && copy_out) {
    ATTN_ASSIGN_OR_RETURN(lse, from_region(buffer, lse_offset, DType::kFloat32,
                                           {q_shape[0], q_shape[1]}, "lse_offset"));
    result.lse = std::move(lse);
  }
  return result;
}

}  // namespace

Result<KvOpResult> Client::decode_shm(const std::string& cache, int layer,
                                      const std::vector<std::string>& sequence_ids,
                                      const std::string& region, const SharedMemoryBuffer& buffer,
                                      DType dtype, const Shape& q_shape, const Shape& kv_shape,
                                      const std::int64_t offsets[3], std::int64_t o_offset,
                                      const DecodeOptions& options, bool copy_out,
                                      std::int64_t lse_offset) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(cache));
  if (q_shape.size() != 3) return invalid_argument("q_shape: expected [n, Hq, D]");
  auto req = kv_request<v1::DecodeRequest>(cache, layer, sequence_ids);
  place_in_region(req, req.mutable_q(), req.mutable_k_new(), req.mutable_v_new(), region, dtype,
                  q_shape, kv_shape, offsets, o_offset, options.return_lse, lse_offset);
  set_options(options, &req);
  v1::DecodeResponse resp;
  int attempts = 0;
  ATTN_RETURN_IF_ERROR(send_kv(stub, req, &resp, &v1::AttnService::Stub::Decode,
                               !options.expected_lengths.empty(), &attempts));
  return kv_shm_result(resp, buffer, dtype, q_shape, o_offset, options.return_lse, lse_offset,
                       copy_out, attempts);
}

Result<KvOpResult> Client::prefill_shm(const std::string& cache, int layer,
                                       const std::vector<std::string>& sequence_ids,
                                       const std::vector<std::int64_t>& lens,
                                       const std::string& region, const SharedMemoryBuffer& buffer,
                                       DType dtype, const Shape& q_shape, const Shape& kv_shape,
                                       const std::int64_t offsets[3], std::int64_t o_offset,
                                       const PrefillOptions& options, bool copy_out,
                                       std::int64_t lse_offset) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(cache));
  if (q_shape.size() != 3) return invalid_argument("q_shape: expected [sum(lens), Hq, D]");
  auto req = kv_request<v1::PrefillRequest>(cache, layer, sequence_ids);
  req.mutable_lens()->Assign(lens.begin(), lens.end());
  place_in_region(req, req.mutable_q(), req.mutable_k(), req.mutable_v(), region, dtype, q_shape,
                  kv_shape, offsets, o_offset, options.return_lse, lse_offset);
  set_options(options, &req);
  v1::PrefillResponse resp;
  int attempts = 0;
  ATTN_RETURN_IF_ERROR(send_kv(stub, req, &resp, &v1::AttnService::Stub::Prefill,
                               !options.expected_lengths.empty(), &attempts));
  return kv_shm_result(resp, buffer, dtype, q_shape, o_offset, options.return_lse, lse_offset,
                       copy_out, attempts);
}

Result<KvContents> Client::read_kv(const std::string& cache, const std::string& sequence_id,
                                   int layer, std::size_t chunk_bytes, bool dequantize) {
  ATTN_ASSIGN_OR_RETURN(stub, kv_stub(cache));
  auto ctx = make_context();
  v1::ReadKvRequest req;
  req.set_cache(cache);
  req.set_sequence_id(sequence_id);
  req.set_layer(layer);
  req.set_chunk_bytes(static_cast<std::int64_t>(chunk_bytes));
  if (dequantize) req.set_form(v1::READ_KV_FORM_DEQUANTIZED);
  auto reader = stub->ReadKv(ctx.get(), req);
  v1::ReadKvResponse msg;
  KvContents out;
  // Where the stream's bytes go, in order: K, V (and float8's K and V scales).
  std::vector<std::pair<void*, std::size_t>> parts;
  std::size_t part = 0, at = 0;
  bool have_header = false;
  while (reader->Read(&msg)) {
    if (msg.has_header()) {
      if (have_header) return internal_error("ReadKv: the server sent a second header");
      const v1::ReadKvHeader& h = msg.header();
      out.shape.assign(h.shape().begin(), h.shape().end());
      out.page_size = h.page_size();
      // A sequence may hold no token at a layer: [0, Hkv, D] is a shape here.
      const auto elements = [](const Shape& shape) -> Result<std::int64_t> {
        std::int64_t n = 1;
        for (std::int64_t d : shape) {
          if (d < 0 || d > (std::int64_t{1} << 31))
            return internal_error("ReadKv: the server sent a bad shape " + shape_to_string(shape));
          n *= d;
        }
        return n;
      };
      ATTN_ASSIGN_OR_RETURN(count, elements(out.shape));
      if (h.dtype() == v1::D_TYPE_FLOAT8_E4M3) {
        out.fp8 = true;
        out.scales_shape.assign(h.scales_shape().begin(), h.scales_shape().end());
        ATTN_ASSIGN_OR_RETURN(scales, elements(out.scales_shape));
        out.k_codes.resize(static_cast<std::size_t>(count));
        out.v_codes.resize(static_cast<std::size_t>(count));
        out.k_scales.resize(static_cast<std::size_t>(scales));
        out.v_scales.resize(static_cast<std::size_t>(scales));
        parts = {{out.k_codes.data(), out.k_codes.size()},
                 {out.v_codes.data(), out.v_codes.size()},
                 {out.k_scales.data(), out.k_scales.size() * sizeof(float)},
                 {out.v_scales.data(), out.v_scales.size() * sizeof(float)}};
      } else {
        const auto dtype = wire::from_proto(h.dtype());
        if (!dtype) return internal_error("ReadKv: the server sent a header of no known dtype");
        out.k = Tensor(*dtype, out.shape);
        out.v = Tensor(*dtype, out.shape);
        parts = {{out.k.data(), out.k.bytes()}, {out.v.data(), out.v.bytes()}};
      }
      have_header = true;
      continue;
    }
    const std::string& chunk = msg.chunk();
    if (!have_header) return internal_error("ReadKv: the server sent bytes before the header");
    for (std::size_t used = 0; used < chunk.size();) {
      while (part < parts.size() && at == parts[part].second) ++part, at = 0;
      if (part == parts.size())
        return internal_error("ReadKv: the server sent more bytes than the shape holds");
      const std::size_t n = std::min(chunk.size() - used, parts[part].second - at);
      std::memcpy(static_cast<char*>(parts[part].first) + at, chunk.data() + used, n);
      used += n;
      at += n;
    }
  }
  ATTN_RETURN_IF_ERROR(wire::from_grpc(reader->Finish()));
  while (part < parts.size() && at == parts[part].second) ++part, at = 0;
  if (!have_header || part != parts.size()) return internal_error("ReadKv: the stream ended early");
  return out;
}

}  // namespace attn
