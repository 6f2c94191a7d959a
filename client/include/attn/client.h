// attn::Client: typed calls to an attnd server, returning the result tensors and the server's
// timings. Uses the proto API and the library's tensor type.
#pragma once

#include <grpcpp/channel.h>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "attn/status.h"
#include "attn/tensor.h"
#include "attn/v1/attn.grpc.pb.h"

namespace attn {

// How decode and prefill calls that carry expected_lengths (exactly-once on the server: a repeat
// is answered without appending again) are sent again when their outcome is unknown: on
// UNAVAILABLE (a reset connection, a replica going away) and on DEADLINE_EXCEEDED of their own
// attempt's deadline (ClientOptions::timeout, per attempt), up to `max_attempts` attempts in all,
// waiting initial_backoff, then `multiplier` times longer each time up to max_backoff (each
// wait jittered to between half and all of it). With a timeout, each attempt waits for the
// channel to (re)connect within it (gRPC's wait_for_ready) instead of failing at once. Any other
// error (FAILED_PRECONDITION: the cache is not where the call expected it) is returned at once.
// Calls without expected_lengths are never resent.
struct KvRetryOptions {
  int max_attempts = 5;
  std::chrono::milliseconds initial_backoff{50};
  std::chrono::milliseconds max_backoff{1000};
  double multiplier = 2.0;
};

struct ClientOptions {
  std::int64_t max_message_mb = 1024;
  std::chrono::milliseconds timeout{0};  // per call (per attempt when resent); 0 = none
  // TLS: set `tls` (the system's roots verify the server unless `tls_ca_file` is given); a client
  // certificate and key for servers that require mutual TLS.
  bool tls = false;
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
  std::string tls_server_name;  // verify the certificate against this name instead of the target's
  std::string token;            // bearer token sent with every call; empty: none
  std::string load_balancing;   // gRPC policy, "round_robin"; empty: gRPC's default (pick_first)
  KvRetryOptions kv_retry;      // decode/prefill with expected_lengths
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
  // Sliding window (FlashAttention-2's window_size, bottom-right aligned): query i at key
  // position p = i + Sk - Sq sees keys p - window_left .. p + window_right; -1 unbounded.
  std::int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;  // > 0: scores become softcap * tanh(s / softcap)
  // Attention sinks (gpt-oss): float32 [Hq], one logit per query head joining each row's softmax
  // denominator with no value row; empty (no shape): none.
  Tensor sinks;
};

struct OpResult {
  Tensor output;
  Tensor lse;  // attention with return_lse only
  v1::Timings timings;
};

struct DecodeOptions {
  float scale = 0.0f;  // 0: 1/sqrt(D)
  bool return_lse = false;
  std::string kernel;
  // Sliding window: the new token (position len - 1) sees keys len - 1 - window_left .. len - 1;
  // -1 unbounded.
  std::int64_t window_left = -1;
  float softcap = 0.0f;  // > 0: scores become softcap * tanh(s / softcap)
  Tensor sinks;          // float32 [Hq], as AttentionOptions::sinks; empty: none
  // Exactly-once: each sequence's length at this layer before the call. Given, the server
  // applies the call once however often it arrives, and the client resends it when its outcome
  // is unknown (KvRetryOptions); empty: no check, never resent.
  std::vector<std::int64_t> expected_lengths;
};

struct PrefillOptions {
  bool non_causal = false;  // each new token sees all of its sequence (encoders)
  float scale = 0.0f;
  bool return_lse = false;
  std::string kernel;
  // Sliding window: new token at position p sees keys p - window_left .. p + window_right
  // (window_right only with non_causal); -1 unbounded.
  std::int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;  // > 0: scores become softcap * tanh(s / softcap)
  Tensor sinks;          // float32 [Hq], as AttentionOptions::sinks; empty: none
  // As DecodeOptions::expected_lengths (0 for a sequence this call creates).
  std::vector<std::int64_t> expected_lengths;
};

// A Decode or Prefill result: o [rows, Hq, D], lse float32 [rows, Hq] when asked for, and each
// sequence's length at that layer after the call.
struct KvOpResult {
  Tensor output;
  Tensor lse;
  v1::Timings timings;
  std::vector<std::int64_t> lengths;
  bool replayed = false;  // the server answered a repeat of a call it had applied
  int attempts = 1;       // times the call was sent
};

// Where an asynchronous Decode or Prefill delivers its result (Client::decode_async,
// prefill_async): called once.
using KvCallback = std::function<void(Result<KvOpResult>)>;

// One sequence's cached K and V at one layer, each [len, Hkv, D] in the cache's dtype; for a
// cache stored in float8 read as stored (fp8), the e4m3 codes [len, Hkv, D] in k_codes/v_codes
// and their float32 scales [ceil(len / page_size), Hkv] instead (k and v then empty): token t of
// head h is e4m3(code) x scales[t / page_size][h] (attn/fp8.h decodes a code).
struct KvContents {
  Tensor k;
  Tensor v;
  bool fp8 = false;
  Shape shape, scales_shape;
  std::int64_t page_size = 0;
  std::vector<std::uint8_t> k_codes, v_codes;
  std::vector<float> k_scales, v_scales;
};

// A POSIX shared-memory object this process made and maps (shm_open + mmap), to hand a server on
// the same host tensors at memory speed (RegisterSharedMemory). Unlinked and unmapped when
// destroyed.
class SharedMemoryBuffer {
 public:
  // A new object named `key` ("/attn-..."; empty: a unique name) of `bytes`, zero-filled.
  static Result<SharedMemoryBuffer> create(std::size_t bytes, const std::string& key = "");
  SharedMemoryBuffer() = default;
  SharedMemoryBuffer(SharedMemoryBuffer&& o) noexcept { *this = std::move(o); }
  SharedMemoryBuffer& operator=(SharedMemoryBuffer&& o) noexcept;
  ~SharedMemoryBuffer();

