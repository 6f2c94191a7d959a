// Benchmark: inputs made on the device from a seed (nothing moves over the network), every
// variant timed with CUDA events (or the CPU clock) on the serving device's worker, and its
// outputs checked at sampled positions against float64 sums of the same seeded inputs.
// Echo: the transport baseline.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "attn/hash_uniform.h"
#include "attn_service.h"

namespace attn::server {
namespace {

using Clock = std::chrono::steady_clock;

// Resident buffers of one benchmark, freed at the end.
struct Buffers {
  Executor& ex;
  std::vector<void*> ptrs;
  ~Buffers() {
    for (void* p : ptrs) ex.deallocate(p);
  }
  Result<TensorView> make(DType dtype, const Shape& shape, std::uint64_t seed, bool fill) {
    const std::size_t bytes = static_cast<std::size_t>(element_count(shape)) * element_size(dtype);
    ATTN_ASSIGN_OR_RETURN(p, ex.allocate(bytes));
    ptrs.push_back(p);
    if (fill) ATTN_RETURN_IF_ERROR(ex.fill_random(p, dtype, element_count(shape), seed));
    return TensorView{dtype, shape, p, ex.resident_kind()};
  }
};

// NaN in every element (all-ones bits are NaN in all three dtypes): a variant that skips an
// element cannot pass the check.
Status poison(Executor& ex, const TensorView& v) {
  const std::vector<unsigned char> ones(std::min<std::size_t>(v.bytes(), 1 << 20), 0xFF);
  for (std::size_t off = 0; off < v.bytes(); off += ones.size())
    ATTN_RETURN_IF_ERROR(ex.write(v.data, off, ones.data(), std::min(ones.size(), v.bytes() - off)));
  return Status::Ok();
}

// The seeded input value at `i`, rounded to the dtype as the device stored it.
double seeded(std::uint64_t seed, std::int64_t i, DType dtype) {
  unsigned char tmp[4];
  store_from_float(tmp, dtype, 0, uniform_from_hash(seed, static_cast<std::uint64_t>(i)));
  return load_as_float(tmp, dtype, 0);
}

Result<double> element(Executor& ex, const TensorView& v, std::int64_t i) {
  unsigned char tmp[4];
  const std::size_t size = element_size(v.dtype);
  ATTN_RETURN_IF_ERROR(ex.read(tmp, v.data, static_cast<std::size_t>(i) * size, size));
  return load_as_float(tmp, v.dtype, 0);
}

struct ErrorSum {
  double diff = 0, ref = 0;
  bool finite = true;
  void add(double got, double want) {
    finite &= std::isfinite(got);
    diff += (got - want) * (got - want);
    ref += want * want;
  }
  double relative() const { return finite ? std::sqrt(diff / std::max(ref, 1e-300)) : INFINITY; }
};

constexpr std::uint64_t kSeedA = 11, kSeedB = 12, kSeedC = 13;

Result<double> check(Executor& ex, const MatmulArgs& a, std::mt19937_64& rng) {
  const auto d = matmul_dims(a.a, a.b, false, false).value();
  ErrorSum e;
  for (int s = 0; s < 48; ++s) {
    const std::int64_t b = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.batch));
    const std::int64_t i = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.m));
    const std::int64_t j = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.n));
    double want = 0;
    const std::int64_t b_off = d.b_batched ? b * d.k * d.n : 0;
    for (std::int64_t k = 0; k < d.k; ++k)
      want += seeded(kSeedA, (b * d.m + i) * d.k + k, a.a.dtype) * seeded(kSeedB, b_off + k * d.n + j, a.b.dtype);
    ATTN_ASSIGN_OR_RETURN(got, element(ex, a.c, (b * d.m + i) * d.n + j));
    e.add(got, want);
  }
  return e.relative();
}

Result<double> check(Executor& ex, const SoftmaxArgs& a, std::mt19937_64& rng) {
  const auto d = softmax_dims(a.x).value();
  ErrorSum e;
  std::vector<unsigned char> row(static_cast<std::size_t>(d.cols) * element_size(a.y.dtype));
  for (int s = 0; s < 6; ++s) {
    const std::int64_t r = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.rows));
    std::vector<double> x(static_cast<std::size_t>(d.cols));
    double mx = -INFINITY, sum = 0;
    for (std::int64_t c = 0; c < d.cols; ++c) mx = std::max(mx, x[c] = seeded(kSeedA, r * d.cols + c, a.x.dtype));
    for (auto& v : x) sum += (v = std::exp(v - mx));
    ATTN_RETURN_IF_ERROR(ex.read(row.data(), a.y.data, static_cast<std::size_t>(r * d.cols) * element_size(a.y.dtype),
                                 row.size()));
    for (std::int64_t c = 0; c < d.cols; ++c) e.add(load_as_float(row.data(), a.y.dtype, c), x[c] / sum);
  }
  return e.relative();
}

