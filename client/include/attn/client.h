// attn::Client: typed calls to an attnd server, returning the result tensors and the server's
// timings. Uses the proto API and the library's tensor type.
#pragma once

#include <grpcpp/channel.h>

#include <chrono>
#include <memory>
#include <string>

#include "attn/status.h"
#include "attn/tensor.h"
#include "attn/v1/attn.grpc.pb.h"

namespace attn {

struct ClientOptions {
  std::int64_t max_message_mb = 1024;
  std::chrono::milliseconds timeout{0};  // per call; 0 = none
  // TLS: set `tls` (the system's roots verify the server unless `tls_ca_file` is given); a client
  // certificate and key for servers that require mutual TLS.
  bool tls = false;
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_server_name;  // verify the certificate against this name instead of the target's
  std::string token;            // bearer token sent with every call; empty: none
  std::string load_balancing;   // gRPC policy, "round_robin"; empty: gRPC's default (pick_first)
};

struct MatmulOptions {
  bool transpose_a = false;
  bool transpose_b = false;
  std::string kernel;  // empty: the server picks
};

struct AttentionOptions {
  bool causal = false;
  float scale = 0.0f;  // 0: 1/sqrt(D)
  bool return_lse = false;
  std::string kernel;
};

struct OpResult {
  Tensor output;
  Tensor lse;  // attention with return_lse only
  v1::Timings timings;
};

class Client {
 public:
  // `target`: "host:port", or any gRPC target ("ipv4:127.0.0.1:1,127.0.0.1:2"). A TLS file that
  // cannot be read makes every call fail with the reason.
  explicit Client(const std::string& target, const ClientOptions& options = {});
  explicit Client(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options = {});

  Result<OpResult> matmul(const Tensor& a, const Tensor& b, const MatmulOptions& options = {});
  Result<OpResult> softmax(const Tensor& x, const std::string& kernel = "");
  Result<OpResult> attention(const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttentionOptions& options = {});
  Result<v1::ListKernelsResponse> list_kernels(const std::string& op = "");
  Result<v1::GetServerInfoResponse> server_info();

  // Resident tensors: stored on the server's device under a handle (streamed in chunks, so any
  // size), read back, listed, deleted. An op takes a handle in place of an input through
  // `resident(handle)`, and keeps its outputs on the device with keep_output (see the proto).
  Result<v1::TensorInfo> put_tensor(const Tensor& t, std::int64_t ttl_ms = 0, const std::string& device = "",
                                    std::size_t chunk_bytes = std::size_t{1} << 20);
  Result<Tensor> get_tensor(const std::string& handle, std::size_t chunk_bytes = 0);
  Result<std::int64_t> delete_tensor(const std::string& handle);
  Result<v1::ListTensorsResponse> list_tensors();
  // A request tensor that names a resident tensor.
  static v1::Tensor resident(const std::string& handle);

  // Times variants on the server's device with inputs made there (see BenchmarkRequest).
  Result<v1::BenchmarkResponse> benchmark(const v1::BenchmarkRequest& request);
  // The payload back, and the server's time in the handler.
  Result<v1::EchoResponse> echo(const std::string& payload);

  // The channel, for other services on the same server (health, reflection).
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  // The generated stub, for requests built by hand.
  v1::AttnService::Stub& stub() { return *stub_; }
  // A context with this client's timeout and token applied.
  std::unique_ptr<grpc::ClientContext> make_context() const;
  // Why the channel could not be made, or OK.
  const Status& channel_status() const { return channel_status_; }

 private:
  Status channel_status_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttnService::Stub> stub_;
  ClientOptions options_;
};

// Makes a channel to `target` with the message limits, TLS and load balancing of `options`, or
// says why the TLS files cannot be used.
Result<std::shared_ptr<grpc::Channel>> make_channel(const std::string& target, const ClientOptions& options);

// The bearer token in `token_file` when given, else in the ATTN_TOKEN environment variable, else
// empty.
Result<std::string> load_client_token(const std::string& token_file);

}  // namespace attn
