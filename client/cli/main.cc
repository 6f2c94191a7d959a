// attn: a command-line client for attnd. Inputs from .npy files or --random, outputs to .npy,
// the server's timings as a short table or JSON.
#include <google/protobuf/util/json_util.h>

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstring>
#include <cstdio>
#include <iostream>
#include <random>
#include <sstream>

#include "bench_rpc.h"
#include "decode_bench.h"
#include "attn/client.h"
#include "attn/npy.h"
#include "attn/wire.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace {

using attn::Result;
using attn::Shape;
using attn::Status;
using attn::Tensor;
namespace v1 = attn::v1;

struct Common {
  std::string server = "127.0.0.1:50051";
  std::int64_t timeout_ms = 0;
  bool json = false;
  std::string token_file;
};

struct OpFlags {
  bool shm = false;  // inputs and output through a POSIX shared-memory region
  std::vector<std::string> inputs;
  std::string random;
  std::string dtype = "float32";
  std::string kernel;
  std::string output;
  std::uint64_t seed = 0;
  bool dtype_given = false;
};

Result<Shape> parse_shape(const std::string& text, const std::string& what) {
  Shape shape;
  std::stringstream ss(text);
  for (std::string d; std::getline(ss, d, ',');) {
    try {
      std::size_t used = 0;
      shape.push_back(std::stoll(d, &used));
      if (used != d.size()) throw std::invalid_argument(d);
    } catch (const std::exception&) {
      return attn::invalid_argument(what + ": expected comma-separated integers, got \"" + text + "\"");
    }
  }
  ATTN_RETURN_IF_ERROR(attn::checked_element_count(shape, what).status());
  return shape;
}

Tensor random_tensor(attn::DType dtype, const Shape& shape, std::mt19937_64& rng) {
  Tensor t(dtype, shape);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); ++i) t.set(i, dist(rng));
  return t;
}

Result<attn::DType> dtype_of(const OpFlags& f) {
  auto d = attn::parse_dtype(f.dtype);
  if (!d) return attn::invalid_argument("--dtype: expected float32, float16 or bfloat16, got " + f.dtype);
  return *d;
}

// Input i from its .npy file, converted to --dtype when one was given.
Result<Tensor> load_input(const OpFlags& f, std::size_t i) {
  ATTN_ASSIGN_OR_RETURN(t, attn::read_npy(f.inputs[i]));
  if (!f.dtype_given) return t;
  ATTN_ASSIGN_OR_RETURN(dtype, dtype_of(f));
  if (dtype == t.dtype()) return t;
  return Tensor::from_floats(dtype, t.shape(), t.to_floats());
}

std::string format_ns(std::int64_t ns) {
  char buf[32];
  if (ns >= 1000000000) std::snprintf(buf, sizeof buf, "%.3f s", ns / 1e9);
  else if (ns >= 1000000) std::snprintf(buf, sizeof buf, "%.3f ms", ns / 1e6);
  else std::snprintf(buf, sizeof buf, "%.1f us", ns / 1e3);
  return buf;
}

