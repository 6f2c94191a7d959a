#include "report.h"

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace attn::cli::decode_bench {
namespace {

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

std::string ms(double ns) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f ms", ns / 1e6);
  return buf;
}

// The timed calls' figures, a column each, and what they add up to.
struct CallColumns {
  std::vector<std::int64_t> latency, kernel, server, queue, copy, batched;
  // The server's host stages (Timings' parse .. finish): where its time outside the kernel goes.
  std::vector<std::int64_t> receive, parse, prepare, issue, wait, finish;
  double gbps = 0;  // in the kernel
};

CallColumns call_columns(const std::vector<CallSample>& calls) {
  CallColumns c;
  // A merged launch's kernel time comes with each of its calls, and each call's bytes are its
  // share: the launch's bytes over its time is sum(bytes) / sum(kernel / calls in the launch).
  double kv_bytes = 0, launch_ns = 0;
  for (const auto& x : calls) {
    c.latency.push_back(x.latency_ns);
    c.kernel.push_back(x.timings.kernel_ns());
    c.server.push_back(x.timings.total_ns());
    c.queue.push_back(x.timings.queue_ns());
    c.copy.push_back(x.timings.h2d_ns() + x.timings.d2h_ns());
    c.batched.push_back(std::max(1, x.timings.batched_calls()));
    c.receive.push_back(x.timings.receive_ns());
    c.parse.push_back(x.timings.parse_ns());
    c.prepare.push_back(x.timings.prepare_ns());
    c.issue.push_back(x.timings.issue_ns());
    c.wait.push_back(x.timings.wait_ns());
    c.finish.push_back(x.timings.finish_ns());
    kv_bytes += static_cast<double>(x.timings.bytes());
    launch_ns +=
        static_cast<double>(x.timings.kernel_ns()) / std::max(1, x.timings.batched_calls());
  }
  c.gbps = launch_ns > 0 ? kv_bytes / launch_ns : 0;
  return c;
}

// The figures the report says, derived from the measurements.
struct Figures {
  CallColumns calls;
  double steps_per_s;   // steps of each stream: each sequence advances once per step of its stream
  double kernel_share;  // of a step's time seen here
  std::string kernel_name, device_name;
};

Figures figures(const DecodeBenchOptions& o, const Samples& d) {
  const double timed_s = std::chrono::duration<double>(d.end - d.start).count();
  Figures f;
  f.calls = call_columns(d.calls);
  f.steps_per_s = o.steps / timed_s;
  f.kernel_share = mean(d.step_ns) > 0 ? mean(d.step_kernel_ns) / mean(d.step_ns) : 0;
  f.kernel_name = d.calls.back().timings.kernel();
  f.device_name = d.calls.back().timings.device();
  return f;
}

// How the cache stores K/V, as the server made it: "float8_e4m3" (--fp8), or the dtype.
bool fp8_storage(const Measured& m) {
  return m.cache.config().kv_storage() == v1::D_TYPE_FLOAT8_E4M3;
}
std::string kv_storage(const DecodeBenchOptions& o, const Measured& m) {
  return fp8_storage(m) ? "float8_e4m3" : o.dtype;
}

// Where decode's tensors travelled: "inline", "shm" or "cuda-ipc".
std::string transport(const DecodeBenchOptions& o) {
  return o.shm ? "shm" : o.cuda_ipc_device >= 0 ? "cuda-ipc" : "inline";
}

std::string json_record(const DecodeBenchOptions& o, const Workload& w, const Measured& m,
                        const Figures& f) {
  const Samples& d = m.decode;
  const CallColumns& c = f.calls;
  std::ostringstream json;
  json.precision(10);
  json << "{\"cache\": \"" << m.cache.handle() << "\", \"replica\": \"" << m.cache.replica()
       << "\", \"device\": \"" << m.cache.device() << "\", \"kernel\": \"" << f.kernel_name
       << "\", \"dtype\": \"" << o.dtype << "\", \"kv_storage\": \"" << kv_storage(o, m)
       << "\", \"seqs\": " << o.seqs << ", \"context\": \"" << o.context
       << "\", \"prompt_tokens\": " << w.prompt_tokens << ", \"layers\": " << o.layers
       << ", \"q_heads\": " << o.q_heads << ", \"kv_heads\": " << o.kv_heads
       << ", \"head_dim\": " << o.head_dim << ", \"page_size\": " << w.page
       << ", \"cache_bytes\": " << m.cache_bytes << ", \"prefill_calls\": " << m.prefill.calls
       << ", \"prefill_ns\": " << m.prefill.ns << ", \"prefill_kernel_ns\": " << m.prefill.kernel_ns
       << ", \"steps\": " << o.steps << ", \"warmup\": " << o.warmup
       << ", \"clients\": " << o.clients << ", \"transport\": \"" << transport(o)
       << "\", \"steps_per_s\": " << f.steps_per_s
       << ", \"sequence_steps_per_s\": " << f.steps_per_s * o.seqs
       << ", \"step_p50_ns\": " << pct(d.step_ns, 0.5)
       << ", \"step_p99_ns\": " << pct(d.step_ns, 0.99)
       << ", \"step_mean_kernel_ns\": " << mean(d.step_kernel_ns)
       << ", \"step_mean_server_ns\": " << mean(d.step_server_ns)
       << ", \"call_p50_ns\": " << pct(c.latency, 0.5)
       << ", \"call_p99_ns\": " << pct(c.latency, 0.99)
       << ", \"call_mean_kernel_ns\": " << mean(c.kernel)
       << ", \"call_mean_server_ns\": " << mean(c.server)
       << ", \"call_mean_queue_ns\": " << mean(c.queue)
       << ", \"call_mean_copy_ns\": " << mean(c.copy)
       << ", \"call_mean_receive_ns\": " << mean(c.receive)
       << ", \"call_mean_parse_ns\": " << mean(c.parse)
       << ", \"call_mean_prepare_ns\": " << mean(c.prepare)
       << ", \"call_mean_issue_ns\": " << mean(c.issue)
       << ", \"call_mean_wait_ns\": " << mean(c.wait)
       << ", \"call_mean_finish_ns\": " << mean(c.finish)
       << ", \"call_mean_batched_calls\": " << mean(c.batched) << ", \"kernel_gbps\": " << c.gbps
       << ", \"kernel_share_of_step\": " << f.kernel_share << "}\n";
  return json.str();
}

void print_table(const DecodeBenchOptions& o, const Workload& w, const Measured& m,
                 const Figures& f) {
  const Samples& d = m.decode;
  const CallColumns& c = f.calls;
  std::printf("cache %s on %s (%s), %s%s, page %lld, %.1f MiB\n", m.cache.handle().c_str(),
              m.cache.replica().c_str(), m.cache.device().c_str(), o.dtype.c_str(),
              fp8_storage(m) ? ", float8_e4m3 cache" : "", static_cast<long long>(w.page),
              m.cache_bytes / 1048576.0);
  std::printf(
      "model: %d layers, Hq %d / Hkv %d / D %d; %d sequences, context %s (%lld prompt tokens)\n",
      o.layers, o.q_heads, o.kv_heads, o.head_dim, o.seqs, o.context.c_str(),
      static_cast<long long>(w.prompt_tokens));
  std::printf("prefill: %lld calls, %.3f s, %.0f tokens/s over all layers (kernel %.3f s)\n",
              static_cast<long long>(m.prefill.calls), m.prefill.ns / 1e9,
              w.prompt_tokens / (m.prefill.ns / 1e9), m.prefill.kernel_ns / 1e9);
  std::printf(
      "decode: %d steps x %d layers after %d warm-up steps, %d stream%s, kernel %s, tensors %s\n",
      o.steps, o.layers, o.warmup, o.clients,
      o.clients == 1 ? "" : "s (sequences split among them)", f.kernel_name.c_str(),
      transport(o).c_str());
  std::printf("  %.2f steps/s, %.1f sequence-steps/s (tokens/s)\n", f.steps_per_s,
              f.steps_per_s * o.seqs);
  std::printf(
      "  per step: p50 %s  p99 %s | server: kernel %s, total %s (mean) | kernel share %.1f%%\n",
      ms(pct(d.step_ns, 0.5)).c_str(), ms(pct(d.step_ns, 0.99)).c_str(),
      ms(mean(d.step_kernel_ns)).c_str(), ms(mean(d.step_server_ns)).c_str(), 100 * f.kernel_share);
  std::printf(
      "  per call: p50 %s  p99 %s | server: queue %s, copies %s, kernel %s, total %s (mean) | "
      "%.1f GB/s in the kernel; %.2f calls per launch\n",
      ms(pct(c.latency, 0.5)).c_str(), ms(pct(c.latency, 0.99)).c_str(), ms(mean(c.queue)).c_str(),
      ms(mean(c.copy)).c_str(), ms(mean(c.kernel)).c_str(), ms(mean(c.server)).c_str(), c.gbps,
      mean(c.batched));
  std::printf(
      "  server's time per call (mean): receive %s, parse %s, queue %s, prepare %s, issue %s, "
      "wait %s, finish %s\n",
      ms(mean(c.receive)).c_str(), ms(mean(c.parse)).c_str(), ms(mean(c.queue)).c_str(),
      ms(mean(c.prepare)).c_str(), ms(mean(c.issue)).c_str(), ms(mean(c.wait)).c_str(),
      ms(mean(c.finish)).c_str());
  std::printf("  device: %s\n", f.device_name.c_str());
}

}  // namespace

void report(const DecodeBenchOptions& o, const Workload& w, const Measured& m) {
  const Figures f = figures(o, m.decode);
  const std::string json = json_record(o, w, m, f);
  if (!o.json_path.empty()) std::ofstream(o.json_path) << json;
  if (o.json)
    std::fputs(json.c_str(), stdout);
  else
    print_table(o, w, m, f);
}

}  // namespace attn::cli::decode_bench