  const std::string& key() const { return key_; }
  std::size_t size() const { return size_; }
  void* data() const { return data_; }
  int fd() const { return fd_; }

 private:
  std::string key_;
  std::size_t size_ = 0;
  void* data_ = nullptr;
  int fd_ = -1;
};

class Client {
 public:
  // `target`: "host:port", or any gRPC target ("ipv4:127.0.0.1:1,127.0.0.1:2"). A TLS file that
  // cannot be read makes every call fail with the reason.
  explicit Client(const std::string& target, const ClientOptions& options = {});
  explicit Client(std::shared_ptr<grpc::Channel> channel, const ClientOptions& options = {});
  // Waits for the asynchronous calls still in flight (decode_async, prefill_async).
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  Result<OpResult> matmul(const Tensor& a, const Tensor& b, const MatmulOptions& options = {});
  Result<OpResult> softmax(const Tensor& x, const std::string& kernel = "");
  Result<OpResult> attention(const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttentionOptions& options = {});
  Result<v1::ListKernelsResponse> list_kernels(const std::string& op = "");
  Result<v1::GetServerInfoResponse> server_info();

  // Resident tensors: stored on the server's device under a handle (streamed in chunks, so any
  // size), read back, listed, deleted. An op takes a handle in place of an input through
  // `resident(handle)`, and keeps its outputs on the device with keep_output (see the proto).
  Result<v1::TensorInfo> put_tensor(const Tensor& t, std::int64_t ttl_ms = 0,
                                    const std::string& device = "",
                                    std::size_t chunk_bytes = std::size_t{1} << 20);
  Result<Tensor> get_tensor(const std::string& handle, std::size_t chunk_bytes = 0);
  Result<std::int64_t> delete_tensor(const std::string& handle);
  Result<v1::ListTensorsResponse> list_tensors();
  // A request tensor that names a resident tensor.
  static v1::Tensor resident(const std::string& handle);

