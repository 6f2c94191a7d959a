// attn-bench: every CUDA variant of matmul and softmax, checked and then timed, next to its
// baseline timed in the same run (cuBLAS for matmul, a device-to-device copy of the same bytes
// for softmax). CUDA events around each run, warm-up first, the median of >= 20 runs, inputs
// rotated among enough copies to exceed L2. Prints a table; --json writes the numbers.
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <sstream>

#include "attn/executor.h"

namespace {

using namespace attn;

#define CHECK_CUDA(x)                                                                  \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_));                    \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

struct Row {
  std::string op, variant, dtype, shape, status;
  double ms = 0, rate = 0, baseline_rate = 0, error = 0;
  int runs = 0;
  std::string unit;
};

// A device buffer of random values in dtype t.
struct DeviceTensor {
  TensorView view;
  Tensor host;
  DeviceTensor(DType t, Shape shape, std::mt19937_64& rng) : host(t, shape) {
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (std::size_t i = 0; i < static_cast<std::size_t>(host.numel()); ++i) host.set(i, dist(rng));
    view = host.view();
    CHECK_CUDA(cudaMalloc(&view.data, host.bytes()));
    CHECK_CUDA(cudaMemcpy(view.data, host.data(), host.bytes(), cudaMemcpyHostToDevice));
    view.memory = MemoryKind::kDevice;
  }
  DeviceTensor(DType t, Shape shape) : host(t, shape) {  // output: poisoned with 0xff (NaN)
    view = host.view();
    CHECK_CUDA(cudaMalloc(&view.data, host.bytes()));
    CHECK_CUDA(cudaMemset(view.data, 0xff, host.bytes()));
    view.memory = MemoryKind::kDevice;
  }
  ~DeviceTensor() { cudaFree(view.data); }
  DeviceTensor(const DeviceTensor&) = delete;
  Tensor to_host() const {
    Tensor t(view.dtype, view.shape);
    CHECK_CUDA(cudaMemcpy(t.data(), view.data, t.bytes(), cudaMemcpyDeviceToHost));
    return t;
  }
};

// Median milliseconds of `fn(i)` over >= min_runs runs (and about 1 s), after warm-up.
template <class Fn>
std::pair<double, int> time_median(cudaStream_t s, Fn&& fn, int min_runs = 20) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) fn(i);
  CHECK_CUDA(cudaStreamSynchronize(s));
  CHECK_CUDA(cudaEventRecord(a, s));
  fn(0);
  CHECK_CUDA(cudaEventRecord(b, s));
  CHECK_CUDA(cudaEventSynchronize(b));
  float first = 0;
  CHECK_CUDA(cudaEventElapsedTime(&first, a, b));
  const int runs = std::clamp(static_cast<int>(1000.0 / std::max(first, 1e-3f)), min_runs, 200);
  std::vector<float> ms(runs);
  for (int i = 0; i < runs; ++i) {
    CHECK_CUDA(cudaEventRecord(a, s));
    fn(i);
    CHECK_CUDA(cudaEventRecord(b, s));
    CHECK_CUDA(cudaEventSynchronize(b));
    CHECK_CUDA(cudaEventElapsedTime(&ms[i], a, b));
  }
  CHECK_CUDA(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::nth_element(ms.begin(), ms.begin() + runs / 2, ms.end());
  return {ms[runs / 2], runs};
}

constexpr std::size_t kRotateBytes = 256u << 20;  // > 5x the H100's 50 MB L2

int sets_for(std::size_t bytes) {
  return static_cast<int>(std::clamp<std::size_t>((kRotateBytes + bytes - 1) / bytes, 1, 8));
}

