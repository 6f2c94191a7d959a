// attn-cpu-bench: the CPU variants of matmul and attention timed in-process through the CPU
// executor (the server's path, no RPC): warm-up, then the median of >= --min-runs runs lasting
// >= --min-seconds together. Each output is first checked at sampled elements (matmul) or rows
// (attention) against float64 sums of the same inputs. The hand-written variants (priority 0, far
// slower) are timed at float32 only, 3 runs. Prints a table; --json writes one object per line.
// bench/cpu_bench.py runs it next to numpy's OpenBLAS for the ratios.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>

#include "attn/executor.h"
#include "attn/hash_uniform.h"

namespace {

using namespace attn;

struct Row {
  std::string op, variant, dtype, shape;
  bool causal = false;
  double ms = 0, best_ms = 0, gflops = 0, error = 0;
  int runs = 0;
};

Tensor random_input(DType t, Shape shape, std::uint64_t seed) {
  Tensor x(t, std::move(shape));
  for (std::size_t i = 0; i < static_cast<std::size_t>(x.numel()); ++i)
    x.set(i, uniform_from_hash(seed, i));
  return x;
}

void poison(Tensor& t) {
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); ++i) t.set(i, NAN);
}

struct Timing {
  double median_ms = 0, best_ms = 0;
  int runs = 0;
};

template <class Fn>
Timing time_runs(Fn&& run_once, int min_runs, double min_seconds) {
  run_once();  // warm-up: page faults, OpenBLAS buffers, thread pools
  std::vector<double> ms;
  double total = 0;
  while (static_cast<int>(ms.size()) < min_runs || total < min_seconds * 1e3) {
    const double t = run_once();
    ms.push_back(t);
    total += t;
  }
  std::sort(ms.begin(), ms.end());
  return {ms[ms.size() / 2], ms.front(), static_cast<int>(ms.size())};
}

// The largest |got - want| over sampled elements, relative to the samples' RMS.
double matmul_sample_error(const MatmulArgs& a, const MatmulDims& d, const Tensor& c) {
  std::mt19937_64 rng(7);
  double max_diff = 0, sum_sq = 0;
  const int samples = 48;
  for (int s = 0; s < samples; ++s) {
    const std::int64_t bi = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.batch));
    const std::int64_t i = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.m));
    const std::int64_t j = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.n));
    double want = 0;
    for (std::int64_t kk = 0; kk < d.k; ++kk) {
      const std::int64_t ai = bi * d.m * d.k + (a.transpose_a ? kk * d.m + i : i * d.k + kk);
      const std::int64_t bj =
          (d.b_batched ? bi * d.k * d.n : 0) + (a.transpose_b ? j * d.k + kk : kk * d.n + j);
      want +=
          static_cast<double>(load_as_float(a.a.data, a.a.dtype, static_cast<std::size_t>(ai))) *
          load_as_float(a.b.data, a.b.dtype, static_cast<std::size_t>(bj));
    }
    const double got = c.get(static_cast<std::size_t>((bi * d.m + i) * d.n + j));
    max_diff = std::max(max_diff, std::isfinite(got) ? std::abs(got - want) : INFINITY);
    sum_sq += want * want;
  }
  return max_diff / std::sqrt(sum_sq / samples);
}

double attention_sample_error(const AttentionArgs& a, const AttentionDims& d, const Tensor& o) {
  std::mt19937_64 rng(11);
  double max_diff = 0, sum_sq = 0;
  int n = 0;
  for (int s = 0; s < 6; ++s) {
    const std::int64_t bh =
        static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.batch * d.heads_q));
    const std::int64_t i = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.len_q));
    const std::int64_t kvh =
        (bh / d.heads_q) * d.heads_kv + (bh % d.heads_q) / (d.heads_q / d.heads_kv);
    auto at = [](const TensorView& t, std::int64_t x) {
      return static_cast<double>(load_as_float(t.data, t.dtype, static_cast<std::size_t>(x)));
    };
    std::vector<double> sc(static_cast<std::size_t>(d.len_kv), -INFINITY);
    double mx = -INFINITY;
    for (std::int64_t j = 0; j < d.len_kv; ++j) {
      if (a.causal && !causal_visible(i, j, d.len_q, d.len_kv)) continue;
      double dot = 0;
      for (std::int64_t c = 0; c < d.head_dim; ++c)
        dot += at(a.q, (bh * d.len_q + i) * d.head_dim + c) *
               at(a.k, (kvh * d.len_kv + j) * d.head_dim + c);
      sc[static_cast<std::size_t>(j)] = dot * a.scale;
      mx = std::max(mx, sc[static_cast<std::size_t>(j)]);
    }
    double sum = 0;
    for (double& x : sc) sum += (x = std::isinf(x) ? 0.0 : std::exp(x - mx));
    for (std::int64_t c = 0; c < d.head_dim; ++c) {
      double want = 0;
      for (std::int64_t j = 0; j < d.len_kv; ++j)
        want += sc[static_cast<std::size_t>(j)] * at(a.v, (kvh * d.len_kv + j) * d.head_dim + c);
      want /= sum;
      const double got = o.get(static_cast<std::size_t>((bh * d.len_q + i) * d.head_dim + c));
      max_diff = std::max(max_diff, std::isfinite(got) ? std::abs(got - want) : INFINITY);
      sum_sq += want * want;
      ++n;
    }
  }
  return max_diff / std::sqrt(sum_sq / n);
}

