#include "bench_rpc.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include <unistd.h>

#include "attn/wire.h"
#include "cuda_region.h"

namespace attn::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct Entry {
  std::string op;
  Shape shape;
  std::vector<Tensor> inputs;  // a, b / x / q, k, v
  std::vector<std::string> handles;
  std::size_t request_bytes = 0;
  Shape output_shape;
  // --shm: the region, the inputs' offsets in it and this entry's first output slot (a client's
  // slot is output_offset + client * output_bytes).
  std::string region;
  std::vector<std::int64_t> input_offsets;
  std::int64_t output_offset = 0;
  std::size_t output_bytes = 0;
};

struct Sample {
  std::int64_t latency_ns = 0;
  v1::Timings timings;
  std::int64_t echo_server_ns = 0;
};

struct Stats {
  std::vector<Sample> samples;
  std::map<std::string, long> errors;
};

Result<Entry> parse_entry(const std::string& spec, DType dtype, std::mt19937_64& rng) {
  const auto colon = spec.find(':');
  if (colon == std::string::npos) return invalid_argument("--mix: expected op:dims, got \"" + spec + "\"");
  Entry e;
  e.op = spec.substr(0, colon);
  std::stringstream ss(spec.substr(colon + 1));
  for (std::string d; std::getline(ss, d, ',');) e.shape.push_back(std::stoll(d));
  auto random = [&](const Shape& s) {
    Tensor t(dtype, s);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); ++i) t.set(i, dist(rng));
    return t;
  };
  if (e.op == "softmax") {
    e.inputs.push_back(random(e.shape));
    e.output_shape = e.shape;
  } else if (e.op == "matmul" && e.shape.size() == 3) {
    e.inputs.push_back(random({e.shape[0], e.shape[1]}));
    e.inputs.push_back(random({e.shape[1], e.shape[2]}));
    e.output_shape = {e.shape[0], e.shape[2]};
  } else if (e.op == "attention" && e.shape.size() == 4) {
    for (int i = 0; i < 3; ++i) e.inputs.push_back(random(e.shape));
    e.output_shape = e.shape;
  } else {
    return invalid_argument("--mix: expected softmax:SHAPE, matmul:M,K,N or attention:B,H,S,D, got \"" + spec + "\"");
  }
  for (const auto& t : e.inputs) e.request_bytes += t.bytes();
  e.output_bytes = static_cast<std::size_t>(element_count(e.output_shape)) * element_size(dtype);
  return e;
}

v1::Tensor tensor_or_handle(const Entry& e, std::size_t i) {
  if (!e.handles.empty()) return Client::resident(e.handles[i]);
  if (!e.region.empty()) {
    return Client::in_shared_memory(e.inputs[i].dtype(), e.inputs[i].shape(), e.region, e.input_offsets[i]);
  }
  v1::Tensor t;
  wire::encode_tensor(e.inputs[i].view(), &t);
  return t;
}

