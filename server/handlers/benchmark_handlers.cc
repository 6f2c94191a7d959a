// Benchmark: inputs made on the device from a seed (nothing moves over the network), every
// variant timed with CUDA events (or the CPU clock) on the serving device's worker, and its
// outputs checked at sampled positions against float64 sums of the same seeded inputs.
// Echo: the transport baseline.
#include "handlers/benchmark_handlers.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "attn/hash_uniform.h"
#include "reference.h"

namespace attn::server {
namespace {

// Whether `name` is a one-shot op ("matmul", ...), and all their names quoted, for messages.
bool known_op(const std::string& name) {
  bool known = false;
  for_each_op([&](auto desc) { known |= name == decltype(desc)::kName; });
  return known;
}

std::string op_names() {
  std::string names;
  for_each_op([&](auto desc) {
    names += (names.empty() ? "\"" : ", \"") + std::string(decltype(desc)::kName) + "\"";
  });
  return names;
}

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
    ATTN_RETURN_IF_ERROR(
        ex.write(v.data, off, ones.data(), std::min(ones.size(), v.bytes() - off)));
  return Status::Ok();
}

// The seeds of the inputs: input i is filled from kFirstSeed + i.
constexpr std::uint64_t kFirstSeed = 11;

// The seeded input value at `i`, rounded to the dtype as the device stored it.
double seeded(std::uint64_t seed, std::int64_t i, DType dtype) {
  unsigned char tmp[4];
  store_from_float(tmp, dtype, 0, uniform_from_hash(seed, static_cast<std::uint64_t>(i)));
  return load_as_float(tmp, dtype, 0);
}

// The float64 reference at sampled positions, the inputs recomputed from their seeds and the
// output read back from the device.
template <class Args>
Result<reference::SampledCheck> check(Executor& ex, Args& args, std::mt19937_64& rng) {
  std::vector<reference::Elements> inputs;
  std::uint64_t seed = kFirstSeed;
  for (const TensorView* in : OpDesc<Args>::inputs(args))
    inputs.push_back(
        [seed = seed++, dtype = in->dtype](std::int64_t i) { return seeded(seed, i, dtype); });
  const TensorView out = *OpDesc<Args>::outputs(args).front();
  std::vector<unsigned char> bytes;
  auto read = [&](std::int64_t first, std::int64_t count, std::vector<double>& values) -> Status {
    const std::size_t size = element_size(out.dtype);
    bytes.resize(static_cast<std::size_t>(count) * size);
    ATTN_RETURN_IF_ERROR(
        ex.read(bytes.data(), out.data, static_cast<std::size_t>(first) * size, bytes.size()));
    values.resize(static_cast<std::size_t>(count));
    for (std::int64_t i = 0; i < count; ++i)
      values[static_cast<std::size_t>(i)] =
          load_as_float(bytes.data(), out.dtype, static_cast<std::size_t>(i));
    return Status::Ok();
  };
  return reference::sampled_error(args, inputs, read, rng);
}

std::int64_t percentile(std::vector<std::int64_t> v, double q) {
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(q * static_cast<double>(v.size() - 1) + 0.5)];
}

// Times every chosen variant of one op on `ex` with the prepared resident args.
template <class Args>
void time_variants(Executor& ex, const OpRegistry<Args>& registry, Args& args,
                   const v1::BenchmarkRequest& req, v1::BenchmarkResponse* resp) {
  const int iterations = req.iterations() > 0 ? req.iterations() : 20;
  const int warmup = req.warmup() > 0 ? req.warmup() : 3;
  std::mt19937_64 rng(std::random_device{}());
  for (const auto& v : registry.variants()) {
    const bool named =
        std::find(req.kernels().begin(), req.kernels().end(), v.info.name) != req.kernels().end();
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
    Status s = Status::Ok();
    for (const TensorView* out : OpDesc<Args>::outputs(args))
      if (s.ok()) s = poison(ex, *out);
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
    auto checked = check(ex, args, rng);
    if (!checked.ok()) {
      r->set_message("check: " + checked.status().to_string());
      continue;
    }
    r->set_error(checked->error);
    r->set_correct(checked->passed());
    if (!r->correct()) {
      r->set_message("sampled outputs off by " + std::to_string(checked->error) +
                     " (relative; tolerance " + std::to_string(checked->tolerance) + ")");
    }
  }
}

ProblemSpec spec_of(const v1::BenchmarkRequest& req, DType dtype) {
  ProblemSpec spec{dtype, Shape(req.shape().begin(), req.shape().end())};
  spec.kv_heads = req.kv_heads();
  spec.kv_len = req.kv_len();
  spec.causal = req.causal();
  spec.window_left = req.has_window_left() ? req.window_left() : -1;
  spec.window_right = req.has_window_right() ? req.window_right() : -1;
  spec.softcap = req.softcap();
  return spec;
}

