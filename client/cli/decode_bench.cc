#include "decode_bench.h"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>

#include "attn/wire.h"

namespace attn::cli {
namespace {

using Clock = std::chrono::steady_clock;

std::int64_t since_ns(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
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

// "N" or "MIN:MAX" (uniform, from `rng`), one length per sequence.
Result<std::vector<std::int64_t>> context_lengths(const std::string& spec, int seqs, std::mt19937_64& rng) {
  std::int64_t lo = 0, hi = 0;
  try {
    std::size_t used = 0;
    const auto colon = spec.find(':');
    lo = std::stoll(spec.substr(0, colon), &used);
    if (used != spec.substr(0, colon).size()) throw std::invalid_argument(spec);
    hi = lo;
    if (colon != std::string::npos) {
      hi = std::stoll(spec.substr(colon + 1), &used);
      if (used != spec.size() - colon - 1) throw std::invalid_argument(spec);
    }
  } catch (const std::exception&) {
    return invalid_argument("--context: expected N or MIN:MAX, got \"" + spec + "\"");
  }
  if (lo < 1 || hi < lo) return invalid_argument("--context: expected 1 <= MIN <= MAX, got \"" + spec + "\"");
  std::uniform_int_distribution<std::int64_t> dist(lo, hi);
  std::vector<std::int64_t> lens(static_cast<std::size_t>(seqs));
  for (auto& n : lens) n = dist(rng);
  return lens;
}

// `rows` rows of `row_elements` random values in `dtype`, as wire bytes: a random block tiled
// (what the values are does not change the work).
std::string random_rows(DType dtype, std::int64_t rows, std::int64_t row_elements, std::mt19937_64& rng) {
  const std::int64_t block = std::min<std::int64_t>(rows * row_elements, 1 << 16);
  Tensor t(dtype, {block});
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (std::int64_t i = 0; i < block; ++i) t.set(static_cast<std::size_t>(i), dist(rng));
  std::string out(static_cast<std::size_t>(rows * row_elements) * element_size(dtype), '\0');
  for (std::size_t off = 0; off < out.size(); off += t.bytes())
    std::memcpy(out.data() + off, t.data(), std::min(t.bytes(), out.size() - off));
  return out;
}

void set_tensor(v1::Tensor* t, DType dtype, std::int64_t rows, std::int64_t heads, std::int64_t dim,
                const std::string& pool) {
  t->set_dtype(wire::to_proto(dtype));
  t->clear_shape();
  t->add_shape(rows);
  t->add_shape(heads);
  t->add_shape(dim);
  t->set_data(pool.data(), static_cast<std::size_t>(rows * heads * dim) * element_size(dtype));
}

std::string ms(double ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f ms", ns / 1e6);
  return buf;
}

struct CallSample {
  std::int64_t latency_ns;
  v1::Timings timings;
};

}  // namespace

int run_decode_bench(const DecodeBenchOptions& o, Client& client) {
  auto fail = [](const std::string& what, const Status& s) {
    std::fprintf(stderr, "attn: decode-bench: %s: %s\n", what.c_str(), s.to_string().c_str());
    return 1;
  };
  const auto dtype = parse_dtype(o.dtype);
  if (!dtype) return fail("--dtype", invalid_argument("expected float32, float16 or bfloat16, got " + o.dtype));
  if (o.seqs < 1 || o.steps < 1 || o.warmup < 0 || o.layers < 1 || o.q_heads < 1 || o.kv_heads < 1 ||
      o.head_dim < 1 || o.prefill_chunk < 1)
    return fail("options", invalid_argument("--seqs, --steps, --layers, the heads, --head-dim and "
                                            "--prefill-chunk must be >= 1, --warmup >= 0"));
  if (o.clients < 1 || o.clients > o.seqs)
    return fail("--clients", invalid_argument("expected 1 to --seqs (" + std::to_string(o.seqs) + ") streams, got " +
                                              std::to_string(o.clients)));
  std::mt19937_64 rng(o.seed);
  auto lens = context_lengths(o.context, o.seqs, rng);
  if (!lens.ok()) return fail("options", lens.status());

  const std::int64_t decoded = o.warmup + o.steps;
  std::int64_t capacity = 0, prompt_tokens = 0;
  const std::int64_t page = o.page_size > 0 ? o.page_size : 16;
  for (auto n : *lens) capacity += (n + decoded + page - 1) / page * page, prompt_tokens += n;
  v1::KvCacheConfig config;
  config.set_layers(o.layers);
  config.set_kv_heads(o.kv_heads);
  config.set_head_dim(o.head_dim);
  config.set_dtype(wire::to_proto(*dtype));
  config.set_page_size(o.page_size);
  config.set_capacity_tokens(capacity);
  auto info = client.create_kv_cache(config, 0, o.device);
  if (!info.ok()) return fail("CreateKvCache", info.status());
  const std::string cache = info->handle();
  auto finish = [&](int rc) {
    if (!o.keep) {
      auto freed = client.delete_kv_cache(cache);
      if (!freed.ok()) std::fprintf(stderr, "attn: decode-bench: DeleteKvCache: %s\n", freed.status().to_string().c_str());
    }
    return rc;
  };
  auto stub = client.kv_stub(cache);
  if (!stub.ok()) return finish(fail("the cache's replica", stub.status()));

  std::vector<std::string> ids;
  for (int i = 0; i < o.seqs; ++i) ids.push_back(std::string(1, 's').append(std::to_string(i)));
  const std::int64_t pool_rows = std::max<std::int64_t>(std::min(o.prefill_chunk, prompt_tokens), o.seqs);
  const std::string q_pool = random_rows(*dtype, pool_rows, std::int64_t{o.q_heads} * o.head_dim, rng);
  const std::string kv_pool = random_rows(*dtype, pool_rows, std::int64_t{o.kv_heads} * o.head_dim, rng);

  // Prefill: chunks of at most prefill_chunk tokens, each sent to every layer in turn (as a model
  // runs a chunk through its layers); a long prompt spans several chunks.
  const auto prefill_start = Clock::now();
  std::int64_t prefill_calls = 0, prefill_kernel_ns = 0;
  for (std::size_t seq = 0, offset = 0; seq < lens->size();) {
    v1::PrefillRequest req;
    req.set_cache(cache);
    std::int64_t rows = 0;
    while (seq < lens->size() && rows < o.prefill_chunk) {
      const std::int64_t take = std::min<std::int64_t>((*lens)[seq] - static_cast<std::int64_t>(offset),
                                                       o.prefill_chunk - rows);
      req.add_sequence_ids(ids[seq]);
      req.add_lens(take);
      rows += take;
      offset += static_cast<std::size_t>(take);
      if (static_cast<std::int64_t>(offset) == (*lens)[seq]) ++seq, offset = 0;
    }
    set_tensor(req.mutable_q(), *dtype, rows, o.q_heads, o.head_dim, q_pool);
    set_tensor(req.mutable_k(), *dtype, rows, o.kv_heads, o.head_dim, kv_pool);
    set_tensor(req.mutable_v(), *dtype, rows, o.kv_heads, o.head_dim, kv_pool);
    for (int layer = 0; layer < o.layers; ++layer) {
      req.set_layer(layer);
      v1::PrefillResponse resp;
      auto ctx = client.make_context(req);
      Status s = wire::from_grpc((*stub)->Prefill(ctx.get(), req, &resp));
      if (!s.ok()) return finish(fail("Prefill", s));
      ++prefill_calls;
      prefill_kernel_ns += resp.timings().kernel_ns();
    }
  }
  const std::int64_t prefill_ns = since_ns(prefill_start);

  // Decode: `clients` streams, each with its own sequences (round robin), each sending one Decode
  // per layer per step over them; the same request every time (the values do not change the
  // work). Concurrent streams' calls on one layer may share a launch (the server's batching).
  struct Stream {
    v1::DecodeRequest req;
    std::vector<CallSample> calls;
    std::vector<std::int64_t> step_ns, step_kernel_ns, step_server_ns;
    Clock::time_point start, end;
    Status status;
  };
  std::vector<Stream> streams(static_cast<std::size_t>(o.clients));
  for (int c = 0; c < o.clients; ++c) {
    auto& req = streams[static_cast<std::size_t>(c)].req;
    req.set_cache(cache);
    for (int i = c; i < o.seqs; i += o.clients) req.add_sequence_ids(ids[static_cast<std::size_t>(i)]);
    const int n = req.sequence_ids_size();
    set_tensor(req.mutable_q(), *dtype, n, o.q_heads, o.head_dim, q_pool);
    set_tensor(req.mutable_k_new(), *dtype, n, o.kv_heads, o.head_dim, kv_pool);
    set_tensor(req.mutable_v_new(), *dtype, n, o.kv_heads, o.head_dim, kv_pool);
    req.set_kernel(o.kernel);
  }
  std::barrier timed(o.clients);  // every stream starts its timed steps together
  std::atomic<bool> failed{false};
  auto run_stream = [&](Stream& s) {
    bool joined = false;
    for (std::int64_t step = 0; step < decoded && !failed; ++step) {
      if (step == o.warmup) {
        timed.arrive_and_wait();
        joined = true;
        s.start = Clock::now();
      }
      const auto step_start = Clock::now();
      std::int64_t kernel = 0, server = 0;
      for (int layer = 0; layer < o.layers; ++layer) {
        s.req.set_layer(layer);
        v1::DecodeResponse resp;
        auto ctx = client.make_context(s.req);
        const auto call_start = Clock::now();
        Status st = wire::from_grpc((*stub)->Decode(ctx.get(), s.req, &resp));
        const std::int64_t latency = since_ns(call_start);
        if (!st.ok()) {
          char where[64];
          std::snprintf(where, sizeof where, "Decode (layer %d, step %lld): ", layer, static_cast<long long>(step));
          s.status = Status(st.code(), where + st.message());
          failed = true;
          break;
        }
        if (step < o.warmup) continue;
        s.calls.push_back({latency, resp.timings()});
        kernel += resp.timings().kernel_ns();
        server += resp.timings().total_ns();
      }
      if (step < o.warmup || !s.status.ok()) continue;
      s.step_ns.push_back(since_ns(step_start));
      s.step_kernel_ns.push_back(kernel);
      s.step_server_ns.push_back(server);
    }
    s.end = Clock::now();
    if (!joined) timed.arrive_and_drop();  // failed during the warm-up: the others go on without it
  };
  {
    std::vector<std::thread> threads;
    for (auto& s : streams) threads.emplace_back(run_stream, std::ref(s));
    for (auto& t : threads) t.join();
  }
  for (const auto& s : streams)
    if (!s.status.ok()) return finish(fail("Decode", s.status));

  std::vector<CallSample> calls;
  std::vector<std::int64_t> step_ns, step_kernel_ns, step_server_ns;
  Clock::time_point timed_start = streams[0].start, timed_end = streams[0].end;
  for (const auto& s : streams) {
    calls.insert(calls.end(), s.calls.begin(), s.calls.end());
    step_ns.insert(step_ns.end(), s.step_ns.begin(), s.step_ns.end());
    step_kernel_ns.insert(step_kernel_ns.end(), s.step_kernel_ns.begin(), s.step_kernel_ns.end());
    step_server_ns.insert(step_server_ns.end(), s.step_server_ns.begin(), s.step_server_ns.end());
    timed_start = std::min(timed_start, s.start);
    timed_end = std::max(timed_end, s.end);
  }
  const double timed_s = std::chrono::duration<double>(timed_end - timed_start).count();
  const std::string kernel_name = calls.back().timings.kernel(), device_name = calls.back().timings.device();

  std::vector<std::int64_t> call_ns, call_kernel, call_server, call_queue, call_copy, call_batched;
  // A merged launch's kernel time comes with each of its calls, and each call's bytes are its
  // share: the launch's bytes over its time is sum(bytes) / sum(kernel / calls in the launch).
  double kv_bytes = 0, launch_ns = 0;
  for (const auto& c : calls) {
    call_ns.push_back(c.latency_ns);
    call_kernel.push_back(c.timings.kernel_ns());
    call_server.push_back(c.timings.total_ns());
    call_queue.push_back(c.timings.queue_ns());
    call_copy.push_back(c.timings.h2d_ns() + c.timings.d2h_ns());
    call_batched.push_back(std::max(1, c.timings.batched_calls()));
    kv_bytes += static_cast<double>(c.timings.bytes());
    launch_ns += static_cast<double>(c.timings.kernel_ns()) / std::max(1, c.timings.batched_calls());
  }
  // Steps of each stream: each sequence advances once per step of its stream.
  const double steps_per_s = o.steps / timed_s;
  const double gbps = launch_ns > 0 ? kv_bytes / launch_ns : 0;
  const double kernel_share = mean(step_ns) > 0 ? mean(step_kernel_ns) / mean(step_ns) : 0;
  auto described = client.describe_kv_cache(cache);
  const std::int64_t cache_bytes = described.ok() ? described->bytes() : info->bytes();

  std::ostringstream json;
  json.precision(10);
  json << "{\"cache\": \"" << cache << "\", \"replica\": \"" << info->replica() << "\", \"device\": \""
       << info->device() << "\", \"kernel\": \"" << kernel_name << "\", \"dtype\": \"" << o.dtype
       << "\", \"seqs\": " << o.seqs << ", \"context\": \"" << o.context << "\", \"prompt_tokens\": " << prompt_tokens
       << ", \"layers\": " << o.layers << ", \"q_heads\": " << o.q_heads << ", \"kv_heads\": " << o.kv_heads
       << ", \"head_dim\": " << o.head_dim << ", \"page_size\": " << page << ", \"cache_bytes\": " << cache_bytes
       << ", \"prefill_calls\": " << prefill_calls << ", \"prefill_ns\": " << prefill_ns
       << ", \"prefill_kernel_ns\": " << prefill_kernel_ns << ", \"steps\": " << o.steps << ", \"warmup\": " << o.warmup
       << ", \"clients\": " << o.clients << ", \"steps_per_s\": " << steps_per_s << ", \"sequence_steps_per_s\": " << steps_per_s * o.seqs
       << ", \"step_p50_ns\": " << pct(step_ns, 0.5) << ", \"step_p99_ns\": " << pct(step_ns, 0.99)
       << ", \"step_mean_kernel_ns\": " << mean(step_kernel_ns) << ", \"step_mean_server_ns\": " << mean(step_server_ns)
       << ", \"call_p50_ns\": " << pct(call_ns, 0.5) << ", \"call_p99_ns\": " << pct(call_ns, 0.99)
       << ", \"call_mean_kernel_ns\": " << mean(call_kernel) << ", \"call_mean_server_ns\": " << mean(call_server)
       << ", \"call_mean_queue_ns\": " << mean(call_queue) << ", \"call_mean_copy_ns\": " << mean(call_copy)
       << ", \"call_mean_batched_calls\": " << mean(call_batched) << ", \"kernel_gbps\": " << gbps << ", \"kernel_share_of_step\": " << kernel_share << "}\n";
  if (!o.json_path.empty()) std::ofstream(o.json_path) << json.str();
  if (o.json) {
    std::fputs(json.str().c_str(), stdout);
    return finish(0);
  }
  std::printf("cache %s on %s (%s), %s, page %lld, %.1f MiB\n", cache.c_str(), info->replica().c_str(),
              info->device().c_str(), o.dtype.c_str(), static_cast<long long>(page), cache_bytes / 1048576.0);
  std::printf("model: %d layers, Hq %d / Hkv %d / D %d; %d sequences, context %s (%lld prompt tokens)\n", o.layers,
              o.q_heads, o.kv_heads, o.head_dim, o.seqs, o.context.c_str(), static_cast<long long>(prompt_tokens));
  std::printf("prefill: %lld calls, %.3f s, %.0f tokens/s over all layers (kernel %.3f s)\n",
              static_cast<long long>(prefill_calls), prefill_ns / 1e9, prompt_tokens / (prefill_ns / 1e9),
              prefill_kernel_ns / 1e9);
  std::printf("decode: %d steps x %d layers after %d warm-up steps, %d stream%s, kernel %s\n", o.steps, o.layers,
              o.warmup, o.clients, o.clients == 1 ? "" : "s (sequences split among them)", kernel_name.c_str());
  std::printf("  %.2f steps/s, %.1f sequence-steps/s (tokens/s)\n", steps_per_s, steps_per_s * o.seqs);
  std::printf("  per step: p50 %s  p99 %s | server: kernel %s, total %s (mean) | kernel share %.1f%%\n",
              ms(pct(step_ns, 0.5)).c_str(), ms(pct(step_ns, 0.99)).c_str(), ms(mean(step_kernel_ns)).c_str(),
              ms(mean(step_server_ns)).c_str(), 100 * kernel_share);
  std::printf("  per call: p50 %s  p99 %s | server: queue %s, copies %s, kernel %s, total %s (mean) | "
              "%.1f GB/s in the kernel; %.2f calls per launch\n",
              ms(pct(call_ns, 0.5)).c_str(), ms(pct(call_ns, 0.99)).c_str(), ms(mean(call_queue)).c_str(),
              ms(mean(call_copy)).c_str(), ms(mean(call_kernel)).c_str(), ms(mean(call_server)).c_str(), gbps,
              mean(call_batched));
  std::printf("  device: %s\n", device_name.c_str());
  return finish(0);
}

}  // namespace attn::cli