// Relative error of C at 512 random entries against float64 dot products.
double matmul_sampled_error(const Tensor& a, const Tensor& b, const Tensor& c, const MatmulDims& d,
                            std::mt19937_64& rng) {
  double num = 0, den = 0;
  for (int s = 0; s < 512; ++s) {
    const std::int64_t i = rng() % d.m, j = rng() % d.n;
    double want = 0;
    for (std::int64_t kk = 0; kk < d.k; ++kk) want += double(a.get(i * d.k + kk)) * b.get(kk * d.n + j);
    const double got = c.get(i * d.n + j);
    if (!std::isfinite(got)) return INFINITY;
    num += (got - want) * (got - want);
    den += want * want;
  }
  return std::sqrt(num / den);
}

double softmax_sampled_error(const Tensor& x, const Tensor& y, std::int64_t rows, std::int64_t cols,
                             std::mt19937_64& rng) {
  double num = 0, den = 0;
  for (int s = 0; s < 4; ++s) {
    const std::int64_t r = rng() % rows;
    double m = -INFINITY, sum = 0;
    for (std::int64_t c = 0; c < cols; ++c) m = std::max(m, double(x.get(r * cols + c)));
    for (std::int64_t c = 0; c < cols; ++c) sum += std::exp(double(x.get(r * cols + c)) - m);
    for (std::int64_t c = 0; c < cols; ++c) {
      const double want = std::exp(double(x.get(r * cols + c)) - m) / sum, got = y.get(r * cols + c);
      if (!std::isfinite(got)) return INFINITY;
      num += (got - want) * (got - want);
      den += want * want;
    }
  }
  return std::sqrt(num / den);
}

double tolerance(DType t) { return t == DType::kFloat32 ? 1e-5 : 1e-2; }

void print(const Row& r) {
  std::printf("%-8s %-24s %-9s %-18s %9.3f ms %9.2f %-7s %6.3fx  err %.1e  %s\n", r.op.c_str(),
              r.variant.c_str(), r.dtype.c_str(), r.shape.c_str(), r.ms, r.rate, r.unit.c_str(),
              r.baseline_rate > 0 ? r.rate / r.baseline_rate : 0.0, r.error, r.status.c_str());
  std::fflush(stdout);
}

struct MatmulShape {
  std::int64_t m, n, k;
  std::string str() const {
    return m == n && n == k ? std::to_string(m) + "^3"
                            : std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k);
  }
};

// --variants: the rungs to time (empty: all); baselines always run.
std::vector<std::string> g_variants;
bool selected(const std::string& name) {
  return g_variants.empty() || std::find(g_variants.begin(), g_variants.end(), name) != g_variants.end();
}

void bench_matmul(const std::vector<MatmulShape>& shapes, const std::vector<DType>& dtypes, cudaStream_t s,
                  std::vector<Row>& rows, bool skip_slow) {
  const Registry& reg = default_registry();
  std::mt19937_64 rng(42);
  Stream stream(Backend::kCuda, s, 0);
  for (DType dt : dtypes)
    for (const MatmulShape& sh : shapes) {
      const std::int64_t m = sh.m, n = sh.n, k = sh.k;
      const std::size_t set_bytes = (m * k + k * n + m * n) * element_size(dt);
      const int sets = sets_for(set_bytes);
      std::vector<std::unique_ptr<DeviceTensor>> as, bs;
      for (int i = 0; i < sets; ++i) {
        as.push_back(std::make_unique<DeviceTensor>(dt, Shape{m, k}, rng));
        bs.push_back(std::make_unique<DeviceTensor>(dt, Shape{k, n}, rng));
      }
      DeviceTensor c(dt, {m, n});
      const MatmulDims dims{1, m, n, k, false};
      const std::string shape = sh.str();
      double cublas_rate = 0;
      std::vector<const MatmulVariant*> variants;
      for (const auto& v : reg.of<MatmulArgs>().variants())
        if (v.info.backend == Backend::kCuda && v.info.name == "matmul/cublas") variants.insert(variants.begin(), &v);
        else if (v.info.backend == Backend::kCuda && selected(v.info.name)) variants.push_back(&v);
      for (const MatmulVariant* v : variants) {
        Row r{"matmul", v->info.name, std::string(dtype_name(dt)), shape};
        r.unit = "TFLOP/s";
        MatmulArgs args{as[0]->view, bs[0]->view, c.view};
        if (Status st = v->supports(args); !st.ok()) continue;  // other dtypes
        if (skip_slow && m * n * k > 4096LL * 4096 * 4096 && v->info.priority <= 2) {
          r.status = "skipped (slow rung, --quick)";
          print(r);
          rows.push_back(r);
          continue;
        }
        CHECK_CUDA(cudaMemset(c.view.data, 0xff, c.host.bytes()));
        Status st = v->run(args, stream);
        CHECK_CUDA(cudaStreamSynchronize(s));
        r.error = st.ok() ? matmul_sampled_error(as[0]->host, bs[0]->host, c.to_host(), dims, rng) : INFINITY;
        const bool correct = st.ok() && r.error <= tolerance(dt);
        auto [ms, runs] = time_median(s, [&](int i) {
          MatmulArgs a{as[i % sets]->view, bs[i % sets]->view, c.view};
          (void)v->run(a, stream);
        });
        r.ms = ms;
        r.runs = runs;
        r.rate = 2.0 * m * n * k / (ms * 1e-3) / 1e12;
        if (v->info.name == "matmul/cublas") cublas_rate = r.rate;
        r.baseline_rate = cublas_rate;
        r.status = correct ? "ok" : ("WRONG " + st.to_string());
        print(r);
        rows.push_back(r);
      }
    }
}