template <class Args>
double run_ms(Executor& cpu, const Variant<Args>& v, Args& args) {
  ExecTimings t;
  const Status s = cpu.execute(make_call(v, args), t);
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", v.info.name.c_str(), s.to_string().c_str());
    std::exit(1);
  }
  return static_cast<double>(t.kernel_ns) / 1e6;
}

std::string join(const Shape& s) {
  std::string out;
  for (std::int64_t x : s) out += (out.empty() ? "" : "x") + std::to_string(x);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"attn-cpu-bench: the CPU variants of matmul and attention, checked and timed"};
  int min_runs = 7;
  double min_seconds = 1.0;
  std::string json_path, only;
  std::vector<std::string> dtypes{"float32", "bfloat16", "float16"};
  app.add_option("--min-runs", min_runs, "runs per variant at least (after one warm-up)");
  app.add_option("--min-seconds", min_seconds, "seconds of runs per variant at least");
  app.add_option("--dtypes", dtypes, "dtypes to time")->delimiter(',');
  app.add_option("--op", only, "matmul or attention (default both)");
  app.add_option("--json", json_path, "write one JSON object per row to this file");
  CLI11_PARSE(app, argc, argv);

  auto cpu = make_cpu_executor();
  const Registry& registry = default_registry();
  std::printf("device: %s\n", cpu->device().name.c_str());
  std::printf("%-10s %-22s %-9s %-18s %-7s %10s %10s %9s %5s %9s\n", "op", "variant", "dtype",
              "shape", "causal", "median ms", "best ms", "GFLOP/s", "runs", "error");
  std::vector<Row> rows;
  auto report = [&](Row r) {
    std::printf("%-10s %-22s %-9s %-18s %-7s %10.2f %10.2f %9.1f %5d %9.1e\n", r.op.c_str(),
                r.variant.c_str(), r.dtype.c_str(), r.shape.c_str(), r.causal ? "yes" : "no", r.ms,
                r.best_ms, r.gflops, r.runs, r.error);
    std::fflush(stdout);
    rows.push_back(std::move(r));
  };
  auto runs_for = [&](const VariantInfo& info, DType dt) -> std::pair<int, double> {
    if (info.priority > 0) return {min_runs, min_seconds};
    if (dt != DType::kFloat32) return {0, 0};
    return {3, 0};
  };

  for (const std::string& name : dtypes) {
    const auto parsed = parse_dtype(name);
    if (!parsed) {
      std::fprintf(stderr, "unknown dtype %s\n", name.c_str());
      return 2;
    }
    const DType dt = *parsed;
    if (only.empty() || only == "matmul") {
      for (std::int64_t n : {1024, 2048}) {
        Tensor a = random_input(dt, {n, n}, 1), b = random_input(dt, {n, n}, 2), c(dt, {n, n});
        MatmulArgs args{a.view(), b.view(), c.view()};
        const MatmulDims d = matmul_dims(args.a, args.b, false, false).value();
        for (const auto& v : registry.of<MatmulArgs>().variants()) {
          if (v.info.backend != Backend::kCpu) continue;
          const auto [runs, seconds] = runs_for(v.info, dt);
          if (runs == 0) continue;
          poison(c);
          run_ms(*cpu, v, args);
          const double error = matmul_sample_error(args, d, c);
          const Timing t = time_runs([&] { return run_ms(*cpu, v, args); }, runs, seconds);
          report({"matmul", v.info.name, name, join({n, n, n}), false, t.median_ms, t.best_ms,
                  static_cast<double>(cost_of(args).flops) / t.median_ms / 1e6, error, t.runs});
        }
      }
    }
    if (only.empty() || only == "attention") {
      const Shape shapes[] = {{1, 8, 2048, 64}, {1, 32, 1024, 128}};
      for (const Shape& shape : shapes)
        for (bool causal : {false, true}) {
          Tensor q = random_input(dt, shape, 3), k = random_input(dt, shape, 4);
          Tensor vv = random_input(dt, shape, 5), o(dt, shape);
          AttentionArgs args{q.view(),
                             k.view(),
                             vv.view(),
                             o.view(),
                             {},
                             causal,
                             resolve_attention_scale(0, shape[3])};
          const AttentionDims d = attention_dims(args.q, args.k, args.v).value();
          for (const auto& v : registry.of<AttentionArgs>().variants()) {
            if (v.info.backend != Backend::kCpu) continue;
            const auto [runs, seconds] = runs_for(v.info, dt);
            if (runs == 0) continue;
            poison(o);
            run_ms(*cpu, v, args);
            const double error = attention_sample_error(args, d, o);
            const Timing t = time_runs([&] { return run_ms(*cpu, v, args); }, runs, seconds);
            report({"attention", v.info.name, name, join(shape), causal, t.median_ms, t.best_ms,
                    static_cast<double>(cost_of(args).flops) / t.median_ms / 1e6, error,
                    t.runs});
          }
        }
    }
  }
  if (!json_path.empty()) {
    std::ofstream out(json_path);
    for (const Row& r : rows)
      out << "{\"op\": \"" << r.op << "\", \"variant\": \"" << r.variant << "\", \"dtype\": \""
          << r.dtype << "\", \"shape\": \"" << r.shape
          << "\", \"causal\": " << (r.causal ? "true" : "false") << ", \"median_ms\": " << r.ms
          << ", \"best_ms\": " << r.best_ms << ", \"gflops\": " << r.gflops
          << ", \"runs\": " << r.runs << ", \"error\": " << r.error << ", \"device\": \""
          << cpu->device().name << "\"}\n";
  }
  return 0;
}