Result<double> check(Executor& ex, const AttentionArgs& a, std::mt19937_64& rng) {
  const auto d = attention_dims(a.q, a.k, a.v).value();
  ErrorSum e;
  std::vector<unsigned char> row(static_cast<std::size_t>(d.head_dim) * element_size(a.o.dtype));
  for (int s = 0; s < 4; ++s) {
    const std::int64_t b = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.batch));
    const std::int64_t h = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.heads_q));
    const std::int64_t i = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(d.len_q));
    const std::int64_t hk = h / (d.heads_q / d.heads_kv), D = d.head_dim;
    std::vector<double> q(static_cast<std::size_t>(D)), p(static_cast<std::size_t>(d.len_kv)), o(static_cast<std::size_t>(D), 0.0);
    for (std::int64_t c = 0; c < D; ++c) q[c] = seeded(kSeedA, ((b * d.heads_q + h) * d.len_q + i) * D + c, a.q.dtype);
    double mx = -INFINITY, sum = 0;
    for (std::int64_t j = 0; j < d.len_kv; ++j) {
      if (a.causal && !causal_visible(i, j, d.len_q, d.len_kv)) {
        p[j] = -INFINITY;
        continue;
      }
      double dot = 0;
      for (std::int64_t c = 0; c < D; ++c) dot += q[c] * seeded(kSeedB, ((b * d.heads_kv + hk) * d.len_kv + j) * D + c, a.k.dtype);
      mx = std::max(mx, p[j] = dot * a.scale);
    }
    for (std::int64_t j = 0; j < d.len_kv; ++j) {
      if (p[j] == -INFINITY) continue;
      const double w = std::exp(p[j] - mx);
      sum += w;
      for (std::int64_t c = 0; c < D; ++c) o[c] += w * seeded(kSeedC, ((b * d.heads_kv + hk) * d.len_kv + j) * D + c, a.v.dtype);
    }
    ATTN_RETURN_IF_ERROR(ex.read(row.data(), a.o.data,
                                 static_cast<std::size_t>(((b * d.heads_q + h) * d.len_q + i) * D) * element_size(a.o.dtype),
                                 row.size()));
    for (std::int64_t c = 0; c < D; ++c) e.add(load_as_float(row.data(), a.o.dtype, c), sum > 0 ? o[c] / sum : 0.0);
  }
  return e.relative();
}

double tolerance(DType t) { return t == DType::kFloat32 ? 1e-4 : 2e-2; }

