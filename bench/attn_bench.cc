// attn-bench: every CUDA variant of matmul and softmax, checked and then timed, next to its
// baseline timed in the same run (cuBLAS for matmul, a device-to-device copy of the same bytes
// for softmax; for the KV-cache ops a 1 GiB copy, and attention/04 on dense tensors for prefill). CUDA events around each run, warm-up first, the median of >= 20 runs, inputs
// rotated among enough copies to exceed L2. Prints a table; --json writes the numbers.
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <sstream>
#include <type_traits>

#include "attn/executor.h"
#include "attn/fp8.h"
#include "attn/paged_ops.h"

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
// The ragged batch's lengths, written to the JSON so that torch's baselines time the same batch.
std::vector<std::int64_t> g_ragged_lengths;
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

// --window-left, --window-right, --softcap: applied to every attention shape of the grid.
struct BenchAttentionOptions {
  std::int64_t window_left = -1, window_right = -1;
  float softcap = 0.0f;
} g_attention_options;

AttentionArgs with_options(AttentionArgs a) {
  a.window_left = g_attention_options.window_left;
  a.window_right = g_attention_options.window_right;
  a.softcap = g_attention_options.softcap;
  return a;
}

// Relative error of O over 3 sampled (batch, head, row) rows against float64 (keys as
// visible_keys says, scores soft-capped as `a` asks).
double attention_sampled_error(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& o,
                               const AttentionDims& d, const AttentionArgs& a, float scale, std::mt19937_64& rng) {
  double num = 0, den = 0;
  for (int s = 0; s < 3; ++s) {
    const std::int64_t b = rng() % d.batch, h = rng() % d.heads_q, i = rng() % d.len_q;
    const std::int64_t kvh = h / (d.heads_q / d.heads_kv);
    const std::int64_t qoff = ((b * d.heads_q + h) * d.len_q + i) * d.head_dim;
    const std::int64_t kvoff = (b * d.heads_kv + kvh) * d.len_kv * d.head_dim;
    const KeyRange keys = visible_keys(i, d.len_q, d.len_kv, a);
    const std::int64_t first = keys.begin, visible = keys.end;
    std::vector<double> sc(static_cast<std::size_t>(visible));
    double mx = -INFINITY;
    for (std::int64_t j = first; j < visible; ++j) {
      double dot = 0;
      for (std::int64_t c = 0; c < d.head_dim; ++c) dot += double(q.get(qoff + c)) * k.get(kvoff + j * d.head_dim + c);
      sc[j] = dot * scale;
      if (a.softcap > 0.0f) sc[j] = a.softcap * std::tanh(sc[j] / a.softcap);
      mx = std::max(mx, sc[j]);
    }
    double sum = 0;
    for (std::int64_t j = first; j < visible; ++j) sum += (sc[j] = std::exp(sc[j] - mx));
    for (std::int64_t c = 0; c < d.head_dim; ++c) {
      double want = 0;
      for (std::int64_t j = first; j < visible; ++j) want += sc[j] / sum * v.get(kvoff + j * d.head_dim + c);
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
    if (g_attention_options.window_left >= 0 || g_attention_options.window_right >= 0)
      shape << " w" << g_attention_options.window_left << "," << g_attention_options.window_right;
    if (g_attention_options.softcap > 0.0f) shape << " cap" << g_attention_options.softcap;
    const AttentionArgs probe = with_options({q.view, k.view, v.view, o.view, {}, sh.causal, scale});
    auto picked = reg.of<AttentionArgs>().select(probe, "", target);
    for (const auto& var : reg.of<AttentionArgs>().variants()) {
      if (var.info.backend != Backend::kCuda || !selected(var.info.name)) continue;
      if (!only.empty() && std::find(only.begin(), only.end(), var.info.name) == only.end()) continue;
      const AttentionArgs args = with_options({q.view, k.view, v.view, o.view, {}, sh.causal, scale});
      if (!var.supports(args).ok()) continue;
      const bool decode = sh.s_q == 1;
      Row r{"attention", var.info.name, std::string(dtype_name(dt)), shape.str()};
      r.unit = decode ? "GB/s" : "TFLOP/s";
      CHECK_CUDA(cudaMemset(o.view.data, 0xff, o.host.bytes()));
      Status st = var.run(args, stream);
      CHECK_CUDA(cudaStreamSynchronize(s));
      r.error = st.ok() ? attention_sampled_error(q.host, k.host, v.host, o.to_host(), dims, args, scale, rng)
                        : INFINITY;
      const bool correct = st.ok() && r.error <= tolerance(dt);
      auto [ms, runs] = time_median(s, [&](int) { (void)var.run(args, stream); });
      r.ms = ms;
      r.runs = runs;
      const AttentionArgs cost_args = args;  // FLOPs count the pairs a window keeps
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

// --- The KV-cache ops ----------------------------------------------------------------------------

// int32 arrays on the device.
struct DeviceInts {
  int* ptr = nullptr;
  std::int64_t n = 0;
  explicit DeviceInts(const std::vector<std::int32_t>& v) : n(static_cast<std::int64_t>(v.size())) {
    CHECK_CUDA(cudaMalloc(&ptr, std::max<std::size_t>(1, v.size()) * sizeof(int)));
    CHECK_CUDA(cudaMemcpy(ptr, v.data(), v.size() * sizeof(int), cudaMemcpyHostToDevice));
  }
  ~DeviceInts() { cudaFree(ptr); }
  DeviceInts(const DeviceInts&) = delete;
  TensorView view() const { return {DType::kInt32, {n}, ptr, MemoryKind::kDevice}; }
};

// One batch's page tables (host and device) over its own shuffled pages of the shared pools.
struct PagedSet {
  PagedPlan plan;
  std::unique_ptr<DeviceInts> indptr, indices, lens, q_indptr;
  void bind(PagedSequences& s) const {
    plan.bind(s);  // host copies and max_seq_len; then the device views
    s.page_indptr = indptr->view(), s.page_indices = indices->view(), s.seq_lens = lens->view();
  }
  void bind(PagedPrefillArgs& a) const {
    plan.bind(a);
    bind(a.seqs);
    a.q_indptr = q_indptr->view();
  }
};

// Float8 e4m3 pages (with --fp8): every page's scale fp8_pow2_scale(4), codes of N(0, 1) values.
bool g_paged_fp8 = false;
const float kBenchFp8Scale = fp8_pow2_scale(4.0f);

// Pools of `sets` x (pages of one batch), random values, and `sets` page tables over disjoint
// shuffled pages: rotating among the sets keeps a small batch from being timed out of L2.
struct PagedBench {
  PagedKvLayer cache;
  std::vector<std::unique_ptr<PagedSet>> sets;
  std::int64_t kv_bytes = 0;  // K and V of one batch, as read by a call

  PagedBench(DType dt, std::int64_t hkv, std::int64_t d, std::int64_t page_size, const std::vector<std::int32_t>& cached,
             const std::vector<std::int32_t>& fresh, std::mt19937_64& rng) {
    std::int64_t pages = 0, tokens = 0;
    for (std::size_t i = 0; i < cached.size(); ++i) {
      pages += (cached[i] + fresh[i] + page_size - 1) / page_size;
      tokens += cached[i] + fresh[i];
    }
    const std::int64_t es = g_paged_fp8 ? 1 : static_cast<std::int64_t>(element_size(dt));
    kv_bytes = 2 * tokens * hkv * d * es;
    const int count = sets_for(static_cast<std::size_t>(kv_bytes));
    cache = PagedKvLayer{dt, pages * count, hkv, page_size, d, nullptr, nullptr, MemoryKind::kDevice};
    const std::size_t pool_bytes = static_cast<std::size_t>(cache.pages * cache.page_elements() * es);
    CHECK_CUDA(cudaMalloc(&cache.k, pool_bytes));
    CHECK_CUDA(cudaMalloc(&cache.v, pool_bytes));
    if (g_paged_fp8) {
      cache.storage = KvStorage::kFloat8E4M3;
      const std::vector<float> scales(static_cast<std::size_t>(cache.pages * hkv), kBenchFp8Scale);
      CHECK_CUDA(cudaMalloc(&cache.k_scales, scales.size() * 4));
      CHECK_CUDA(cudaMalloc(&cache.v_scales, scales.size() * 4));
      CHECK_CUDA(cudaMemcpy(cache.k_scales, scales.data(), scales.size() * 4, cudaMemcpyHostToDevice));
      CHECK_CUDA(cudaMemcpy(cache.v_scales, scales.data(), scales.size() * 4, cudaMemcpyHostToDevice));
      fill_codes(cache.k, pool_bytes, rng);
      fill_codes(cache.v, pool_bytes, rng);
    } else {
      fill_random(cache.k, pool_bytes, dt, rng);
      fill_random(cache.v, pool_bytes, dt, rng);
    }
    std::vector<std::int32_t> ids(static_cast<std::size_t>(cache.pages));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    std::size_t next = 0;
    for (int c = 0; c < count; ++c) {
      auto set = std::make_unique<PagedSet>();
      PagedPlan& plan = set->plan;
      plan.page_indptr.push_back(0);
      plan.q_indptr.push_back(0);
      for (std::size_t i = 0; i < cached.size(); ++i) {
        const std::int64_t len = cached[i] + fresh[i];
        for (std::int64_t k = 0; k < (len + page_size - 1) / page_size; ++k) plan.page_indices.push_back(ids[next++]);
        plan.page_indptr.push_back(static_cast<std::int32_t>(plan.page_indices.size()));
        plan.seq_lens.push_back(static_cast<std::int32_t>(len));
        plan.q_indptr.push_back(plan.q_indptr.back() + fresh[i]);
      }
      set->indptr = std::make_unique<DeviceInts>(plan.page_indptr);
      set->indices = std::make_unique<DeviceInts>(plan.page_indices);
      set->lens = std::make_unique<DeviceInts>(plan.seq_lens);
      set->q_indptr = std::make_unique<DeviceInts>(plan.q_indptr);
      sets.push_back(std::move(set));
    }
  }
  ~PagedBench() {
    cudaFree(cache.k);
    cudaFree(cache.v);
    cudaFree(cache.k_scales);
    cudaFree(cache.v_scales);
  }
  // e4m3 codes of N(0, 1) values at kBenchFp8Scale: one 32 MiB block copied over the pool.
  static void fill_codes(void* dst, std::size_t bytes, std::mt19937_64& rng) {
    const std::size_t block = std::min<std::size_t>(bytes, 32u << 20);
    std::vector<std::uint8_t> host(block);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (auto& c : host) c = float_to_fp8_e4m3(dist(rng) / kBenchFp8Scale);
    for (std::size_t off = 0; off < bytes; off += block)
      CHECK_CUDA(cudaMemcpy(static_cast<char*>(dst) + off, host.data(), std::min(block, bytes - off), cudaMemcpyHostToDevice));
  }
  PagedBench(const PagedBench&) = delete;

  // Random 16-bit or float32 values: one 32 MiB random block copied over the pool.
  static void fill_random(void* dst, std::size_t bytes, DType dt, std::mt19937_64& rng) {
    const std::size_t block = std::min<std::size_t>(bytes, 32u << 20);
    Tensor host(dt, {static_cast<std::int64_t>(block / element_size(dt))});
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (std::size_t i = 0; i < static_cast<std::size_t>(host.numel()); ++i) host.set(i, dist(rng));
    for (std::size_t off = 0; off < bytes; off += block)
      CHECK_CUDA(cudaMemcpy(static_cast<char*>(dst) + off, host.data(), std::min(block, bytes - off),
                            cudaMemcpyHostToDevice));
  }

  // Row t of sequence i's head hkv (K or V) from the device.
  std::vector<float> rows(const PagedSet& set, std::size_t i, std::int64_t hkv, bool v, std::int64_t count) const {
    if (cache.fp8()) return fp8_rows(set, i, hkv, v, count);
    const std::size_t es = element_size(cache.dtype);
    Tensor buf(cache.dtype, {count, cache.head_dim});
    const std::int64_t ps = cache.page_size;
    for (std::int64_t t = 0; t < count; t += ps) {
      const std::int64_t page = set.plan.page_indices[set.plan.page_indptr[i] + t / ps];
      const std::int64_t n = std::min(ps, count - t);
      CHECK_CUDA(cudaMemcpy(static_cast<char*>(buf.data()) + t * cache.head_dim * es,
                            static_cast<const char*>(v ? cache.v : cache.k) + cache.offset(page, hkv, 0) * es,
                            n * cache.head_dim * es, cudaMemcpyDeviceToHost));
    }
    return buf.to_floats();
  }
  // The same from float8 pages: codes x their page's scale (read from the device).
  std::vector<float> fp8_rows(const PagedSet& set, std::size_t i, std::int64_t hkv, bool v, std::int64_t count) const {
    std::vector<float> out(static_cast<std::size_t>(count * cache.head_dim));
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(cache.page_size * cache.head_dim));
    const std::int64_t ps = cache.page_size;
    for (std::int64_t t = 0; t < count; t += ps) {
      const std::int64_t page = set.plan.page_indices[set.plan.page_indptr[i] + t / ps];
      const std::int64_t n = std::min(ps, count - t);
      float scale = 0.0f;
      CHECK_CUDA(cudaMemcpy(&scale, (v ? cache.v_scales : cache.k_scales) + page * cache.heads_kv + hkv, 4,
                            cudaMemcpyDeviceToHost));
      CHECK_CUDA(cudaMemcpy(codes.data(), static_cast<const char*>(v ? cache.v : cache.k) + cache.offset(page, hkv, 0),
                            static_cast<std::size_t>(n * cache.head_dim), cudaMemcpyDeviceToHost));
      for (std::int64_t e = 0; e < n * cache.head_dim; ++e)
        out[static_cast<std::size_t>(t * cache.head_dim + e)] = fp8_e4m3_to_float(codes[static_cast<std::size_t>(e)]) * scale;
    }
    return out;
  }
};

// Relative error of a few output rows (query head h of new token `row` of sequence i, which sees
// `visible` keys) against float64 over the cache as the call left it; infinite if a new K row in
// the cache differs from k_new.
// The window of the paged rows (decode, and causal prefill): keys from position - window_left;
// -1: the whole sequence.
std::int64_t g_paged_window = -1;

double paged_sampled_error(const PagedBench& b, const PagedSet& set, const Tensor& q, const Tensor& k_new,
                           const DeviceTensor& o_dev, std::int64_t hq, bool causal, std::mt19937_64& rng) {
  const std::int64_t d = b.cache.head_dim, group = hq / b.cache.heads_kv;
  const float scale = resolve_attention_scale(0.0f, d);
  const Tensor o = o_dev.to_host();
  double num = 0, den = 0;
  const std::size_t n = set.plan.seq_lens.size();
  for (std::size_t i : {std::size_t{0}, n - 1, static_cast<std::size_t>(rng() % n)}) {
    const std::int64_t len = set.plan.seq_lens[i], first = set.plan.q_indptr[i];
    const std::int64_t fresh = set.plan.q_indptr[i + 1] - first;
    const std::int64_t j = static_cast<std::int64_t>(rng() % fresh), h = static_cast<std::int64_t>(rng() % hq);
    const std::int64_t hkv = h / group, row = first + j;
    const std::int64_t visible = causal ? len - fresh + j + 1 : len;
    const std::int64_t first_key = g_paged_window >= 0 ? std::max<std::int64_t>(0, visible - 1 - g_paged_window) : 0;
    const auto keys = b.rows(set, i, hkv, false, len), values = b.rows(set, i, hkv, true, len);
    for (std::int64_t x = 0; x < d; ++x) {  // the append: the new row in its slot (float8: rounded)
      const float want = k_new.get((row * b.cache.heads_kv + hkv) * d + x), got = keys[(len - fresh + j) * d + x];
      if (b.cache.fp8() ? !(std::fabs(got - want) <= 0.07f * std::fabs(want) + 0.01f) : got != want) return INFINITY;
    }
    std::vector<double> sc(static_cast<std::size_t>(visible), -INFINITY);
    double mx = -INFINITY, sum = 0;
    for (std::int64_t t = first_key; t < visible; ++t) {
      double dot = 0;
      for (std::int64_t x = 0; x < d; ++x) dot += double(q.get((row * hq + h) * d + x)) * keys[t * d + x];
      sc[t] = dot * scale;
      mx = std::max(mx, sc[t]);
    }
    for (auto& e : sc) sum += (e = std::exp(e - mx));
    for (std::int64_t x = 0; x < d; ++x) {
      double want = 0;
      for (std::int64_t t = first_key; t < visible; ++t) want += sc[t] / sum * values[t * d + x];
      const double got = o.get((row * hq + h) * d + x);
      if (!std::isfinite(got)) return INFINITY;
      num += (got - want) * (got - want);
      den += want * want;
    }
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

struct PagedShape {
  std::string name;
  std::vector<std::int32_t> cached, fresh;
  std::int64_t page_size;
};

// Paged decode (fresh = 1 each) or prefill: every selected CUDA rung, GB/s of K/V read for decode
// (against the copy) and TFLOP/s for prefill (against attention/04 on the same query/key counts,
// dense, when `dense_seconds` gives its time).
void bench_paged(const std::vector<PagedShape>& shapes, bool prefill, DType dt, std::int64_t hq, std::int64_t hkv,
                 std::int64_t d, cudaStream_t s, std::vector<Row>& rows, double copy_rate,
                 const std::vector<double>& dense_ms = {}) {
  const Registry& reg = default_registry();
  std::mt19937_64 rng(23);
  Stream stream(Backend::kCuda, s, 0);
  const Target target{Backend::kCuda, 90};
  for (std::size_t si = 0; si < shapes.size(); ++si) {
    const PagedShape& sh = shapes[si];
    PagedBench b(dt, hkv, d, sh.page_size, sh.cached, sh.fresh, rng);
    const std::int64_t tokens = b.sets[0]->plan.q_indptr.back();
    Tensor q_host(dt, {tokens, hq, d}), kn_host(dt, {tokens, hkv, d}), vn_host(dt, {tokens, hkv, d});
    for (Tensor* t : {&q_host, &kn_host, &vn_host}) {
      std::normal_distribution<float> dist(0.0f, 1.0f);
      for (std::size_t i = 0; i < static_cast<std::size_t>(t->numel()); ++i) t->set(i, dist(rng));
    }
    DeviceTensor q(dt, {tokens, hq, d}), k_new(dt, {tokens, hkv, d}), v_new(dt, {tokens, hkv, d}),
        o(dt, {tokens, hq, d});
    CHECK_CUDA(cudaMemcpy(q.view.data, q_host.data(), q_host.bytes(), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(k_new.view.data, kn_host.data(), kn_host.bytes(), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMemcpy(v_new.view.data, vn_host.data(), vn_host.bytes(), cudaMemcpyHostToDevice));
    const float scale = resolve_attention_scale(0.0f, d);
    std::ostringstream shape;
    shape << sh.name << " p" << sh.page_size;
    if (g_paged_window >= 0) shape << " w" << g_paged_window;
    if (g_paged_fp8) shape << " fp8";
    shape << " " << hq << "/" << hkv << " heads";
    auto decode_args = [&](int set) {
      PagedDecodeArgs a{q.view, k_new.view, v_new.view, o.view, {}, b.cache, {}, scale};
      a.mask.window_left = g_paged_window;
      b.sets[static_cast<std::size_t>(set)]->bind(a.seqs);
      return a;
    };
    auto prefill_args = [&](int set) {
      PagedPrefillArgs a;
      a.q = q.view, a.k_new = k_new.view, a.v_new = v_new.view, a.o = o.view, a.cache = b.cache, a.mask.causal = true;
      a.mask.window_left = g_paged_window;
      a.scale = scale;
      b.sets[static_cast<std::size_t>(set)]->bind(a);
      return a;
    };
    const int count = static_cast<int>(b.sets.size());
    auto run_one = [&](const auto& var, int set) -> Status {
      if constexpr (std::is_same_v<std::decay_t<decltype(var)>, PagedPrefillVariant>) {
        const PagedPrefillArgs a = prefill_args(set);
        return var.run(a, stream);
      } else {
        const PagedDecodeArgs a = decode_args(set);
        return var.run(a, stream);
      }
    };
    auto bench_variants = [&](const auto& registry, const auto& probe, double flops) {
      auto picked = registry.select(probe, "", target);
      for (const auto& var : registry.variants()) {
        if (var.info.backend != Backend::kCuda || !selected(var.info.name)) continue;
        if (!var.supports(probe).ok()) continue;
        Row r{prefill ? "prefill" : "decode", var.info.name, std::string(dtype_name(dt)), shape.str()};
        r.unit = prefill ? "TFLOP/s" : "GB/s";
        CHECK_CUDA(cudaMemset(o.view.data, 0xff, o.host.bytes()));
        Status st = run_one(var, 0);
        CHECK_CUDA(cudaStreamSynchronize(s));
        r.error = st.ok() ? paged_sampled_error(b, *b.sets[0], q_host, kn_host, o, hq, prefill, rng) : INFINITY;
        const bool correct = st.ok() && r.error <= tolerance(dt);
        auto [ms, runs] = time_median(s, [&](int i) { (void)run_one(var, i % count); });
        r.ms = ms;
        r.runs = runs;
        if (prefill) {
          r.rate = flops / (ms * 1e-3) / 1e12;
          if (si < dense_ms.size() && dense_ms[si] > 0) r.baseline_rate = flops / (dense_ms[si] * 1e-3) / 1e12;
        } else {
          // The bytes it must read: the window's keys of each sequence.
          const PagedDecodeArgs read_args = decode_args(0);
          r.rate = double(paged_kv_bytes_read(b.cache, read_args.seqs, g_paged_window)) / (ms * 1e-3) / 1e9;
          r.baseline_rate = copy_rate;
        }
        r.status = correct ? "ok" : ("WRONG " + st.to_string());
        if (picked.ok() && (*picked)->info.name == var.info.name) r.status += " (auto)";
        print(r);
        rows.push_back(r);
      }
    };
    if (prefill) {
      const PagedPrefillArgs probe = prefill_args(0);
      bench_variants(reg.of<PagedPrefillArgs>(), probe, double(cost_of(probe).flops));
    } else {
      const PagedDecodeArgs probe = decode_args(0);
      bench_variants(reg.of<PagedDecodeArgs>(), probe, 0.0);
    }
  }
}

// A dense attention rung on [B, Hq, Sq, D] x [B, Hkv, Sk, D] random tensors (rotated among enough
// copies to exceed L2), timed as the baseline of the paged rows: returns its median ms and adds
// its row (GB/s of K/V for Sq = 1, else TFLOP/s), or 0 when the rung refuses the shape.
double bench_dense(const std::string& name, const AttentionShape& sh, const std::string& label, DType dt,
                   cudaStream_t s, std::vector<Row>& rows, double copy_rate, std::mt19937_64& rng) {
  const auto* var = default_registry().of<AttentionArgs>().find(name);
  if (!var) return 0;
  Stream stream(Backend::kCuda, s, 0);
  const Shape qs{sh.b, sh.hq, sh.s_q, sh.d}, kvs{sh.b, sh.hkv, sh.s_kv, sh.d};
  const std::size_t es = element_size(dt);
  const std::size_t q_bytes = static_cast<std::size_t>(element_count(qs)) * es;
  const std::size_t kv_bytes = static_cast<std::size_t>(element_count(kvs)) * es;
  const int sets = sets_for(2 * kv_bytes);
  void *q, *o, *kv;
  CHECK_CUDA(cudaMalloc(&q, q_bytes));
  CHECK_CUDA(cudaMalloc(&o, q_bytes));
  CHECK_CUDA(cudaMalloc(&kv, 2 * kv_bytes * sets));
  PagedBench::fill_random(q, q_bytes, dt, rng);
  PagedBench::fill_random(kv, 2 * kv_bytes * sets, dt, rng);
  const float scale = resolve_attention_scale(0.0f, sh.d);
  auto args = [&](int i) {
    char* k = static_cast<char*>(kv) + 2 * kv_bytes * static_cast<std::size_t>(i % sets);
    return AttentionArgs{{dt, qs, q, MemoryKind::kDevice}, {dt, kvs, k, MemoryKind::kDevice},
                         {dt, kvs, k + kv_bytes, MemoryKind::kDevice}, {dt, qs, o, MemoryKind::kDevice}, {},
                         sh.causal, scale};
  };
  double result = 0;
  if (var->supports(args(0)).ok()) {
    Row r{sh.s_q == 1 ? "decode" : "prefill", name + " (dense)", std::string(dtype_name(dt)), label};
    const Status st = var->run(args(0), stream);
    CHECK_CUDA(cudaStreamSynchronize(s));
    auto [ms, runs] = time_median(s, [&](int i) { (void)var->run(args(i), stream); });
    r.ms = ms;
    r.runs = runs;
    if (sh.s_q == 1) {
      r.unit = "GB/s";
      r.rate = 2.0 * kv_bytes / (ms * 1e-3) / 1e9;
      r.baseline_rate = copy_rate;
    } else {
      r.unit = "ms";
      r.rate = ms;
    }
    r.status = st.ok() ? "baseline (checked by the tests)" : "WRONG " + st.to_string();
    print(r);
    rows.push_back(r);
    result = ms;
  }
  cudaFree(q);
  cudaFree(o);
  cudaFree(kv);
  return result;
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
  bool paged_fp8 = false;
  bool quick = false;
  std::vector<std::int64_t> matmul_sizes{2048, 4096, 8192};
  std::vector<std::int64_t> softmax_widths{1024, 4096, 16384, 65536, 262144};
  std::int64_t softmax_elements = 64LL << 20;
  app.add_option("--op", op,
                 "matmul, softmax, attention, heads (every common head dim), options (windows, soft caps), paged, "
                 "families (GQA groups 7 and multi-query against 8 at the same KV bytes; windowed decode) or all")
      ->check(CLI::IsMember({"matmul", "softmax", "attention", "heads", "options", "paged", "families", "all"}));
  std::vector<std::int64_t> head_dims{32, 64, 80, 96, 128, 192, 256};
  app.add_option("--head-dims", head_dims, "head dims of --op heads");
  app.add_option("--json", json, "write the results here");
  app.add_option("--matmul-sizes", matmul_sizes, "square sizes");
  std::vector<std::int64_t> matmul_skinny{128, 256, 512, 1024};
  app.add_option("--matmul-skinny", matmul_skinny, "M of the 16-bit M x 8192 x 8192 shapes (none: skip)");
  app.add_option("--softmax-widths", softmax_widths, "row widths");
  app.add_option("--softmax-elements", softmax_elements, "rows x width");
  app.add_flag("--quick", quick, "skip the slowest rungs at the largest size");
  app.add_flag("--fp8", paged_fp8, "--op paged: every paged row again over float8 e4m3 pages");
  std::vector<std::int64_t> attention_seqs{512, 1024, 2048, 4096, 8192, 16384}, attention_dims{64, 128};
  app.add_option("--attention-seqs", attention_seqs, "sequence lengths of the attention grid");
  app.add_option("--attention-dims", attention_dims, "head dims of the attention grid");
  app.add_option("--variants", g_variants, "only these rungs (e.g. matmul/08_wgmma_tma); baselines always run");
  app.add_option("--window-left", g_attention_options.window_left,
                 "attention: sliding window, keys left of a query's position (-1: unbounded)");
  app.add_option("--window-right", g_attention_options.window_right,
                 "attention: sliding window, keys right of it (-1: unbounded; 0 under causal)");
  app.add_option("--softcap", g_attention_options.softcap, "attention and heads: soft-cap the scores (0: none)");
  CLI11_PARSE(app, argc, argv);
  if (const Status bad = check_attention_options(g_attention_options.window_left, g_attention_options.window_right,
                                                 g_attention_options.softcap);
      !bad.ok()) {
    std::fprintf(stderr, "attn-bench: %s\n", bad.message().c_str());
    return 2;
  }

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
    // Rungs that refuse a window or a cap (decode_split_kv) are skipped.
    bench_attention(grid, {"attention/03_flash_mma", "attention/04_wgmma_tma"}, DType::kBFloat16, s, rows, copy);
    bench_attention(fp32_grid, {"attention/01_naive", "attention/02_flash_fp32"}, DType::kFloat32, s, rows, copy);
    bench_attention(decode, {"attention/03_flash_mma", "attention/decode_split_kv"}, DType::kBFloat16, s, rows, copy);
  }

  if (op == "heads") {  // every common head dim, bf16: torch_sdpa.py --heads times the same shapes
    const double copy = copy_bandwidth(s);
    std::vector<AttentionShape> grid;
    for (std::int64_t d : head_dims)
      for (std::int64_t seq : {1024, 4096, 16384})
        for (bool causal : {false, true}) grid.push_back({16384 / seq, 16, 16, seq, seq, d, causal});
    bench_attention(grid, {"attention/03_flash_mma", "attention/04_wgmma_tma"}, DType::kBFloat16, s, rows, copy);
    std::vector<AttentionShape> decode;
    for (std::int64_t d : head_dims) decode.push_back({16, 32, 8, 1, 8192, d, false});
    bench_attention(decode, {"attention/decode_mma_split", "attention/decode_split_kv"}, DType::kBFloat16, s, rows,
                    copy);
  }

  if (op == "options") {  // a sliding window and a soft cap against the same rung without them
    const double copy = copy_bandwidth(s);
    const std::vector<std::string> top{"attention/03_flash_mma", "attention/04_wgmma_tma"};
    const std::vector<AttentionShape> long_causal{{1, 16, 16, 32768, 32768, 128, true}};
    const std::vector<AttentionShape> capped{{4, 16, 16, 4096, 4096, 128, false},
                                             {4, 16, 16, 4096, 4096, 128, true},
                                             {4, 16, 16, 4096, 4096, 64, true},
                                             {4, 16, 16, 4096, 4096, 256, true}};
    g_attention_options = {};
    bench_attention(long_causal, top, DType::kBFloat16, s, rows, copy);
    g_attention_options.window_left = 4096;
    bench_attention(long_causal, top, DType::kBFloat16, s, rows, copy);
    g_attention_options = {};
    bench_attention(capped, top, DType::kBFloat16, s, rows, copy);
    g_attention_options.softcap = 50.0f;
    bench_attention(capped, top, DType::kBFloat16, s, rows, copy);
    g_attention_options = {};
  }

  if (op == "all" || op == "paged") {
    const double copy = copy_bandwidth(s);
    std::printf("paged: copy bandwidth %.0f GB/s (read + write), the decode baseline\n", copy);
    const DType bf16 = DType::kBFloat16;
    const std::int64_t hq = 32, hkv = 8, d = 128;
    std::mt19937_64 rng(5);
    // (a) ragged: 64 sequences, lengths log-uniform in 512..32k (one new token each).
    std::vector<std::int32_t> ragged;
    std::uniform_real_distribution<double> u(std::log(512.0), std::log(32768.0));
    for (int i = 0; i < 64; ++i) ragged.push_back(static_cast<std::int32_t>(std::exp(u(rng))));
    auto decode_of = [](const std::string& name, std::vector<std::int32_t> lens, std::int64_t ps) {
      PagedShape sh{name, {}, {}, ps};
      for (auto l : lens) sh.cached.push_back(l - 1), sh.fresh.push_back(1);
      return sh;
    };
    const std::int64_t ragged_tokens = std::accumulate(ragged.begin(), ragged.end(), std::int64_t{0});
    std::printf("paged: ragged batch of 64, %lld tokens\n", static_cast<long long>(ragged_tokens));
    for (auto l : ragged) g_ragged_lengths.push_back(l);
    // With --fp8 each paged row runs again over float8 pages (the same shapes, half the bytes).
    const std::vector<bool> storages = paged_fp8 ? std::vector<bool>{false, true} : std::vector<bool>{false};
    for (const bool fp8 : storages) {
      g_paged_fp8 = fp8;
      bench_paged({decode_of("ragged64", ragged, 16), decode_of("ragged64", ragged, 64)}, false, bf16, hq, hkv, d, s,
                  rows, copy);
    }
    // (b) equal lengths, paged (page 64) and dense.
    for (auto [batch, len] : std::vector<std::pair<int, int>>{{1, 32768}, {32, 4096}, {16, 16384}, {64, 8192}, {1, 4096}}) {
      const std::string name = std::to_string(batch) + "x" + std::to_string(len);
      for (const bool fp8 : storages) {
        g_paged_fp8 = fp8;
        bench_paged({decode_of(name, std::vector<std::int32_t>(static_cast<std::size_t>(batch), len), 64)}, false, bf16,
                    hq, hkv, d, s, rows, copy);
      }
      g_paged_fp8 = false;
      for (const char* dense : {"attention/decode_split_kv", "attention/decode_mma_split"})
        bench_dense(dense, {batch, hq, hkv, 1, len, d, false}, name, bf16, s, rows, copy, rng);
    }
    // (c) chunked prefill, causal, against attention/04 on dense tensors of the same counts.
    struct Chunked {
      std::string name;
      int batch, cached, fresh;
    };
    for (const Chunked& c : {Chunked{"16x(8192+64)", 16, 8192, 64}, Chunked{"1x(0+2048)", 1, 0, 2048},
                             Chunked{"8x(0+2048)", 8, 0, 2048}}) {
      const double dense = bench_dense("attention/04_wgmma_tma", {c.batch, hq, hkv, c.fresh, c.cached + c.fresh, d, true},
                                       c.name, bf16, s, rows, copy, rng);
      const auto n = static_cast<std::size_t>(c.batch);
      for (const bool fp8 : storages)
        for (std::int64_t ps : {16, 64}) {
          g_paged_fp8 = fp8;
          bench_paged({{c.name, std::vector<std::int32_t>(n, c.cached), std::vector<std::int32_t>(n, c.fresh), ps}}, true,
                      bf16, hq, hkv, d, s, rows, copy, {dense});
        }
      g_paged_fp8 = false;
    }
  }

  if (op == "all" || op == "families") {
    const double copy = copy_bandwidth(s);
    std::printf("families: copy bandwidth %.0f GB/s (read + write), the decode baseline\n", copy);
    const DType bf16 = DType::kBFloat16;
    const std::int64_t d = 128;
    // The same K/V bytes in every row of a table: 4 kv heads x n sequences, or 1 kv head x 4n.
    struct Heads {
      std::int64_t hq, hkv;
    };
    const Heads heads[] = {{32, 4}, {28, 4}, {32, 1}, {128, 1}};
    for (const auto& [batch, len] : std::vector<std::pair<int, int>>{{32, 4096}, {4, 32768}}) {
      for (const Heads& h : heads) {
        const int n = batch * static_cast<int>(4 / h.hkv);
        PagedShape sh{std::to_string(n) + "x" + std::to_string(len), {}, {}, 16};
        for (int i = 0; i < n; ++i) sh.cached.push_back(len - 1), sh.fresh.push_back(1);
        bench_paged({sh}, false, bf16, h.hq, h.hkv, d, s, rows, copy);
      }
    }
    for (const auto& [batch, fresh] : std::vector<std::pair<int, int>>{{8, 2048}}) {
      for (const Heads& h : heads) {
        const auto n = static_cast<std::size_t>(batch * (4 / h.hkv));
        bench_paged({{std::to_string(n) + "x(0+" + std::to_string(fresh) + ")", std::vector<std::int32_t>(n, 0),
                      std::vector<std::int32_t>(n, fresh), 64}},
                    true, bf16, h.hq, h.hkv, d, s, rows, copy);
      }
    }
    // Windowed decode reads only its window: time against the window's length (Mistral-like
    // 32/8 heads, 8 sequences of 32k).
    for (std::int64_t w : {-1, 8191, 4095, 1023, 255}) {
      g_paged_window = w;
      PagedShape sh{"8x32768", std::vector<std::int32_t>(8, 32767), std::vector<std::int32_t>(8, 1), 16};
      bench_paged({sh}, false, bf16, 32, 8, d, s, rows, copy);
    }
    g_paged_window = -1;
  }

  if (!json.empty()) {
    std::ofstream out(json);
    out << "{\"device\": \"" << json_escape(prop.name) << "\", \"ragged_lengths\": [";
    for (std::size_t i = 0; i < g_ragged_lengths.size(); ++i) out << (i ? ", " : "") << g_ragged_lengths[i];
    out << "], \"results\": [\n";
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
