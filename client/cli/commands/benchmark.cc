// `attn benchmark OP SHAPE`: the server times its variants on its own device (Benchmark RPC).
#include <cstdio>
#include <memory>
#include <vector>

#include "attn/wire.h"
#include "commands.h"
#include "op_inputs.h"
#include "output.h"

namespace attn::cli {
namespace {

struct BenchmarkFlags {
  std::string op, shape, dtype = "bfloat16";
  std::vector<std::string> kernels;
  std::int64_t kv_heads = 0, kv_len = 0;
  int iterations = 0;
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;
};

Result<v1::BenchmarkRequest> benchmark_request(const BenchmarkFlags& f) {
  v1::BenchmarkRequest req;
  req.set_op(f.op);
  auto dt = parse_dtype(f.dtype);
  if (!dt) return invalid_argument("--dtype: expected float32, float16 or bfloat16");
  req.set_dtype(wire::to_proto(*dt));
  ATTN_ASSIGN_OR_RETURN(shape, parse_shape(f.shape, "shape"));
  for (auto d : shape) req.add_shape(d);
  req.set_kv_heads(f.kv_heads);
  req.set_kv_len(f.kv_len);
  req.set_causal(f.causal);
  if (f.window_left != -1) req.set_window_left(f.window_left);
  if (f.window_right != -1) req.set_window_right(f.window_right);
  req.set_softcap(f.softcap);
  req.set_iterations(f.iterations);
  for (const auto& k : f.kernels) req.add_kernels(k);
  return req;
}

void print_benchmark_table(const v1::BenchmarkResponse& r) {
  std::printf("%-28s %-24s %11s %11s %11s %10s %10s %8s %s\n", "variant", "device", "median", "p10",
              "p90", "TFLOP/s", "GB/s", "error", "");
  for (const auto& x : r.results())
    std::printf("%-28s %-24s %11s %11s %11s %10.2f %10.1f %8.1e %s\n", x.kernel().c_str(),
                x.device().substr(0, 24).c_str(), format_ns(x.median_ns()).c_str(),
                format_ns(x.p10_ns()).c_str(), format_ns(x.p90_ns()).c_str(), x.tflops(), x.gbps(),
                x.error(), x.correct() ? "ok" : ("WRONG " + x.message()).c_str());
}

int run_benchmark(const BenchmarkFlags& f, const Session& session) {
  auto req = benchmark_request(f);
  if (!req.ok()) return fail(req.status());
  auto r = session.client.benchmark(*req);
  if (!r.ok()) return call_failed(r.status());
  if (session.flags.json) return print_json(*r);
  print_benchmark_table(*r);
  return 0;
}

}  // namespace

Subcommand add_benchmark(CLI::App& app) {
  auto f = std::make_shared<BenchmarkFlags>();
  auto* cmd =
      app.add_subcommand("benchmark", "time variants on the server's device (Benchmark RPC)");
  cmd->add_option("op", f->op, "matmul, softmax or attention")->required();
  cmd->add_option("shape", f->shape, "M,K,N | ROWS,COLS | B,Hq,Sq,D")->required();
  cmd->add_option("--dtype", f->dtype, "float32, float16 or bfloat16")->capture_default_str();
  cmd->add_option("--kernel", f->kernels, "variants to time (default: all that fit)");
  cmd->add_option("--kv-heads", f->kv_heads, "attention: key/value heads (default Hq)");
  cmd->add_option("--kv-len", f->kv_len, "attention: key/value length (default Sq)");
  cmd->add_flag("--causal", f->causal, "attention: causal");
  cmd->add_option("--window-left", f->window_left,
                  "attention: sliding window, left side (-1: unbounded)");
  cmd->add_option("--window-right", f->window_right,
                  "attention: sliding window, right side (-1: unbounded)");
  cmd->add_option("--softcap", f->softcap, "attention: soft-cap the scores (0: none)");
  cmd->add_option("--iterations", f->iterations, "timed runs per variant (default 20)");
  return {cmd, [f](const Session& session) { return run_benchmark(*f, session); }};
}

}  // namespace attn::cli