  // Times variants on the server's device with inputs made there (see BenchmarkRequest).
  // Shared memory (servers run with --shared-memory system): registers `bytes` from `offset` of the
  // POSIX shared-memory object `key` as region `name`; inputs then name bytes in it
  // (in_shared_memory) and outputs may be written into it (the requests' output_shm).
  Result<v1::SharedMemoryRegionInfo> register_shared_memory(const std::string& name,
                                                            const std::string& key,
                                                            std::int64_t offset,
                                                            std::int64_t bytes);
  // CUDA IPC (servers run with --shared-memory cuda, on this GPU host): `bytes` from `offset` of
  // the device allocation whose cudaIpcMemHandle_t's bytes are `ipc_handle`, on CUDA device
  // `device`; ops then read and write it in place on that GPU.
  Result<v1::SharedMemoryRegionInfo> register_cuda_memory(const std::string& name,
                                                          const std::string& ipc_handle, int device,
                                                          std::int64_t offset, std::int64_t bytes);
  // Forgets `name` (empty: all of this caller's regions); returns how many went.
  Result<int> unregister_shared_memory(const std::string& name = "");
  Result<v1::SharedMemoryStatusResponse> shared_memory_status(const std::string& name = "");
  // An op input held in region `region` at `offset`, with its dtype and shape.
  static v1::Tensor in_shared_memory(DType dtype, const Shape& shape, const std::string& region,
                                     std::int64_t offset);
  static v1::SharedMemoryRef shared_memory_ref(const std::string& region, std::int64_t offset,
                                               std::int64_t bytes = 0);
  // Attention whose inputs are in `buffer`, registered as `region`: q, k and v at `offsets[0..2]`;
  // O is written into the region at `o_offset` (and read back into the result's `output` when
  // `copy_out`), as the inline attention() otherwise.
  Result<OpResult> attention_shm(const std::string& region, const SharedMemoryBuffer& buffer,
                                 DType dtype, const Shape& q_shape, const Shape& kv_shape,
                                 const std::int64_t offsets[3], std::int64_t o_offset,
                                 const AttentionOptions& options = {}, bool copy_out = true);

  Result<v1::BenchmarkResponse> benchmark(const v1::BenchmarkRequest& request);
  // The payload back, and the server's time in the handler.
  Result<v1::EchoResponse> echo(const std::string& payload);