// Everything about the request that can be checked before any memory is taken: its op's
// problem, and each tensor it would make against the element limit.
template <class Args>
Result<Problem<Args>> problem_of(const v1::BenchmarkRequest& req,
                                 const wire::TensorLimits& limits) {
  ATTN_ASSIGN_OR_RETURN(dtype, wire::dtype_from_proto(req.dtype(), "dtype"));
  ATTN_ASSIGN_OR_RETURN(problem, OpDesc<Args>::problem(spec_of(req, dtype)));
  for (const auto* list : {&problem.inputs, &problem.outputs})
    for (const TensorSpec& t : *list)
      ATTN_RETURN_IF_ERROR(limits.check(t.shape, "shape (" + t.name + ")").status());
  return problem;
}

// Makes the problem's tensors on `ex` (inputs from their seeds, outputs uninitialized), times the
// variants and frees the tensors.
template <class Args>
Status run_benchmark(Executor& ex, const OpRegistry<Args>& registry, const Problem<Args>& problem,
                     const v1::BenchmarkRequest& req, v1::BenchmarkResponse* resp) {
  Buffers buffers{ex, {}};
  std::vector<TensorView> in, out;
  for (const TensorSpec& t : problem.inputs) {
    ATTN_ASSIGN_OR_RETURN(view, buffers.make(t.dtype, t.shape, kFirstSeed + in.size(), true));
    in.push_back(view);
  }
  for (const TensorSpec& t : problem.outputs) {
    ATTN_ASSIGN_OR_RETURN(view, buffers.make(t.dtype, t.shape, 0, false));
    out.push_back(view);
  }
  Args args = problem.bind(in, out);
  time_variants(ex, registry, args, req, resp);
  return Status::Ok();
}

Status known_kernels(const v1::BenchmarkRequest& req, const Registry& registry) {
  for (const std::string& k : req.kernels()) {
    bool known = false;
    for (const VariantInfo* v : registry.all()) known |= v->name == k && op_name(v->op) == req.op();
    if (!known)
      return not_found("kernels: no " + req.op() + " variant \"" + k + "\" (see ListKernels)");
  }
  return Status::Ok();
}

Status check_counts(const v1::BenchmarkRequest& req) {
  if (req.iterations() < 0 || req.iterations() > 1000) {
    return invalid_argument("iterations: expected 0 (20) to 1000, got " +
                            std::to_string(req.iterations()));
  }
  if (req.warmup() < 0 || req.warmup() > 100) {
    return invalid_argument("warmup: expected 0 (3) to 100, got " + std::to_string(req.warmup()));
  }
  return Status::Ok();
}

}  // namespace

grpc::ServerUnaryReactor* BenchmarkHandlers::Benchmark(CallContext& call,
                                                       const v1::BenchmarkRequest* req,
                                                       v1::BenchmarkResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  // The op's problem, checked now, before any memory is taken.
  Status valid =
      known_op(req->op())
          ? Status::Ok()
          : invalid_argument("op: expected " + op_names() + ", got \"" + req->op() + "\"");
  std::function<Status(Executor&)> run;
  for_each_op([&](auto desc) {
    using Args = typename decltype(desc)::Args;
    if (!valid.ok() || req->op() != decltype(desc)::kName) return;
    auto problem = problem_of<Args>(*req, core_.requests.limits);
    if (!problem.ok()) {
      valid = problem.status();
      return;
    }
    run = [this, req, resp, problem = std::move(problem).value()](Executor& ex) {
      return run_benchmark(ex, core_.registry.of<Args>(), problem, *req, resp);
    };
  });
  if (valid.ok()) valid = check_counts(*req);
  if (valid.ok()) valid = known_kernels(*req, core_.registry);
  if (!valid.ok()) {
    core_.finish(call, reactor, "", valid, nullptr, 0);
    return reactor;
  }
  // On the serving backend's least loaded device, on its worker: the timings are not shared.
  Placement placement;
  placement.backend = core_.serving_backend();
  core_.submit(call, reactor, "", placement, [=, this, &call](Executor& ex, std::int64_t) {
    const Status s = run(ex);
    core_.device_faulted(ex, "benchmark", s);
    core_.finish(call, reactor, "", s, nullptr, 0);
  });
  return reactor;
}

grpc::ServerUnaryReactor* BenchmarkHandlers::Echo(CallContext& call, const v1::EchoRequest* req,
                                                  v1::EchoResponse* resp) {
  const auto start = Clock::now();
  auto* reactor = call.grpc->DefaultReactor();
  resp->set_payload(req->payload());
  resp->set_server_ns(
      std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count());
  core_.finish(call, reactor, "", Status::Ok(), nullptr, req->payload().size());
  return reactor;
}

}  // namespace attn::server