int report(const Common& c, const Result<attn::OpResult>& r, const OpFlags& f, const char* lse_path) {
  if (!r.ok()) {
    std::cerr << "attn: " << r.status().to_string() << "\n";
    return 1;
  }
  if (!f.output.empty()) {
    Status s = attn::write_npy(f.output, r->output);
    if (!s.ok()) return std::cerr << "attn: " << s.message() << "\n", 1;
  }
  if (lse_path && *lse_path) {
    Status s = attn::write_npy(lse_path, r->lse);
    if (!s.ok()) return std::cerr << "attn: " << s.message() << "\n", 1;
  }
  const auto& t = r->timings;
  const double secs = t.kernel_ns() / 1e9;
  if (c.json) {
    std::string timings;
    google::protobuf::util::JsonPrintOptions opts;
    opts.always_print_primitive_fields = true;
    opts.preserve_proto_field_names = true;
    (void)google::protobuf::util::MessageToJsonString(t, &timings, opts);
    std::cout << "{\"output_shape\": " << attn::shape_to_string(r->output.shape())
              << ", \"output_dtype\": \"" << attn::dtype_name(r->output.dtype())
              << "\", \"output\": \"" << f.output << "\", \"tflops\": "
              << (secs > 0 ? t.flops() / secs / 1e12 : 0.0) << ", \"gbps\": "
              << (secs > 0 ? t.bytes() / secs / 1e9 : 0.0) << ", \"timings\": " << timings << "}\n";
    return 0;
  }
  std::printf("%-8s %s\n%-8s %s\n", "kernel", t.kernel().c_str(), "device", t.device().c_str());
  std::printf("%-8s %s\n%-8s %s\n%-8s %s\n%-8s %s\n%-8s %s\n", "queue", format_ns(t.queue_ns()).c_str(),
              "h2d", format_ns(t.h2d_ns()).c_str(), "compute", format_ns(t.kernel_ns()).c_str(), "d2h",
              format_ns(t.d2h_ns()).c_str(), "total", format_ns(t.total_ns()).c_str());
  if (secs > 0)
    std::printf("%-8s %.3f TFLOP/s, %.1f GB/s\n", "rate", t.flops() / secs / 1e12, t.bytes() / secs / 1e9);
  std::printf("%-8s %s %s%s%s\n", "output", attn::shape_to_string(r->output.shape()).c_str(),
              std::string(attn::dtype_name(r->output.dtype())).c_str(), f.output.empty() ? "" : " -> ",
              f.output.c_str());
  return 0;
}

void add_op_flags(CLI::App* cmd, OpFlags& f, const char* inputs_help, const char* random_help) {
  cmd->add_option("inputs", f.inputs, inputs_help);
  cmd->add_option("--random", f.random, random_help);
  cmd->add_option("--dtype", f.dtype, "float32, float16 or bfloat16 (random inputs, or to convert .npy inputs)")
      ->each([&f](const std::string&) { f.dtype_given = true; });
  cmd->add_option("--kernel", f.kernel, "variant name from `attn kernels` (default: the server picks)");
  cmd->add_option("-o,--output", f.output, "write the result here (.npy)");
  cmd->add_option("--seed", f.seed, "seed for --random");
  cmd->add_flag("--shm", f.shm,
                "pass the inputs and the output through a POSIX shared-memory region (a server on this host "
                "run with --shared-memory system)");
}

// --shm: the inputs copied into a new shared-memory region registered for this call, `request`
// given their references and the output's, the output read back from the region.
template <class Request, class Response>
Result<attn::OpResult> call_in_shm(attn::Client& client, const std::vector<const Tensor*>& inputs,
                                   std::size_t output_bytes, const std::vector<v1::Tensor*>& request_inputs,
                                   Request& req, grpc::Status (v1::AttnService::Stub::*method)(
                                                     grpc::ClientContext*, const Request&, Response*),
                                   const v1::Tensor& (Response::*output)() const) {
  std::size_t total = output_bytes;
  for (const Tensor* t : inputs) total += t->bytes();
  ATTN_ASSIGN_OR_RETURN(buf, attn::SharedMemoryBuffer::create(total));
  const std::string name = "attn-cli-" + std::to_string(::getpid());
  std::int64_t at = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    std::memcpy(static_cast<char*>(buf.data()) + at, inputs[i]->data(), inputs[i]->bytes());
    *request_inputs[i] = attn::Client::in_shared_memory(inputs[i]->dtype(), inputs[i]->shape(), name, at);
    at += static_cast<std::int64_t>(inputs[i]->bytes());
  }
  *req.add_output_shm() = attn::Client::shared_memory_ref(name, at);
  ATTN_RETURN_IF_ERROR(client.register_shared_memory(name, buf.key(), 0, static_cast<std::int64_t>(total)).status());
  Response resp;
  const Status called = attn::wire::from_grpc((client.stub().*method)(client.make_context(req).get(), req, &resp));
  (void)client.unregister_shared_memory(name);
  ATTN_RETURN_IF_ERROR(called);
  const v1::Tensor& o = (resp.*output)();
  const auto dtype = attn::wire::from_proto(o.dtype());
  if (!dtype) return attn::internal_error("the response's output has no dtype");
  Tensor out(*dtype, Shape(o.shape().begin(), o.shape().end()));
  if (out.bytes() != output_bytes) return attn::internal_error("the response's output is not the size expected");
  std::memcpy(out.data(), static_cast<const char*>(buf.data()) + at, out.bytes());
  return attn::OpResult{std::move(out), {}, resp.timings()};
}