void bench_softmax(const std::vector<std::int64_t>& widths, const std::vector<DType>& dtypes,
                   std::int64_t elements, cudaStream_t s, std::vector<Row>& rows) {
  const Registry& reg = default_registry();
  std::mt19937_64 rng(7);
  Stream stream(Backend::kCuda, s, 0);
  const Target target{Backend::kCuda, 90};
  for (DType dt : dtypes)
    for (std::int64_t w : widths) {
      const std::int64_t nrows = elements / w;
      DeviceTensor x(dt, {nrows, w}, rng), y(dt, {nrows, w});
      const double bytes = 2.0 * x.host.bytes();
      const std::string shape = std::to_string(nrows) + "x" + std::to_string(w);
      Row base{"softmax", "copy (baseline)", std::string(dtype_name(dt)), shape, "ok"};
      base.unit = "GB/s";
      auto [cms, cruns] = time_median(s, [&](int) {
        CHECK_CUDA(cudaMemcpyAsync(y.view.data, x.view.data, x.host.bytes(), cudaMemcpyDeviceToDevice, s));
      });
      base.ms = cms;
      base.runs = cruns;
      base.rate = bytes / (cms * 1e-3) / 1e9;
      base.baseline_rate = base.rate;
      print(base);
      rows.push_back(base);
      SoftmaxArgs probe{x.view, y.view};
      auto picked = reg.of<SoftmaxArgs>().select(probe, "", target);
      for (const auto& v : reg.of<SoftmaxArgs>().variants()) {
        if (v.info.backend != Backend::kCuda || !selected(v.info.name)) continue;
        Row r{"softmax", v.info.name, std::string(dtype_name(dt)), shape};
        r.unit = "GB/s";
        SoftmaxArgs args{x.view, y.view};
        if (Status st = v.supports(args); !st.ok()) {
          r.status = "refused: " + st.message().substr(0, 60);
          print(r);
          rows.push_back(r);
          continue;
        }
        CHECK_CUDA(cudaMemset(y.view.data, 0xff, y.host.bytes()));
        Status st = v.run(args, stream);
        CHECK_CUDA(cudaStreamSynchronize(s));
        r.error = st.ok() ? softmax_sampled_error(x.host, y.to_host(), nrows, w, rng) : INFINITY;
        const bool correct = st.ok() && r.error <= tolerance(dt);
        auto [ms, runs] = time_median(s, [&](int) { (void)v.run(args, stream); });
        r.ms = ms;
        r.runs = runs;
        r.rate = bytes / (ms * 1e-3) / 1e9;
        r.baseline_rate = base.rate;
        r.status = correct ? "ok" : ("WRONG " + st.to_string());
        if (picked.ok() && (*picked)->info.name == v.info.name) r.status += " (auto)";
        print(r);
        rows.push_back(r);
      }
    }
}