std::int64_t percentile(std::vector<std::int64_t> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

// Times every chosen variant of one op on `ex` with the prepared resident args.
template <class Args>
void time_variants(Executor& ex, const OpRegistry<Args>& registry, Args& args, const TensorView& out,
                   const v1::BenchmarkRequest& req, v1::BenchmarkResponse* resp) {
  const int iterations = req.iterations() > 0 ? req.iterations() : 20;
  const int warmup = req.warmup() > 0 ? req.warmup() : 3;
  std::mt19937_64 rng(std::random_device{}());
  for (const auto& v : registry.variants()) {
    const bool named = std::find(req.kernels().begin(), req.kernels().end(), v.info.name) != req.kernels().end();
    if (req.kernels_size() > 0 && !named) continue;
    Status ok = available_on(v.info, ex.target());
    if (ok.ok()) ok = v.supports(args);
    if (!ok.ok()) {
      if (named) {
        v1::BenchmarkResult* r = resp->add_results();
        r->set_kernel(v.info.name);
        r->set_device(ex.device().label());
        r->set_message(ok.message());
      }
      continue;
    }
    v1::BenchmarkResult* r = resp->add_results();
    r->set_kernel(v.info.name);
    r->set_device(ex.device().label());
    Status s = poison(ex, out);
    std::vector<std::int64_t> ns;
    for (int i = 0; s.ok() && i < warmup + iterations; ++i) {
      ExecTimings t;
      s = ex.execute(make_call(v, args), t);
      if (i >= warmup) ns.push_back(t.kernel_ns);
    }
    if (!s.ok()) {
      r->set_message(s.to_string());
      continue;
    }
    r->set_median_ns(percentile(ns, 0.5));
    r->set_p10_ns(percentile(ns, 0.1));
    r->set_p90_ns(percentile(ns, 0.9));
    const OpCost c = cost_of(args);
    const double median = static_cast<double>(std::max<std::int64_t>(r->median_ns(), 1));
    r->set_tflops(static_cast<double>(c.flops) / median / 1e3);
    r->set_gbps(static_cast<double>(c.bytes) / median);
    auto error = check(ex, args, rng);
    if (!error.ok()) {
      r->set_message("check: " + error.status().to_string());
      continue;
    }
    r->set_error(*error);
    r->set_correct(*error <= tolerance(out.dtype));
    if (!r->correct()) r->set_message("sampled outputs off by " + std::to_string(*error) + " (relative)");
  }
}

Status run_benchmark(Executor& ex, const Registry& registry, const v1::BenchmarkRequest& req,
                     v1::BenchmarkResponse* resp) {
  const DType dt = *wire::from_proto(req.dtype());
  const Shape shape(req.shape().begin(), req.shape().end());
  Buffers buf{ex, {}};
  if (req.op() == "matmul") {
    const bool batched = shape.size() == 4;
    const std::int64_t B = batched ? shape[0] : 1, M = shape[batched], K = shape[batched + 1], N = shape[batched + 2];
    ATTN_ASSIGN_OR_RETURN(a, buf.make(dt, batched ? Shape{B, M, K} : Shape{M, K}, kSeedA, true));
    ATTN_ASSIGN_OR_RETURN(b, buf.make(dt, batched ? Shape{B, K, N} : Shape{K, N}, kSeedB, true));
    ATTN_ASSIGN_OR_RETURN(c, buf.make(dt, batched ? Shape{B, M, N} : Shape{M, N}, 0, false));
    MatmulArgs args{a, b, c};
    time_variants(ex, registry.matmul, args, c, req, resp);
  } else if (req.op() == "softmax") {
    ATTN_ASSIGN_OR_RETURN(x, buf.make(dt, shape, kSeedA, true));
    ATTN_ASSIGN_OR_RETURN(y, buf.make(dt, shape, 0, false));
    SoftmaxArgs args{x, y};
    time_variants(ex, registry.softmax, args, y, req, resp);
  } else {
    const std::int64_t hkv = req.kv_heads() ? req.kv_heads() : shape[1], sk = req.kv_len() ? req.kv_len() : shape[2];
    ATTN_ASSIGN_OR_RETURN(q, buf.make(dt, shape, kSeedA, true));
    ATTN_ASSIGN_OR_RETURN(k, buf.make(dt, {shape[0], hkv, sk, shape[3]}, kSeedB, true));
    ATTN_ASSIGN_OR_RETURN(v, buf.make(dt, {shape[0], hkv, sk, shape[3]}, kSeedC, true));
    ATTN_ASSIGN_OR_RETURN(o, buf.make(dt, shape, 0, false));
    AttentionArgs args{q, k, v, o, {}, req.causal(), resolve_attention_scale(0.0f, shape[3])};
    time_variants(ex, registry.attention, args, o, req, resp);
  }
  return Status::Ok();
}

// Everything about the request that can be checked before any memory is taken.
Status validate(const v1::BenchmarkRequest& req, const Registry& registry, const wire::TensorLimits& limits) {
  const auto dt = wire::from_proto(req.dtype());
  if (!dt) return invalid_argument("dtype: expected FLOAT32, FLOAT16 or BFLOAT16, got " + v1::DType_Name(req.dtype()));
  const Shape shape(req.shape().begin(), req.shape().end());
  // Each tensor the benchmark makes must respect the server's element limit.
  auto within = [&](const Shape& s, const char* what) -> Status {
    ATTN_ASSIGN_OR_RETURN(count, checked_element_count(s, "shape"));
    if (count > limits.max_elements) {
      return resource_exhausted(std::string("shape: ") + what + " would have " + std::to_string(count) +
                                " elements, over this server's limit of " + std::to_string(limits.max_elements));
    }
    return Status::Ok();
  };
  for (auto d : shape)
    if (d < 1) return invalid_argument("shape: expected dims >= 1, got " + shape_to_string(shape));
  if (req.op() == "matmul") {
    if (shape.size() != 3 && shape.size() != 4) {
      return invalid_argument("shape: expected [M, K, N] or [B, M, K, N] for matmul, got " + shape_to_string(shape));
    }
    const bool b = shape.size() == 4;
    const std::int64_t B = b ? shape[0] : 1, M = shape[b], K = shape[b + 1], N = shape[b + 2];
    ATTN_RETURN_IF_ERROR(within({B, M, K}, "A"));
    ATTN_RETURN_IF_ERROR(within({B, K, N}, "B"));
    ATTN_RETURN_IF_ERROR(within({B, M, N}, "C"));
  } else if (req.op() == "softmax") {
    ATTN_RETURN_IF_ERROR(within(shape, "X"));
    if (shape.empty()) return invalid_argument("shape: expected at least one dimension, got none");
  } else if (req.op() == "attention") {
    if (shape.size() != 4) return invalid_argument("shape: expected [B, Hq, Sq, D] for attention, got " + shape_to_string(shape));
    ATTN_RETURN_IF_ERROR(within(shape, "Q"));
    if (req.kv_heads() < 0 || req.kv_len() < 0) return invalid_argument("kv_heads, kv_len: expected >= 0");
    const std::int64_t hkv = req.kv_heads() ? req.kv_heads() : shape[1];
    if (shape[1] % hkv != 0) {
      return invalid_argument("kv_heads: expected a divisor of Hq = " + std::to_string(shape[1]) + ", got " +
                              std::to_string(hkv));
    }
    const std::int64_t sk = req.kv_len() ? req.kv_len() : shape[2];
    ATTN_ASSIGN_OR_RETURN(kv, checked_element_count({shape[0], hkv, sk, shape[3]}, "kv_len"));
    if (kv > limits.max_elements) return resource_exhausted("kv_len: K and V would be over this server's element limit");
  } else {
    return invalid_argument("op: expected \"matmul\", \"softmax\" or \"attention\", got \"" + req.op() + "\"");
  }
  if (req.iterations() < 0 || req.iterations() > 1000) {
    return invalid_argument("iterations: expected 0 (20) to 1000, got " + std::to_string(req.iterations()));
  }
  if (req.warmup() < 0 || req.warmup() > 100) {
    return invalid_argument("warmup: expected 0 (3) to 100, got " + std::to_string(req.warmup()));
  }
  for (const std::string& k : req.kernels()) {
    bool known = false;
    for (const VariantInfo* v : registry.all()) known |= v->name == k && op_name(v->op) == req.op();
    if (!known) return not_found("kernels: no " + req.op() + " variant \"" + k + "\" (see ListKernels)");
  }
  return Status::Ok();
}

}  // namespace