  // KV caches (decode serving). A cache lives on one replica; every call on it goes to the
  // replica its KvCacheInfo names (learned from create, describe and list, or told through
  // set_kv_cache_replica), over a pick_first channel made on first use with this client's options.
  // A handle the client has not learned goes over the main channel.
  Result<v1::KvCacheInfo> create_kv_cache(const v1::KvCacheConfig& config, std::int64_t ttl_ms = 0,
                                          const std::string& device = "");
  Result<v1::KvCacheInfo> describe_kv_cache(const std::string& handle);
  // The caches of one server: the main channel's pick (one replica of several), or `replica`'s.
  Result<v1::ListKvCachesResponse> list_kv_caches(const std::string& replica = "");
  // Returns the bytes freed.
  Result<std::int64_t> delete_kv_cache(const std::string& handle);
  // Returns the pages freed.
  Result<std::int64_t> release_sequences(const std::string& cache,
                                         const std::vector<std::string>& sequence_ids);
  Result<v1::ForkSequenceResponse> fork_sequence(const std::string& cache,
                                                 const std::string& source_id,
                                                 const std::string& new_id);
  // Cuts `sequence_id` back to `length` tokens at every layer (speculative decoding's rollback).
  Result<v1::TruncateSequenceResponse> truncate_sequence(const std::string& cache,
                                                         const std::string& sequence_id,
                                                         std::int64_t length);
  // q [n, Hq, D], k_new/v_new [n, Hkv, D]: one token per sequence, at one layer.
  Result<KvOpResult> decode(const std::string& cache, int layer,
                            const std::vector<std::string>& sequence_ids, const Tensor& q,
                            const Tensor& k_new, const Tensor& v_new,
                            const DecodeOptions& options = {});
  // q [sum(lens), Hq, D], k/v [sum(lens), Hkv, D]: lens[i] new tokens of sequence i, packed.
  Result<KvOpResult> prefill(const std::string& cache, int layer,
                             const std::vector<std::string>& sequence_ids,
                             const std::vector<std::int64_t>& lens, const Tensor& q,
                             const Tensor& k, const Tensor& v, const PrefillOptions& options = {});
  // Decode and Prefill without blocking, with decode()'s and prefill()'s arguments and results:
  // they return once the call is on its way, its inputs copied into the request (the caller's
  // tensors may go at once), so that a decode loop can run its own work while the server attends.
  // The result comes through the future, or through `done`, called once on a gRPC thread (keep
  // it short, and never wait there for another call of this client), or on the caller's thread
  // before the call returns when it cannot be sent (a replica whose channel cannot be made). An
  // exactly-once call (expected_lengths) is resent as decode() resends it, each wait on a gRPC
  // timer, holding no thread. Many calls may be in flight at once; the server runs those on one
  // cache in the order they arrive, which for calls in flight together need not be the order they
  // were made: a call on a (sequence, layer) waits for the one before it there. The client must
  // outlive its calls: its destructor waits for those in flight.
  std::future<Result<KvOpResult>> decode_async(const std::string& cache, int layer,
                                               const std::vector<std::string>& sequence_ids,
                                               const Tensor& q, const Tensor& k_new,
                                               const Tensor& v_new,
                                               const DecodeOptions& options = {});
  void decode_async(const std::string& cache, int layer,
                    const std::vector<std::string>& sequence_ids, const Tensor& q,
                    const Tensor& k_new, const Tensor& v_new, const DecodeOptions& options,
                    KvCallback done);
  std::future<Result<KvOpResult>> prefill_async(const std::string& cache, int layer,
                                                const std::vector<std::string>& sequence_ids,
                                                const std::vector<std::int64_t>& lens,
                                                const Tensor& q, const Tensor& k, const Tensor& v,
                                                const PrefillOptions& options = {});
  void prefill_async(const std::string& cache, int layer,
                     const std::vector<std::string>& sequence_ids,
                     const std::vector<std::int64_t>& lens, const Tensor& q, const Tensor& k,
                     const Tensor& v, const PrefillOptions& options, KvCallback done);
  // Decode and Prefill whose inputs are in `buffer`, registered as `region`: q, k and v (k_new and
  // v_new) at `offsets[0..2]`, of `dtype` (the cache's) and shapes `q_shape` / `kv_shape`; O is
  // written into the region at `o_offset`, and the LSE (options.return_lse) at `lse_offset`, or
  // inline when it is -1. Both are read back into the result's `output` / `lse` when `copy_out`,
  // as the inline decode() / prefill() otherwise (a resent exactly-once call included: the server
  // writes the recorded outputs into the region again).
  Result<KvOpResult> decode_shm(const std::string& cache, int layer,
                                const std::vector<std::string>& sequence_ids,
                                const std::string& region, const SharedMemoryBuffer& buffer,
                                DType dtype, const Shape& q_shape, const Shape& kv_shape,
                                const std::int64_t offsets[3], std::int64_t o_offset,
                                const DecodeOptions& options = {}, bool copy_out = true,
                                std::int64_t lse_offset = -1);
  Result<KvOpResult> prefill_shm(const std::string& cache, int layer,
                                 const std::vector<std::string>& sequence_ids,
                                 const std::vector<std::int64_t>& lens, const std::string& region,
                                 const SharedMemoryBuffer& buffer, DType dtype,
                                 const Shape& q_shape, const Shape& kv_shape,
                                 const std::int64_t offsets[3], std::int64_t o_offset,
                                 const PrefillOptions& options = {}, bool copy_out = true,
                                 std::int64_t lse_offset = -1);
  // `dequantize`: a float8 cache's K/V in its dtype (ReadKvRequest.form) instead of as stored.
  Result<KvContents> read_kv(const std::string& cache, const std::string& sequence_id, int layer,
                             std::size_t chunk_bytes = 0, bool dequantize = false);
  // Where a cache made elsewhere (another process) lives: its KvCacheInfo.replica.
  void set_kv_cache_replica(const std::string& handle, const std::string& replica);
  // The replica this client sends `handle`'s calls to; empty: the main channel.
  std::string kv_cache_replica(const std::string& handle) const;
  // The stub that reaches `cache`'s replica, for requests built by hand; fails only when that
  // replica's channel cannot be made (a TLS file that cannot be read).
  Result<v1::AttnService::Stub*> kv_stub(const std::string& cache);