// Relative error of O over 3 sampled (batch, head, row) rows against float64.
double attention_sampled_error(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                               const AttentionDims& d, bool causal, float scale, std::mt19937_64& rng) {
  double num = 0, den = 0;
  for (int s = 0; s < 3; ++s) {
    const std::int64_t b = rng() % d.batch, h = rng() % d.heads_q, i = rng() % d.len_q;
    const std::int64_t kvh = h / (d.heads_q / d.heads_kv);
    const std::int64_t qoff = ((b * d.heads_q + h) * d.len_q + i) * d.head_dim;
    const std::int64_t kvoff = (b * d.heads_kv + kvh) * d.len_kv * d.head_dim;
    const std::int64_t visible = causal ? std::clamp<std::int64_t>(i + d.len_kv - d.len_q + 1, 0, d.len_kv) : d.len_kv;
    std::vector<double> sc(static_cast<std::size_t>(visible));
    double mx = -INFINITY;
    for (std::int64_t j = 0; j < visible; ++j) {
      double dot = 0;
      for (std::int64_t c = 0; c < d.head_dim; ++c) dot += double(q.get(qoff + c)) * k.get(kvoff + j * d.head_dim + c);
      sc[j] = dot * scale;
      mx = std::max(mx, sc[j]);
    }
    double sum = 0;
    for (auto& x : sc) sum += (x = std::exp(x - mx));
    for (std::int64_t c = 0; c < d.head_dim; ++c) {
      double want = 0;
      for (std::int64_t j = 0; j < visible; ++j) want += sc[j] / sum * v.get(kvoff + j * d.head_dim + c);
      const double got = o.get(qoff + c);
      if (!std::isfinite(got)) return INFINITY;
      num += (got - want) * (got - want);
      den += want * want;
    }
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

struct AttentionShape {
  std::int64_t b, hq, hkv, s_q, s_kv, d;
  bool causal;
};

void bench_attention(const std::vector<AttentionShape>& shapes, const std::vector<std::string>& only,
                     DType dt, cudaStream_t s, std::vector<Row>& rows, double copy_rate) {
  const Registry& reg = default_registry();
  std::mt19937_64 rng(11);
  Stream stream(Backend::kCuda, s, 0);
  const Target target{Backend::kCuda, 90};
  for (const auto& sh : shapes) {
    DeviceTensor q(dt, {sh.b, sh.hq, sh.s_q, sh.d}, rng), k(dt, {sh.b, sh.hkv, sh.s_kv, sh.d}, rng),
        v(dt, {sh.b, sh.hkv, sh.s_kv, sh.d}, rng), o(dt, {sh.b, sh.hq, sh.s_q, sh.d});
    const AttentionDims dims{sh.b, sh.hq, sh.hkv, sh.s_q, sh.s_kv, sh.d};
    const float scale = resolve_attention_scale(0.0f, sh.d);
    std::ostringstream shape;
    shape << sh.b << "x" << sh.hq << "/" << sh.hkv << "x" << sh.s_q;
    if (sh.s_kv != sh.s_q) shape << ":" << sh.s_kv;
    shape << "x" << sh.d << (sh.causal ? " causal" : "");
    AttentionArgs probe{q.view, k.view, v.view, o.view, {}, sh.causal, scale};
    auto picked = reg.of<AttentionArgs>().select(probe, "", target);
    for (const auto& var : reg.of<AttentionArgs>().variants()) {
      if (var.info.backend != Backend::kCuda || !selected(var.info.name)) continue;
      if (!only.empty() && std::find(only.begin(), only.end(), var.info.name) == only.end()) continue;
      AttentionArgs args{q.view, k.view, v.view, o.view, {}, sh.causal, scale};
      if (!var.supports(args).ok()) continue;
      const bool decode = sh.s_q == 1;
      Row r{"attention", var.info.name, std::string(dtype_name(dt)), shape.str()};
      r.unit = decode ? "GB/s" : "TFLOP/s";
      CHECK_CUDA(cudaMemset(o.view.data, 0xff, o.host.bytes()));
      Status st = var.run(args, stream);
      CHECK_CUDA(cudaStreamSynchronize(s));
      r.error = st.ok() ? attention_sampled_error(q.host, k.host, v.host, o.to_host(), dims, sh.causal, scale, rng)
                        : INFINITY;
      const bool correct = st.ok() && r.error <= tolerance(dt);
      auto [ms, runs] = time_median(s, [&](int) { (void)var.run(args, stream); });
      r.ms = ms;
      r.runs = runs;
      AttentionArgs cost_args{q.view, k.view, v.view, o.view, {}, sh.causal, scale};
      if (decode) {
        r.rate = double(k.host.bytes() + v.host.bytes()) / (ms * 1e-3) / 1e9;
        r.baseline_rate = copy_rate;
      } else {
        r.rate = double(cost_of(cost_args).flops) / (ms * 1e-3) / 1e12;
      }
      r.status = correct ? "ok" : ("WRONG " + st.to_string());
      if (picked.ok() && (*picked)->info.name == var.info.name) r.status += " (auto)";
      print(r);
      rows.push_back(r);
    }
  }
}

// Copy bandwidth (read + write) of a 1 GiB device-to-device copy, the decode baseline.
double copy_bandwidth(cudaStream_t s) {
  const std::size_t bytes = 1u << 30;
  void *a, *b;
  CHECK_CUDA(cudaMalloc(&a, bytes));
  CHECK_CUDA(cudaMalloc(&b, bytes));
  CHECK_CUDA(cudaMemset(a, 1, bytes));
  auto [ms, runs] = time_median(s, [&](int) { CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, s)); });
  (void)runs;
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) o += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"attn-bench: the kernel ladders against their baselines"};
  std::string op = "all", json;
  bool quick = false;
  std::vector<std::int64_t> matmul_sizes{2048, 4096, 8192};
  std::vector<std::int64_t> softmax_widths{1024, 4096, 16384, 65536, 262144};
  std::int64_t softmax_elements = 64LL << 20;
  app.add_option("--op", op, "matmul, softmax, attention or all")
      ->check(CLI::IsMember({"matmul", "softmax", "attention", "all"}));
  app.add_option("--json", json, "write the results here");
  app.add_option("--matmul-sizes", matmul_sizes, "square sizes");
  std::vector<std::int64_t> matmul_skinny{128, 256, 512, 1024};
  app.add_option("--matmul-skinny", matmul_skinny, "M of the 16-bit M x 8192 x 8192 shapes (none: skip)");
  app.add_option("--softmax-widths", softmax_widths, "row widths");
  app.add_option("--softmax-elements", softmax_elements, "rows x width");
  app.add_flag("--quick", quick, "skip the slowest rungs at the largest size");
  std::vector<std::int64_t> attention_seqs{512, 1024, 2048, 4096, 8192, 16384}, attention_dims{64, 128};
  app.add_option("--attention-seqs", attention_seqs, "sequence lengths of the attention grid");
  app.add_option("--attention-dims", attention_dims, "head dims of the attention grid");
  app.add_option("--variants", g_variants, "only these rungs (e.g. matmul/08_wgmma_tma); baselines always run");
  CLI11_PARSE(app, argc, argv);

  int dev = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) {
    std::fprintf(stderr, "attn-bench: no usable GPU\n");
    return 2;
  }
  std::printf("device: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
  std::printf("%-8s %-24s %-9s %-18s %12s %17s %7s\n", "op", "variant", "dtype", "shape", "median", "rate",
              "vs base");
  cudaStream_t s;
  CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  // As the server does: freed pool memory stays cached, so variants that take scratch memory
  // from the stream-ordered pool do not pay for a fresh allocation on every run.
  cudaMemPool_t pool;
  CHECK_CUDA(cudaDeviceGetDefaultMemPool(&pool, dev));
  std::uint64_t keep = UINT64_MAX;
  CHECK_CUDA(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  std::vector<Row> rows;
  if (op == "all" || op == "matmul") {
    std::vector<MatmulShape> squares, skinny;
    for (std::int64_t n : matmul_sizes) squares.push_back({n, n, n});
    for (std::int64_t m : matmul_skinny) skinny.push_back({m, 8192, 8192});
    bench_matmul(squares, {DType::kFloat32, DType::kBFloat16}, s, rows, quick);
    bench_matmul(skinny, {DType::kBFloat16}, s, rows, quick);
  }
  if (op == "all" || op == "softmax")
    bench_softmax(softmax_widths, {DType::kFloat32, DType::kBFloat16}, softmax_elements, s, rows);
  if (op == "all" || op == "attention") {
    const double copy = copy_bandwidth(s);
    std::printf("attention: copy bandwidth %.0f GB/s (read + write), the decode baseline\n", copy);
    // The grid: B x S = 16k tokens, Hq x D = 2048, bf16, causal and not.
    std::vector<AttentionShape> grid, fp32_grid, decode;
    for (std::int64_t d : attention_dims)
      for (std::int64_t seq : attention_seqs)
        for (bool causal : {false, true}) grid.push_back({16384 / seq, 2048 / d, 2048 / d, seq, seq, d, causal});
    grid.push_back({4, 32, 8, 4096, 4096, 128, false});  // GQA
    grid.push_back({4, 32, 8, 4096, 4096, 128, true});
    for (std::int64_t seq : {512, 2048, 4096}) {  // the fp32 rungs are slow: a subset of the grid
      const bool wanted = std::count(attention_seqs.begin(), attention_seqs.end(), seq) &&
                          std::count(attention_dims.begin(), attention_dims.end(), 128);
      for (bool causal : {false, true})
        if (wanted) fp32_grid.push_back({16384 / seq, 16, 16, seq, seq, 128, causal});
    }
    decode.push_back({1, 32, 8, 1, 32768, 128, false});
    decode.push_back({16, 32, 8, 1, 16384, 128, false});
    bench_attention(grid, {"attention/03_flash_mma", "attention/04_wgmma_tma"}, DType::kBFloat16, s, rows, copy);
    bench_attention(fp32_grid, {"attention/01_naive", "attention/02_flash_fp32"}, DType::kFloat32, s, rows, copy);
    bench_attention(decode, {"attention/03_flash_mma", "attention/decode_split_kv"}, DType::kBFloat16, s, rows, copy);
  }

  if (!json.empty()) {
    std::ofstream out(json);
    out << "{\"device\": \"" << json_escape(prop.name) << "\", \"results\": [\n";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      out << "  {\"op\": \"" << r.op << "\", \"variant\": \"" << r.variant << "\", \"dtype\": \"" << r.dtype
          << "\", \"shape\": \"" << r.shape << "\", \"median_ms\": " << r.ms << ", \"runs\": " << r.runs
          << ", \"rate\": " << r.rate << ", \"unit\": \"" << r.unit << "\", \"ratio_to_baseline\": "
          << (r.baseline_rate > 0 ? r.rate / r.baseline_rate : 0) << ", \"max_rel_error\": "
          << (std::isfinite(r.error) ? r.error : -1) << ", \"status\": \"" << json_escape(r.status) << "\"}"
          << (i + 1 < rows.size() ? ",\n" : "\n");
    }
    out << "]}\n";
  }
  bool wrong = false;
  for (const Row& r : rows) wrong |= r.status.rfind("WRONG", 0) == 0;
  return wrong ? 1 : 0;
}