grpc::ServerUnaryReactor* AttnService::Benchmark(grpc::CallbackServerContext* ctx, const v1::BenchmarkRequest* req,
                                                 v1::BenchmarkResponse* resp) {
  if (auto* refused = refuse_unauthenticated(ctx, "benchmark", 0)) return refused;
  auto* reactor = ctx->DefaultReactor();
  Status valid = validate(*req, registry_, decode_.limits);
  if (!valid.ok()) {
    finish(reactor, ctx, "benchmark", "", valid, nullptr, 0, 0);
    return reactor;
  }
  // The serving backend's least loaded device, on its worker: the timings are not shared.
  std::size_t executor = 0;
  std::size_t best = SIZE_MAX;
  for (std::size_t i = 0; i < scheduler_.executors().size(); ++i) {
    if (scheduler_.executors()[i]->target().backend != decode_.targets.front().backend) continue;
    if (scheduler_.load(i) < best) best = scheduler_.load(i), executor = i;
  }
  Scheduler::Job job;
  job.abandoned = [ctx] {
    if (ctx->IsCancelled()) return cancelled("the caller cancelled the benchmark while it waited");
    return Status::Ok();
  };
  job.drop = [=, this](const Status& why) { finish(reactor, ctx, "benchmark", "", why, nullptr, 0, 0); };
  job.run = [=, this](Executor& ex, std::int64_t) {
    const Status s = run_benchmark(ex, registry_, *req, resp);
    device_faulted(ex, "benchmark", s);
    finish(reactor, ctx, "benchmark", "", s, nullptr, 0, 0);
  };
  const Status queued = scheduler_.submit_to(executor, std::move(job));
  if (!queued.ok()) finish(reactor, ctx, "benchmark", "", queued, nullptr, 0, 0);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::Echo(grpc::CallbackServerContext* ctx, const v1::EchoRequest* req,
                                            v1::EchoResponse* resp) {
  const auto start = Clock::now();
  if (auto* refused = refuse_unauthenticated(ctx, "echo", req->ByteSizeLong())) return refused;
  auto* reactor = ctx->DefaultReactor();
  resp->set_payload(req->payload());
  resp->set_server_ns(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count());
  finish(reactor, ctx, "echo", "", Status::Ok(), nullptr, req->payload().size(), req->payload().size());
  return reactor;
}

}  // namespace attn::server