// One call of `e`; returns the gRPC status and fills the sample. Kept outputs are deleted after
// the timing.
grpc::Status call(Client& client, const Entry& e, bool causal, int slot, Sample& s) {
  const bool keep = !e.handles.empty();
  grpc::Status status;
  std::vector<std::string> kept;
  v1::SharedMemoryRef out;
  if (!e.region.empty()) {
    out = Client::shared_memory_ref(
        e.region, e.output_offset + static_cast<std::int64_t>(slot) * static_cast<std::int64_t>(e.output_bytes));
  }
  const auto start = Clock::now();
  if (!keep && e.region.empty()) {  // inline: as a user of attn::Client calls, the result decoded
    Result<OpResult> r = e.op == "softmax" ? client.softmax(e.inputs[0])
                         : e.op == "matmul" ? client.matmul(e.inputs[0], e.inputs[1])
                                            : client.attention(e.inputs[0], e.inputs[1], e.inputs[2], [&] {
                                                AttentionOptions a;
                                                a.causal = causal;
                                                return a;
                                              }());
    s.latency_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
    if (r.ok()) s.timings = r->timings;
    return r.ok() ? grpc::Status::OK : wire::to_grpc(r.status());
  }
  if (e.op == "softmax") {
    v1::SoftmaxRequest req;
    *req.mutable_x() = tensor_or_handle(e, 0);
    req.set_keep_output(keep);
    if (!e.region.empty()) *req.add_output_shm() = out;
    v1::SoftmaxResponse resp;
    status = client.stub().Softmax(client.make_context(req).get(), req, &resp);
    s.timings = resp.timings();
    if (keep) kept.push_back(resp.y().handle());
  } else if (e.op == "matmul") {
    v1::MatmulRequest req;
    *req.mutable_a() = tensor_or_handle(e, 0);
    *req.mutable_b() = tensor_or_handle(e, 1);
    req.set_keep_output(keep);
    if (!e.region.empty()) *req.add_output_shm() = out;
    v1::MatmulResponse resp;
    status = client.stub().Matmul(client.make_context(req).get(), req, &resp);
    s.timings = resp.timings();
    if (keep) kept.push_back(resp.c().handle());
  } else {
    v1::AttentionRequest req;
    *req.mutable_q() = tensor_or_handle(e, 0);
    *req.mutable_k() = tensor_or_handle(e, 1);
    *req.mutable_v() = tensor_or_handle(e, 2);
    req.set_causal(causal);
    req.set_keep_output(keep);
    if (!e.region.empty()) *req.add_output_shm() = out;
    v1::AttentionResponse resp;
    status = client.stub().Attention(client.make_context(req).get(), req, &resp);
    s.timings = resp.timings();
    if (keep) kept.push_back(resp.o().handle());
  }
  s.latency_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
  for (const auto& h : kept)
    if (status.ok() && !h.empty()) (void)client.delete_tensor(h);
  return status;
}

std::int64_t pct(std::vector<std::int64_t> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

double mean(const std::vector<std::int64_t>& v) {
  double s = 0;
  for (auto x : v) s += static_cast<double>(x);
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}

// Runs `fn(client, entry index, sample) -> status` from `clients` threads for `seconds`.
template <class Fn>
std::vector<Stats> load(const std::string& server, const ClientOptions& opts, int clients, double seconds,
                        std::size_t entries, Fn fn) {
  std::vector<Stats> stats(entries);
  std::mutex mu;
  std::vector<std::thread> threads;
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  for (int c = 0; c < clients; ++c)
    threads.emplace_back([&, c] {
      Client client(server, opts);
      std::vector<Stats> local(entries);
      for (std::size_t i = static_cast<std::size_t>(c); Clock::now() < until; ++i) {
        const std::size_t e = i % entries;
        Sample s;
        const grpc::Status status = fn(client, e, s, c);
        if (status.ok()) local[e].samples.push_back(s);
        else ++local[e].errors[std::to_string(static_cast<int>(status.error_code()))];
      }
      std::lock_guard lock(mu);
      for (std::size_t e = 0; e < entries; ++e) {
        stats[e].samples.insert(stats[e].samples.end(), local[e].samples.begin(), local[e].samples.end());
        for (auto& [k, n] : local[e].errors) stats[e].errors[k] += n;
      }
    });
  for (auto& t : threads) t.join();
  return stats;
}

}  // namespace