  // The channel, for other services on the same server (health, reflection).
  const std::shared_ptr<grpc::Channel>& channel() const { return channel_; }
  // The generated stub, for requests built by hand.
  v1::AttnService::Stub& stub() { return *stub_; }
  // A context with this client's timeout and token applied.
  std::unique_ptr<grpc::ClientContext> make_context() const;
  // The same, declaring `request`'s serialized size (attn-request-bytes), so that the server can
  // set room aside for it, or refuse it, before its bytes come: for every call with one request.
  std::unique_ptr<grpc::ClientContext> make_context(
      const google::protobuf::MessageLite& request) const;
  // Why the channel could not be made, or OK.
  const Status& channel_status() const { return channel_status_; }

 private:
  // An op call: `inputs` (the request's Tensor field numbers and the caller's tensors) go into the
  // request as usual when small, and from where they lie when large; a large call's outputs are
  // read into `outputs` (by field number) rather than into the response's Tensor data.
  template <class Request, class Response>
  Status call(Request& request, const std::vector<std::pair<int, const Tensor*>>& inputs,
              Response* response, std::map<int, Tensor>* outputs, const char* method,
              grpc::Status (v1::AttnService::Stub::*unary)(grpc::ClientContext*, const Request&,
                                                           Response*));
  // Sends a Decode or Prefill; resends it per options_.kv_retry when `exactly_once` (the request
  // carries expected_lengths). `attempts` gets the times it was sent.
  template <class Request, class Response>
  Status send_kv(v1::AttnService::Stub* stub, const Request& request, Response* response,
                 grpc::Status (v1::AttnService::Stub::*unary)(grpc::ClientContext*, const Request&,
                                                              Response*),
                 bool exactly_once, int* attempts);
  // Sends a Decode or Prefill on `cache` without blocking, attempt after attempt as send_kv, and
  // hands `done` the result.
  template <class Request, class Response>
  void send_kv_async(const std::string& cache, Request request, KvCallback done);
  // Sends a filled RegisterSharedMemory request (system or CUDA).
  Result<v1::SharedMemoryRegionInfo> register_region(const v1::RegisterSharedMemoryRequest& req);

  // Handle -> replica address, and a stub per replica address (made on first use).
  struct KvRoutes {
    mutable std::mutex mu;
    std::map<std::string, std::string> replica_of;
    std::set<std::string>
        pinned;  // told by set_kv_cache_replica: what the server says won't move it
    std::map<std::string, std::unique_ptr<v1::AttnService::Stub>> stubs;
  };

  void learn_replica(const v1::KvCacheInfo& info);
  Result<v1::AttnService::Stub*> stub_for_replica(const std::string& replica);

  Status channel_status_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::AttnService::Stub> stub_;
  ClientOptions options_;
  std::string target_;  // empty when made from a channel
  std::unique_ptr<KvRoutes> routes_ = std::make_unique<KvRoutes>();
  // The asynchronous calls in flight, for the destructor to wait for.
  struct InFlight {
    std::mutex mu;
    std::condition_variable cv;
    int calls = 0;
  };
  std::unique_ptr<InFlight> in_flight_ = std::make_unique<InFlight>();
};

// Makes a channel to `target` with the message limits, TLS and load balancing of `options`, or
// says why the TLS files cannot be used.
Result<std::shared_ptr<grpc::Channel>> make_channel(const std::string& target,
                                                    const ClientOptions& options);

// The gRPC service config make_channel gives every channel: calls of methods that change no state
// are retried on UNAVAILABLE; those the proto marks `changes_state` (MethodTraits) are not (gRPC
// cannot tell a repeat from a new call): Client::decode/prefill resend those that carry
// expected_lengths themselves (KvRetryOptions).
std::string retry_service_config();

// The bearer token in `token_file` when given, else in the ATTN_TOKEN environment variable, else
// empty.
Result<std::string> load_client_token(const std::string& token_file);

}  // namespace attn