Status need_inputs(const OpFlags& f, std::size_t n, const char* names) {
  if (!f.random.empty() && !f.inputs.empty())
    return attn::invalid_argument("give either --random or input files, not both");
  if (f.random.empty() && f.inputs.size() != n)
    return attn::invalid_argument(std::string("expected ") + std::to_string(n) + " input files (" + names +
                                  ") or --random, got " + std::to_string(f.inputs.size()));
  return Status::Ok();
}

// A response as indented JSON with the proto's field names, for --json.
int print_json(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions opts;
  opts.add_whitespace = true;
  opts.preserve_proto_field_names = true;
  std::string s;
  (void)google::protobuf::util::MessageToJsonString(m, &s, opts);
  std::cout << s;
  return 0;
}

int fail(const Status& s) {
  std::cerr << "attn: " << s.message() << "\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Common c;
  CLI::App app{"attn: call an attnd server"};
  app.add_option("-s,--server", c.server, "server address")->capture_default_str()->envname("ATTN_SERVER");
  app.add_option("--timeout-ms", c.timeout_ms, "deadline per call (0: none)");
  app.add_flag("--json", c.json, "print JSON instead of a table");
  attn::ClientOptions options;
  app.add_flag("--tls", options.tls, "connect with TLS (implied by the other --tls-* flags)");
  app.add_option("--tls-ca", options.tls_ca_file, "PEM CA bundle that signed the server's certificate");
  app.add_option("--tls-cert", options.tls_cert_file, "PEM client certificate, for mutual TLS");
  app.add_option("--tls-key", options.tls_key_file, "PEM key of --tls-cert");
  app.add_option("--tls-server-name", options.tls_server_name,
                 "check the server's certificate against this name instead of the address's");
  app.add_option("--token-file", c.token_file, "file holding the server's bearer token (else $ATTN_TOKEN)");
  app.add_option("--load-balancing", options.load_balancing,
                 "gRPC policy over the addresses of --server, e.g. round_robin");
  app.require_subcommand(1);

  auto* info = app.add_subcommand("info", "server version, backend, devices and limits");
  std::string health_service;
  auto* health = app.add_subcommand("health", "the standard health check; exit 0 when SERVING");
  health->add_option("--service", health_service, "service name (default: the whole server)");
  std::string kernels_op;
  auto* kernels = app.add_subcommand("kernels", "every op's variants and whether they can run here");
  kernels->add_option("--op", kernels_op, "matmul, softmax or attention");

  OpFlags mm;
  bool ta = false, tb = false;
  auto* matmul = app.add_subcommand("matmul", "C = A.B");
  add_op_flags(matmul, mm, "A.npy B.npy", "M,K,N or B,M,K,N: random inputs of these sizes");
  matmul->add_flag("--transpose-a", ta, "A is stored [K, M] and read transposed");
  matmul->add_flag("--transpose-b", tb, "B is stored [N, K] and read transposed");

  OpFlags sm;
  auto* softmax = app.add_subcommand("softmax", "softmax over the last dimension");
  add_op_flags(softmax, sm, "X.npy", "SHAPE: a random input of this shape, e.g. 8,1000");

  OpFlags at;
  bool causal = false;
  float scale = 0.0f;
  std::int64_t kv_heads = 0, kv_len = 0;
  std::int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;
  std::string lse_out;
  auto* attention = app.add_subcommand("attention", "O = softmax(scale.QK^T) V");
  add_op_flags(attention, at, "Q.npy K.npy V.npy", "B,Hq,Sq,D: random inputs of these sizes");
  attention->add_flag("--causal", causal, "bottom-right aligned causal mask");
  attention->add_option("--scale", scale, "score scale (0: 1/sqrt(D))");
  attention->add_option("--kv-heads", kv_heads, "with --random: key/value heads (default Hq)");
  attention->add_option("--kv-len", kv_len, "with --random: key/value length (default Sq)");
  attention->add_option("--lse-out", lse_out, "also write the log-sum-exp [B,Hq,Sq] here (.npy)");
  attention->add_option("--window-left", window_left, "sliding window: keys seen left of a query's position (-1: all)");
  attention->add_option("--window-right", window_right, "sliding window: keys seen right of it (-1: all)");
  attention->add_option("--softcap", softcap, "soft-cap the scores: softcap * tanh(s / softcap) (0: none)");

  attn::cli::BenchRpcOptions brpc;
  auto* bench_rpc = app.add_subcommand("bench-rpc", "load generator: concurrent clients, latency percentiles, "
                                                    "the server's breakdown, and a gRPC echo baseline");
  bench_rpc->add_option("--clients", brpc.clients, "concurrent clients")->capture_default_str();
  bench_rpc->add_option("--seconds", brpc.seconds, "how long to call")->capture_default_str();
  bench_rpc->add_option("--mix", brpc.mix, "ops and input shapes: softmax:1,1 matmul:M,K,N attention:B,H,S,D")
      ->capture_default_str();
  bench_rpc->add_option("--dtype", brpc.dtype, "float32, float16 or bfloat16")->capture_default_str();
  bench_rpc->add_flag("--resident", brpc.resident, "put the inputs once and keep outputs on the device");
  bench_rpc->add_flag("--shm", brpc.shm,
                      "inputs and outputs through a POSIX shared-memory region (the server on this host, run "
                      "with --shared-memory system)");
  bench_rpc->add_option("--cuda-ipc", brpc.cuda_ipc_device,
                        "inputs and outputs in device memory of this CUDA device, exported by CUDA IPC (the server on "
                        "this GPU host, run with --shared-memory cuda)");
  bench_rpc->add_flag("--echo-only", brpc.echo_only, "only the echo baseline: the mix's payload sizes, for --seconds");
  bench_rpc->add_flag("--causal", brpc.causal, "attention entries are causal");
  bench_rpc->add_option("--json-out", brpc.json_path, "also write the results as JSON here");

  attn::cli::DecodeBenchOptions dbench;
  auto* decode_bench = app.add_subcommand(
      "decode-bench", "decode serving over a KV cache: prefill N sequences, then S steps of one Decode per layer "
                      "(the defaults are a GPU's load: a CPU server wants --context 256 --layers 4 --q-heads 8 "
                      "--kv-heads 2 --head-dim 64)");
  decode_bench->add_option("--seqs", dbench.seqs, "sequences decoded together")->capture_default_str();
  decode_bench->add_option("--clients", dbench.clients, "concurrent decode streams, the sequences split among them")
      ->capture_default_str();
  decode_bench->add_option("--context", dbench.context, "prompt tokens per sequence: N, or MIN:MAX (uniform)")
      ->capture_default_str();
  decode_bench->add_option("--steps", dbench.steps, "timed decode steps")->capture_default_str();
  decode_bench->add_option("--warmup", dbench.warmup, "untimed steps first")->capture_default_str();
  decode_bench->add_option("--layers", dbench.layers, "layers: one Decode call each per step")->capture_default_str();
  decode_bench->add_option("--q-heads", dbench.q_heads, "query heads")->capture_default_str();
  decode_bench->add_option("--kv-heads", dbench.kv_heads, "key/value heads")->capture_default_str();
  decode_bench->add_option("--head-dim", dbench.head_dim, "head dimension")->capture_default_str();
  decode_bench->add_option("--dtype", dbench.dtype, "float32, float16 or bfloat16")->capture_default_str();
  decode_bench->add_option("--page-size", dbench.page_size, "tokens per page (8 .. 128)")->capture_default_str();
  decode_bench->add_option("--prefill-chunk", dbench.prefill_chunk, "tokens per Prefill call at most")
      ->capture_default_str();
  decode_bench->add_option("--kernel", dbench.kernel, "Decode's variant (default: the server picks)");
  decode_bench->add_option("--device", dbench.device, "the cache's device, e.g. cuda:1 (default: the server picks)");
  decode_bench->add_option("--seed", dbench.seed, "seed of the lengths and values")->capture_default_str();
  decode_bench->add_flag("--keep", dbench.keep, "leave the cache on the server");
  decode_bench->add_option("--json-out", dbench.json_path, "also write the results as JSON here");

  // KV caches by hand: create, describe, list, delete (JSON with --json).
  auto* kv_cmd = app.add_subcommand("kv", "KV caches: create, describe, list, delete");
  kv_cmd->require_subcommand(1);
  attn::v1::KvCacheConfig kv_config;
  std::string kv_dtype = "bfloat16", kv_device, kv_handle, kv_replica;
  std::int64_t kv_ttl_ms = 0;
  int kv_layers = 0, kv_heads_n = 0, kv_head_dim = 0, kv_page = 0;
  std::int64_t kv_capacity = 0;
  auto* kv_create = kv_cmd->add_subcommand("create", "make a cache; prints its handle and replica");
  kv_create->add_option("--layers", kv_layers, "model layers")->required();
  kv_create->add_option("--kv-heads", kv_heads_n, "key/value heads")->required();
  kv_create->add_option("--head-dim", kv_head_dim, "head dimension")->required();
  kv_create->add_option("--capacity", kv_capacity, "tokens over all sequences")->required();
  kv_create->add_option("--dtype", kv_dtype, "float32, float16 or bfloat16")->capture_default_str();
  kv_create->add_option("--page-size", kv_page, "tokens per page (0: the server's default)");
  kv_create->add_option("--ttl-ms", kv_ttl_ms, "kept this long after its last use (0: the server's default)");
  kv_create->add_option("--device", kv_device, "e.g. cuda:1 (default: the server picks)");
  auto* kv_describe = kv_cmd->add_subcommand("describe", "pages, bytes and each sequence's lengths");
  kv_describe->add_option("handle", kv_handle, "the cache's handle")->required();
  auto* kv_list = kv_cmd->add_subcommand("list", "the caches of one server");
  auto* kv_delete = kv_cmd->add_subcommand("delete", "drop a cache");
  kv_delete->add_option("handle", kv_handle, "the cache's handle")->required();
  for (auto* sub : {kv_describe, kv_list, kv_delete})
    sub->add_option("--replica", kv_replica, "the server holding the cache (its KvCacheInfo.replica); "
                                             "default: --server");

  std::string bm_op, bm_shape, bm_dtype = "bfloat16";
  std::vector<std::string> bm_kernels;
  std::int64_t bm_kv_heads = 0, bm_kv_len = 0;
  int bm_iterations = 0;
  bool bm_causal = false;
  std::int64_t bm_window_left = -1, bm_window_right = -1;
  float bm_softcap = 0.0f;
  auto* benchmark = app.add_subcommand("benchmark", "time variants on the server's device (Benchmark RPC)");
  benchmark->add_option("op", bm_op, "matmul, softmax or attention")->required();
  benchmark->add_option("shape", bm_shape, "M,K,N | ROWS,COLS | B,Hq,Sq,D")->required();
  benchmark->add_option("--dtype", bm_dtype, "float32, float16 or bfloat16")->capture_default_str();
  benchmark->add_option("--kernel", bm_kernels, "variants to time (default: all that fit)");
  benchmark->add_option("--kv-heads", bm_kv_heads, "attention: key/value heads (default Hq)");
  benchmark->add_option("--kv-len", bm_kv_len, "attention: key/value length (default Sq)");
  benchmark->add_flag("--causal", bm_causal, "attention: causal");
  benchmark->add_option("--window-left", bm_window_left, "attention: sliding window, left side (-1: unbounded)");
  benchmark->add_option("--window-right", bm_window_right, "attention: sliding window, right side (-1: unbounded)");
  benchmark->add_option("--softcap", bm_softcap, "attention: soft-cap the scores (0: none)");
  benchmark->add_option("--iterations", bm_iterations, "timed runs per variant (default 20)");

  CLI11_PARSE(app, argc, argv);
  options.timeout = std::chrono::milliseconds(c.timeout_ms);
  options.tls |= !options.tls_ca_file.empty() || !options.tls_cert_file.empty() || !options.tls_server_name.empty();
  auto token = attn::load_client_token(c.token_file);
  if (!token.ok()) return fail(token.status());
  options.token = *token;
  attn::Client client(c.server, options);

  if (bench_rpc->parsed()) {
    brpc.server = c.server;
    return attn::cli::run_bench_rpc(brpc, options);
  }
  if (decode_bench->parsed()) {
    dbench.json = c.json;
    return attn::cli::run_decode_bench(dbench, client);
  }
  if (kv_cmd->parsed()) {
    auto print_cache = [&](const attn::v1::KvCacheInfo& x) {
      std::printf("%s on %s (%s): %d layers, Hkv %d, D %d, %s, page %d; pages %lld used / %lld total, "
                  "%.1f MiB, %lld sequences\n",
                  x.handle().c_str(), x.replica().c_str(), x.device().c_str(), x.config().layers(),
                  x.config().kv_heads(), x.config().head_dim(),
                  attn::v1::DType_Name(x.config().dtype()).c_str(), x.config().page_size(),
                  static_cast<long long>(x.pages_used()), static_cast<long long>(x.pages_total()),
                  x.bytes() / 1048576.0, static_cast<long long>(x.sequence_count()));
      for (const auto& q : x.sequences()) {
        std::string lengths;
        for (auto n : q.lengths()) {
          if (!lengths.empty()) lengths += ',';
          lengths += std::to_string(n);
        }
        std::printf("  %s: lengths %s, %lld pages (%lld shared)\n", q.id().c_str(), lengths.c_str(),
                    static_cast<long long>(q.pages()), static_cast<long long>(q.shared_pages()));
      }
    };
    if (!kv_handle.empty() && !kv_replica.empty()) client.set_kv_cache_replica(kv_handle, kv_replica);
    if (kv_create->parsed()) {
      auto dt = attn::parse_dtype(kv_dtype);
      if (!dt) return fail(attn::invalid_argument("--dtype: expected float32, float16 or bfloat16"));
      kv_config.set_layers(kv_layers);
      kv_config.set_kv_heads(kv_heads_n);
      kv_config.set_head_dim(kv_head_dim);
      kv_config.set_dtype(attn::wire::to_proto(*dt));
      kv_config.set_page_size(kv_page);
      kv_config.set_capacity_tokens(kv_capacity);
      auto r = client.create_kv_cache(kv_config, kv_ttl_ms, kv_device);
      if (!r.ok()) return std::cerr << "attn: " << r.status().to_string() << "\n", 1;
      if (c.json) return print_json(*r);
      print_cache(*r);
      return 0;
    }
    if (kv_describe->parsed()) {
      auto r = client.describe_kv_cache(kv_handle);
      if (!r.ok()) return std::cerr << "attn: " << r.status().to_string() << "\n", 1;
      if (c.json) return print_json(*r);
      print_cache(*r);
      return 0;
    }
    if (kv_list->parsed()) {
      auto r = client.list_kv_caches(kv_replica);
      if (!r.ok()) return std::cerr << "attn: " << r.status().to_string() << "\n", 1;
      if (c.json) return print_json(*r);
      for (const auto& x : r->caches()) print_cache(x);
      std::printf("%d caches; %.1f MiB used of a %.1f MiB quota (tensors and caches)\n", r->caches_size(),
                  r->used_bytes() / 1048576.0, r->quota_bytes() / 1048576.0);
      return 0;
    }
    auto r = client.delete_kv_cache(kv_handle);
    if (!r.ok()) return std::cerr << "attn: " << r.status().to_string() << "\n", 1;
    if (c.json) return std::printf("{\"freed_bytes\": %lld}\n", static_cast<long long>(*r)), 0;
    std::printf("freed %lld bytes\n", static_cast<long long>(*r));
    return 0;
  }
  if (benchmark->parsed()) {
    attn::v1::BenchmarkRequest req;
    req.set_op(bm_op);
    auto dt = attn::parse_dtype(bm_dtype);
    if (!dt) return fail(attn::invalid_argument("--dtype: expected float32, float16 or bfloat16"));
    req.set_dtype(attn::wire::to_proto(*dt));
    auto shape = parse_shape(bm_shape, "shape");
    if (!shape.ok()) return fail(shape.status());
    for (auto d : *shape) req.add_shape(d);
    req.set_kv_heads(bm_kv_heads);
    req.set_kv_len(bm_kv_len);
    req.set_causal(bm_causal);
    if (bm_window_left != -1) req.set_window_left(bm_window_left);
    if (bm_window_right != -1) req.set_window_right(bm_window_right);
    req.set_softcap(bm_softcap);
    req.set_iterations(bm_iterations);
    for (const auto& k : bm_kernels) req.add_kernels(k);
    auto r = client.benchmark(req);
    if (!r.ok()) return std::cerr << "attn: " << r.status().to_string() << "\n", 1;
    if (c.json) return print_json(*r);
    std::printf("%-28s %-24s %11s %11s %11s %10s %10s %8s %s\n", "variant", "device", "median", "p10", "p90",
                "TFLOP/s", "GB/s", "error", "");
    for (const auto& x : r->results())
      std::printf("%-28s %-24s %11s %11s %11s %10.2f %10.1f %8.1e %s\n", x.kernel().c_str(),
                  x.device().substr(0, 24).c_str(), format_ns(x.median_ns()).c_str(), format_ns(x.p10_ns()).c_str(),
                  format_ns(x.p90_ns()).c_str(), x.tflops(), x.gbps(), x.error(),
                  x.correct() ? "ok" : ("WRONG " + x.message()).c_str());
    return 0;
  }
  if (info->parsed()) {
    auto r = client.server_info();
    if (!r.ok()) return std::cerr << "attn: " << r.status().to_string() << "\n", 1;
    if (c.json) return print_json(*r);
    std::printf("attnd %s, %s backend\n", r->version().c_str(), r->backend().c_str());
    for (const auto& d : r->devices())
      std::printf("  device %s: %.1f GiB, %d %s%s%s\n", d.name().c_str(), d.memory_bytes() / 1073741824.0,
                  d.multiprocessors(), d.backend() == "cuda" ? "SMs" : "threads",
                  d.compute_capability().empty() ? "" : ", sm_", d.compute_capability().c_str());
    std::printf("  limits: max message %lld MiB, max %lld elements per tensor, queue depth %d\n",
                static_cast<long long>(r->limits().max_message_bytes() >> 20),
                static_cast<long long>(r->limits().max_elements()), r->limits().queue_depth());
    return 0;
  }
  if (health->parsed()) {
    if (!client.channel_status().ok()) return fail(client.channel_status());
    auto stub = grpc::health::v1::Health::NewStub(client.channel());
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(health_service);
    grpc::health::v1::HealthCheckResponse resp;
    auto ctx = client.make_context();
    const grpc::Status s = stub->Check(ctx.get(), req, &resp);
    if (!s.ok()) return std::cerr << "attn: health: " << s.error_message() << "\n", 1;
    std::cout << grpc::health::v1::HealthCheckResponse::ServingStatus_Name(resp.status()) << "\n";
    return resp.status() == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
  }
  if (kernels->parsed()) {
    auto r = client.list_kernels(kernels_op);
    if (!r.ok()) return std::cerr << "attn: " << r.status().to_string() << "\n", 1;
    if (c.json) return print_json(*r);
    for (const auto& k : r->kernels()) {
      std::string dtypes;
      for (int d : k.dtypes()) {
        auto t = attn::wire::from_proto(static_cast<attn::v1::DType>(d));
        dtypes += (dtypes.empty() ? "" : ",") + std::string(t ? attn::dtype_name(*t) : "?");
      }
      std::printf("%-28s %-5s %-9s %-26s %s\n", k.name().c_str(), k.backend().c_str(),
                  k.available() ? "available" : "-", dtypes.c_str(), k.limits().c_str());
    }
    return 0;
  }

  std::mt19937_64 rng;
  if (matmul->parsed()) {
    if (Status s = need_inputs(mm, 2, "A.npy B.npy"); !s.ok()) return fail(s);
    Tensor a, b;
    if (!mm.random.empty()) {
      auto dims = parse_shape(mm.random, "--random");
      if (!dims.ok()) return fail(dims.status());
      if (dims->size() != 3 && dims->size() != 4) return fail(attn::invalid_argument("--random: expected M,K,N or B,M,K,N"));
      auto dtype = dtype_of(mm);
      if (!dtype.ok()) return fail(dtype.status());
      rng.seed(mm.seed);
      const Shape& d = *dims;
      const bool batched = d.size() == 4;
      const std::int64_t m = d[batched], k = d[batched + 1], n = d[batched + 2];
      Shape as = ta ? Shape{k, m} : Shape{m, k}, bs = tb ? Shape{n, k} : Shape{k, n};
      if (batched) as.insert(as.begin(), d[0]), bs.insert(bs.begin(), d[0]);
      a = random_tensor(*dtype, as, rng);
      b = random_tensor(*dtype, bs, rng);
    } else {
      auto ra = load_input(mm, 0), rb = load_input(mm, 1);
      if (!ra.ok()) return fail(ra.status());
      if (!rb.ok()) return fail(rb.status());
      a = std::move(*ra);
      b = std::move(*rb);
    }
    if (mm.shm) {
      v1::MatmulRequest req;
      req.set_transpose_a(ta);
      req.set_transpose_b(tb);
      req.set_kernel(mm.kernel);
      const std::int64_t rows = a.shape()[a.shape().size() - (ta ? 1 : 2)];
      const std::int64_t cols = b.shape()[b.shape().size() - (tb ? 2 : 1)];
      const std::int64_t batch = a.shape().size() == 3 ? a.shape()[0] : 1;
      const std::size_t out_bytes = static_cast<std::size_t>(batch * rows * cols) * attn::element_size(a.dtype());
      return report(c, call_in_shm(client, {&a, &b}, out_bytes, {req.mutable_a(), req.mutable_b()}, req,
                                   &v1::AttnService::Stub::Matmul, &v1::MatmulResponse::c), mm, nullptr);
    }
    return report(c, client.matmul(a, b, {ta, tb, mm.kernel}), mm, nullptr);
  }
  if (softmax->parsed()) {
    if (Status s = need_inputs(sm, 1, "X.npy"); !s.ok()) return fail(s);
    Tensor x;
    if (!sm.random.empty()) {
      auto shape = parse_shape(sm.random, "--random");
      if (!shape.ok()) return fail(shape.status());
      auto dtype = dtype_of(sm);
      if (!dtype.ok()) return fail(dtype.status());
      rng.seed(sm.seed);
      x = random_tensor(*dtype, *shape, rng);
    } else {
      auto rx = load_input(sm, 0);
      if (!rx.ok()) return fail(rx.status());
      x = std::move(*rx);
    }
    if (sm.shm) {
      v1::SoftmaxRequest req;
      req.set_kernel(sm.kernel);
      return report(c, call_in_shm(client, {&x}, x.bytes(), {req.mutable_x()}, req, &v1::AttnService::Stub::Softmax,
                                   &v1::SoftmaxResponse::y), sm, nullptr);
    }
    return report(c, client.softmax(x, sm.kernel), sm, nullptr);
  }
  if (attention->parsed()) {
    if (Status s = need_inputs(at, 3, "Q.npy K.npy V.npy"); !s.ok()) return fail(s);
    Tensor q, k, v;
    if (!at.random.empty()) {
      auto dims = parse_shape(at.random, "--random");
      if (!dims.ok()) return fail(dims.status());
      if (dims->size() != 4) return fail(attn::invalid_argument("--random: expected B,Hq,Sq,D"));
      auto dtype = dtype_of(at);
      if (!dtype.ok()) return fail(dtype.status());
      rng.seed(at.seed);
      const Shape& d = *dims;
      const Shape kv{d[0], kv_heads ? kv_heads : d[1], kv_len ? kv_len : d[2], d[3]};
      q = random_tensor(*dtype, d, rng);
      k = random_tensor(*dtype, kv, rng);
      v = random_tensor(*dtype, kv, rng);
    } else {
      Tensor* outs[] = {&q, &k, &v};
      for (std::size_t i = 0; i < 3; ++i) {
        auto r = load_input(at, i);
        if (!r.ok()) return fail(r.status());
        *outs[i] = std::move(*r);
      }
    }
    attn::AttentionOptions o{causal, scale, !lse_out.empty(), at.kernel, window_left, window_right, softcap};
    if (at.shm) {
      v1::AttentionRequest req;
      req.set_causal(causal);
      req.set_scale(scale);
      req.set_kernel(at.kernel);
      if (window_left != -1) req.set_window_left(window_left);
      if (window_right != -1) req.set_window_right(window_right);
      req.set_softcap(softcap);
      if (!lse_out.empty()) return fail(attn::invalid_argument("--lse-out with --shm: not supported yet"));
      return report(c, call_in_shm(client, {&q, &k, &v}, q.bytes(), {req.mutable_q(), req.mutable_k(), req.mutable_v()},
                                   req, &v1::AttnService::Stub::Attention, &v1::AttentionResponse::o),
                    at, nullptr);
    }
    return report(c, client.attention(q, k, v, o), at, lse_out.c_str());
  }
  return 0;
}