int run_bench_rpc(const BenchRpcOptions& o, const ClientOptions& client_options) {
  auto dtype = parse_dtype(o.dtype);
  if (!dtype) {
    std::fprintf(stderr, "attn: --dtype: expected float32, float16 or bfloat16, got \"%s\"\n", o.dtype.c_str());
    return 2;
  }
  const bool cuda_ipc = o.cuda_ipc_device >= 0;
  if (int(o.resident) + int(o.shm) + int(cuda_ipc) > 1) {
    std::fprintf(stderr, "attn: --resident, --shm and --cuda-ipc: expected one of them, got more\n");
    return 2;
  }
  std::mt19937_64 rng(1);
  std::vector<Entry> entries;
  for (const auto& spec : o.mix) {
    auto e = parse_entry(spec, *dtype, rng);
    if (!e.ok()) {
      std::fprintf(stderr, "attn: %s\n", e.status().message().c_str());
      return 2;
    }
    entries.push_back(std::move(e).value());
  }
  Client setup(o.server, client_options);
  if (o.resident)
    for (auto& e : entries)
      for (const auto& t : e.inputs) {
        auto info = setup.put_tensor(t);
        if (!info.ok()) {
          std::fprintf(stderr, "attn: PutTensor: %s\n", info.status().to_string().c_str());
          return 1;
        }
        e.handles.push_back(info->handle());
      }

  // --shm / --cuda-ipc: one region holds every entry's inputs, then each client's outputs.
  SharedMemoryBuffer region;
  CudaRegion device_region;
  if (o.shm || cuda_ipc) {
    std::size_t total = 0;
    for (const auto& e : entries) total += e.request_bytes + e.output_bytes * static_cast<std::size_t>(o.clients);
    if (cuda_ipc) {
      auto made = CudaRegion::create(o.cuda_ipc_device, total);
      if (!made.ok()) {
        std::fprintf(stderr, "attn: %s\n", made.status().to_string().c_str());
        return 1;
      }
      device_region = std::move(made).value();
    } else {
      auto made = SharedMemoryBuffer::create(total);
      if (!made.ok()) {
        std::fprintf(stderr, "attn: --shm: %s\n", made.status().to_string().c_str());
        return 1;
      }
      region = std::move(made).value();
    }
    const std::string name = "bench-rpc-" + std::to_string(::getpid());
    std::int64_t at = 0;
    for (auto& e : entries) {
      e.region = name;
      for (const auto& t : e.inputs) {
        e.input_offsets.push_back(at);
        if (cuda_ipc) {
          if (Status up = device_region.upload(static_cast<std::size_t>(at), t.data(), t.bytes()); !up.ok()) {
            std::fprintf(stderr, "attn: %s\n", up.to_string().c_str());
            return 1;
          }
        } else {
          std::memcpy(static_cast<char*>(region.data()) + at, t.data(), t.bytes());
        }
        at += static_cast<std::int64_t>(t.bytes());
      }
      e.output_offset = at;
      at += static_cast<std::int64_t>(e.output_bytes) * o.clients;
    }
    auto reg = cuda_ipc ? setup.register_cuda_memory(name, device_region.ipc_handle(), o.cuda_ipc_device, 0,
                                                     static_cast<std::int64_t>(total))
                        : setup.register_shared_memory(name, region.key(), 0, static_cast<std::int64_t>(total));
    if (!reg.ok()) {
      std::fprintf(stderr, "attn: RegisterSharedMemory: %s\n", reg.status().to_string().c_str());
      return 1;
    }
  }

  auto ops = o.echo_only ? std::vector<Stats>(entries.size())
                         : load(o.server, client_options, o.clients, o.seconds, entries.size(),
                                [&](Client& c, std::size_t i, Sample& s, int slot) {
                                  return call(c, entries[i], o.causal, slot, s);
                                });
  // The transport baseline: the same payload sizes echoed (a resident run sends no payload).
  std::vector<std::string> payloads;
  // (with --shm or --cuda-ipc the echo still sends the payload inline: the gRPC path the region replaces)
  for (const auto& e : entries) payloads.emplace_back(o.resident ? 0 : e.request_bytes, 'x');
  auto echoes = load(o.server, client_options, o.clients, o.echo_only ? o.seconds : std::max(1.0, o.seconds / 2),
                     entries.size(),
                     [&](Client& c, std::size_t i, Sample& s, int) {
                       v1::EchoRequest req;
                       req.set_payload(payloads[i]);
                       auto ctx = c.make_context(req);
                       v1::EchoResponse resp;
                       const auto start = Clock::now();
                       grpc::Status st = c.stub().Echo(ctx.get(), req, &resp);
                       s.latency_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
                       s.echo_server_ns = resp.server_ns();
                       return st;
                     });
  if (o.resident)
    for (auto& e : entries)
      for (const auto& h : e.handles) (void)setup.delete_tensor(h);
  if (o.shm || cuda_ipc) (void)setup.unregister_shared_memory(entries.front().region);

  std::ostringstream json;
  json << "{\"clients\": " << o.clients << ", \"seconds\": " << o.seconds << ", \"resident\": "
       << (o.resident ? "true" : "false") << ", \"shm\": " << (o.shm ? "true" : "false")
       << ", \"cuda_ipc\": " << (cuda_ipc ? "true" : "false") << ", \"dtype\": \"" << o.dtype << "\", \"entries\": [";
  std::printf("%d clients, %.0f s, %s%s%s\n", o.clients, o.seconds, o.dtype.c_str(), o.resident ? ", resident inputs" : "",
              o.shm ? ", inputs and outputs in shared memory" : cuda_ipc ? ", inputs and outputs in CUDA IPC memory" : "");
  std::printf("%-28s %9s %8s | %9s %9s %9s | %9s %9s %9s %9s | %9s %9s | %6s %6s %6s\n", "op", "payload", "calls/s",
              "p50", "p90", "p99", "queue", "copy", "kernel", "total", "echo p50", "echo srv", "p50/e", "out/e", "kern%");
  for (std::size_t i = 0; i < entries.size(); ++i) {
    std::vector<std::int64_t> lat, queue, copy, kernel, total, outside, elat, esrv;
    for (const auto& s : ops[i].samples) {
      lat.push_back(s.latency_ns);
      queue.push_back(s.timings.queue_ns());
      copy.push_back(s.timings.h2d_ns() + s.timings.d2h_ns());
      kernel.push_back(s.timings.kernel_ns());
      total.push_back(s.timings.total_ns());
      outside.push_back(s.timings.total_ns() - s.timings.kernel_ns());
    }
    for (const auto& s : echoes[i].samples) elat.push_back(s.latency_ns), esrv.push_back(s.echo_server_ns);
    const double rate = static_cast<double>(ops[i].samples.size()) / o.seconds;
    const double p50_ratio = pct(elat, 0.5) ? static_cast<double>(pct(lat, 0.5)) / static_cast<double>(pct(elat, 0.5)) : 0;
    const double outside_ratio = mean(esrv) > 0 ? mean(outside) / mean(esrv) : 0;
    const double kernel_share = mean(total) > 0 ? mean(kernel) / mean(total) : 0;
    auto us = [](double ns) { return ns / 1e3; };
    std::printf("%-28s %9zu %8.0f | %8.1fu %8.1fu %8.1fu | %8.1fu %8.1fu %8.1fu %8.1fu | %8.1fu %8.1fu | %6.2f %6.2f %5.1f%%\n",
                o.mix[i].c_str(), entries[i].request_bytes, rate, us(pct(lat, 0.5)), us(pct(lat, 0.9)),
                us(pct(lat, 0.99)), us(mean(queue)), us(mean(copy)), us(mean(kernel)), us(mean(total)),
                us(pct(elat, 0.5)), us(mean(esrv)), p50_ratio, outside_ratio, 100 * kernel_share);
    for (const auto& [code, n] : ops[i].errors) std::printf("  errors with gRPC code %s: %ld\n", code.c_str(), n);
    json << (i ? ", " : "") << "{\"op\": \"" << o.mix[i] << "\", \"payload_bytes\": " << entries[i].request_bytes
         << ", \"calls\": " << ops[i].samples.size() << ", \"calls_per_s\": " << rate
         << ", \"p50_ns\": " << pct(lat, 0.5) << ", \"p90_ns\": " << pct(lat, 0.9) << ", \"p99_ns\": " << pct(lat, 0.99)
         << ", \"mean_queue_ns\": " << mean(queue) << ", \"mean_copy_ns\": " << mean(copy)
         << ", \"mean_kernel_ns\": " << mean(kernel) << ", \"mean_total_ns\": " << mean(total)
         << ", \"mean_outside_kernel_ns\": " << mean(outside) << ", \"echo_calls\": " << echoes[i].samples.size() << ", \"echo_p50_ns\": " << pct(elat, 0.5)
         << ", \"echo_p90_ns\": " << pct(elat, 0.9) << ", \"echo_p99_ns\": " << pct(elat, 0.99)
         << ", \"echo_mean_server_ns\": " << mean(esrv) << ", \"p50_over_echo_p50\": " << p50_ratio
         << ", \"outside_kernel_over_echo_server\": " << outside_ratio << ", \"kernel_share_of_server_time\": "
         << kernel_share << ", \"errors\": " << [&] {
              long n = 0;
              for (const auto& [c, k] : ops[i].errors) n += k;
              return n;
            }() << "}";
  }
  json << "]}\n";
  std::printf("p50/e: the op's p50 latency over the echo's; out/e: the server's time outside the kernel over "
              "the echo handler's; kern%%: kernel share of the server's time\n");
  if (!o.json_path.empty()) std::ofstream(o.json_path) << json.str();
  return 0;
}

}  // namespace attn::cli
