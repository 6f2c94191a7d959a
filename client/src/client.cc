#include "attn/client.h"

#include <grpcpp/create_channel.h>

#include "attn/wire.h"

namespace attn {
namespace {

// A response tensor as an owned host tensor.
Result<Tensor> to_tensor(const v1::Tensor& t, const char* field) {
  wire::TensorLimits unlimited;
  unlimited.max_elements = std::numeric_limits<std::int64_t>::max();
  ATTN_ASSIGN_OR_RETURN(decoded, wire::decode_tensor(t, std::string("response.") + field, unlimited));
  if (!decoded.owned.shape().empty()) return std::move(decoded.owned);
  Tensor out(decoded.view.dtype, decoded.view.shape);
  std::memcpy(out.data(), decoded.view.data, out.bytes());
  return out;
}

}  // namespace

std::shared_ptr<grpc::Channel> make_channel(const std::string& target, const ClientOptions& options) {
  grpc::ChannelArguments args;
  const int max_bytes = static_cast<int>(std::min<std::int64_t>(options.max_message_mb, 2047) << 20);
  args.SetMaxReceiveMessageSize(max_bytes);
  args.SetMaxSendMessageSize(max_bytes);
  return grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
}

Client::Client(const std::string& target, const ClientOptions& options)
    : Client(make_channel(target, options), options) {}

Client::Client(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options)
    : channel_(std::move(channel)), stub_(v1::AttnService::NewStub(channel_)), options_(options) {}

std::unique_ptr<grpc::ClientContext> Client::make_context() const {
  auto ctx = std::make_unique<grpc::ClientContext>();
  if (options_.timeout.count() > 0) ctx->set_deadline(std::chrono::system_clock::now() + options_.timeout);
  return ctx;
}

Result<OpResult> Client::matmul(const Tensor& a, const Tensor& b, const MatmulOptions& options) {
  v1::MatmulRequest req;
  wire::encode_tensor(a.view(), req.mutable_a());
  wire::encode_tensor(b.view(), req.mutable_b());
  req.set_transpose_a(options.transpose_a);
  req.set_transpose_b(options.transpose_b);
  req.set_kernel(options.kernel);
  v1::MatmulResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->Matmul(make_context().get(), req, &resp)));
  ATTN_ASSIGN_OR_RETURN(c, to_tensor(resp.c(), "c"));
  return OpResult{std::move(c), {}, resp.timings()};
}

Result<OpResult> Client::softmax(const Tensor& x, const std::string& kernel) {
  v1::SoftmaxRequest req;
  wire::encode_tensor(x.view(), req.mutable_x());
  req.set_kernel(kernel);
  v1::SoftmaxResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->Softmax(make_context().get(), req, &resp)));
  ATTN_ASSIGN_OR_RETURN(y, to_tensor(resp.y(), "y"));
  return OpResult{std::move(y), {}, resp.timings()};
}

Result<OpResult> Client::attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const AttentionOptions& options) {
  v1::AttentionRequest req;
  wire::encode_tensor(q.view(), req.mutable_q());
  wire::encode_tensor(k.view(), req.mutable_k());
  wire::encode_tensor(v.view(), req.mutable_v());
  req.set_causal(options.causal);
  req.set_scale(options.scale);
  req.set_return_lse(options.return_lse);
  req.set_kernel(options.kernel);
  v1::AttentionResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->Attention(make_context().get(), req, &resp)));
  ATTN_ASSIGN_OR_RETURN(o, to_tensor(resp.o(), "o"));
  OpResult result{std::move(o), {}, resp.timings()};
  if (options.return_lse) {
    ATTN_ASSIGN_OR_RETURN(lse, to_tensor(resp.lse(), "lse"));
    result.lse = std::move(lse);
  }
  return result;
}

Result<v1::ListKernelsResponse> Client::list_kernels(const std::string& op) {
  v1::ListKernelsRequest req;
  req.set_op(op);
  v1::ListKernelsResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(stub_->ListKernels(make_context().get(), req, &resp)));
  return resp;
}

Result<v1::GetServerInfoResponse> Client::server_info() {
  v1::GetServerInfoResponse resp;
  ATTN_RETURN_IF_ERROR(wire::from_grpc(
      stub_->GetServerInfo(make_context().get(), v1::GetServerInfoRequest(), &resp)));
  return resp;
}

}  // namespace attn
