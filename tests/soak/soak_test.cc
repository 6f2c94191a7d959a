// Soak: 32 concurrent clients against the real attnd for a bounded time, mixing valid calls,
// invalid ones, calls cancelled in flight and calls with tiny deadlines. Afterwards every valid
// response that came back was correct, refusals had the expected codes, the server still answers
// health checks, and its resident memory is back near where it was after warm-up.
// ATTN_SOAK_SECONDS sets the length (default 30).
//
// Memory is judged the same way in both builds. Growth of the resident set after warm-up is
// bounded; under AddressSanitizer the server runs with a small quarantine (freed memory ASan holds
// back to catch use-after-free, 256 MiB by default, filled at whatever rate requests come) so that
// the quarantine is full after the warm-up and the same bound applies. A leak of memory nobody can
// reach also fails the sanitizer build at the server's exit (LeakSanitizer: exit code 23, not 0).
#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "reference.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using Clock = std::chrono::steady_clock;
using testing::random_tensor;

struct Tally {
  std::mutex mu;
  std::map<std::string, std::map<grpc::StatusCode, long>> by_kind;  // kind -> code -> count
  std::atomic<long> wrong{0};       // valid calls that returned wrong values
  std::atomic<long> unexpected{0};  // a code that this kind of call must never get
  std::vector<std::string> examples;

  void add(const std::string& kind, grpc::StatusCode code) {
    std::lock_guard lock(mu);
    ++by_kind[kind][code];
  }
  void flag(std::atomic<long>& counter, const std::string& what) {
    ++counter;
    std::lock_guard lock(mu);
    if (examples.size() < 10) examples.push_back(what);
  }
};

// Codes a valid call may get under this load: served, refused for a full queue, or (for the
// cancelled / tiny-deadline kinds) given up.
bool acceptable_for_valid(grpc::StatusCode c) {
  return c == grpc::StatusCode::OK || c == grpc::StatusCode::RESOURCE_EXHAUSTED ||
         c == grpc::StatusCode::CANCELLED || c == grpc::StatusCode::DEADLINE_EXCEEDED;
}

// The status tables' own name ("RESOURCE_EXHAUSTED").
std::string code_name(grpc::StatusCode c) { return status_code_name(static_cast<int>(c)); }

class Soaker {
 public:
  Soaker(const std::string& address, std::uint64_t seed, Tally& tally)
      : stub_(v1::AttnService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()))),
        rng_(seed),
        tally_(tally) {}

  void one() {
    const int pick = std::uniform_int_distribution<int>(0, 99)(rng_);
    if (pick < 25) return valid_matmul("valid", {});
    if (pick < 45) return valid_softmax("valid", {});
    if (pick < 55) return valid_attention();
    if (pick < 75) return invalid();
    if (pick < 88) return valid_softmax("cancelled", Mode::kCancel);
    return valid_matmul("tiny-deadline", Mode::kTinyDeadline);
  }

 private:
  enum class Mode { kNone, kCancel, kTinyDeadline };

  int dim(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  // Runs `call` with the mode's context; a cancel fires from another thread after 0-2 ms.
  template <class Fn>
  grpc::Status with_mode(Mode mode, Fn call) {
    grpc::ClientContext ctx;
    if (mode == Mode::kTinyDeadline)
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::microseconds(dim(100, 2000)));
    std::thread canceller;
    if (mode == Mode::kCancel) {
      const int us = dim(0, 2000);
      canceller = std::thread([&ctx, us] {
        std::this_thread::sleep_for(std::chrono::microseconds(us));
        ctx.TryCancel();
      });
    }
    const grpc::Status s = call(&ctx);
    if (canceller.joinable()) canceller.join();
    return s;
  }

  // `what`: the op, dtype and shapes, so that a wrong value can be reproduced.
  void check_valid(const std::string& kind, const std::string& what, const grpc::Status& s, double error,
                   double tol) {
    tally_.add(kind, s.error_code());
    if (!acceptable_for_valid(s.error_code()) ||
        (kind == "valid" && (s.error_code() == grpc::StatusCode::CANCELLED ||
                             s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED))) {
      tally_.flag(tally_.unexpected, kind + " call got " + code_name(s.error_code()) + ": " + s.error_message());
    } else if (s.ok() && !(error <= tol)) {  // NaN fails too
      tally_.flag(tally_.wrong, kind + " " + what + " returned values off by " + std::to_string(error));
    }
  }

  void valid_matmul(const std::string& kind, Mode mode) {
    const DType dt = dim(0, 1) ? DType::kFloat32 : DType::kBFloat16;
    Tensor a = random_tensor(dt, {dim(1, 70), dim(1, 70)}, rng_);
    Tensor b = random_tensor(dt, {a.shape()[1], dim(1, 70)}, rng_);
    v1::MatmulRequest req;
    wire::encode_tensor(a.view(), req.mutable_a());
    wire::encode_tensor(b.view(), req.mutable_b());
    v1::MatmulResponse resp;
    const grpc::Status s = with_mode(mode, [&](grpc::ClientContext* c) { return stub_->Matmul(c, req, &resp); });
    double error = 0;
    if (s.ok()) {
      auto c = wire::decode_tensor(resp.c(), "c", {});
      // A 1 x 1 result of a few cancelling products is off by their rounding, not its own.
      error = c.ok() ? reference::matmul_error(c->view, MatmulArgs{a.view(), b.view(), c->view}) : 1e9;
    }
    check_valid(kind, "matmul " + std::string(dtype_name(dt)) + " a" + shape_to_string(a.shape()) + " b" +
                          shape_to_string(b.shape()),
                s, error, reference::tolerance(dt));
  }

  void valid_softmax(const std::string& kind, Mode mode) {
    const DType dt = dim(0, 1) ? DType::kFloat32 : DType::kFloat16;
    Tensor x = random_tensor(dt, {dim(1, 40), dim(1, 1000)}, rng_);
    v1::SoftmaxRequest req;
    wire::encode_tensor(x.view(), req.mutable_x());
    v1::SoftmaxResponse resp;
    const grpc::Status s = with_mode(mode, [&](grpc::ClientContext* c) { return stub_->Softmax(c, req, &resp); });
    double error = 0;
    if (s.ok()) {
      auto y = wire::decode_tensor(resp.y(), "y", {});
      SoftmaxArgs args{x.view(), x.view()};
      error = y.ok() ? reference::relative_frobenius_error(y->view, reference::softmax(args)) : 1e9;
    }
    check_valid(kind, "softmax " + std::string(dtype_name(dt)) + " x" + shape_to_string(x.shape()), s, error,
                reference::tolerance(dt));
  }

  void valid_attention() {
    const std::int64_t hkv = dim(1, 2), sq = dim(1, 40), sk = dim(1, 70);
    Tensor q = random_tensor(DType::kFloat32, {1, hkv * 2, sq, 64}, rng_);
    Tensor k = random_tensor(DType::kFloat32, {1, hkv, sk, 64}, rng_);
    Tensor v = random_tensor(DType::kFloat32, {1, hkv, sk, 64}, rng_);
    v1::AttentionRequest req;
    wire::encode_tensor(q.view(), req.mutable_q());
    wire::encode_tensor(k.view(), req.mutable_k());
    wire::encode_tensor(v.view(), req.mutable_v());
    req.set_causal(dim(0, 1) == 1);
    v1::AttentionResponse resp;
    grpc::ClientContext ctx;
    const grpc::Status s = stub_->Attention(&ctx, req, &resp);
    double error = 0;
    if (s.ok()) {
      auto o = wire::decode_tensor(resp.o(), "o", {});
      AttentionArgs args{q.view(), k.view(), v.view(), q.view(), {}, req.causal(), 0.125f};
      error = o.ok() ? reference::relative_frobenius_error(o->view, reference::attention(args)) : 1e9;
    }
    check_valid("valid",
                "attention float32 q" + shape_to_string(q.shape()) + " k" + shape_to_string(k.shape()) +
                    (req.causal() ? " causal" : ""),
                s, error, reference::tolerance(DType::kFloat32));
  }

  // Requests with one thing wrong; each must be refused with its code and nothing else.
  void invalid() {
    v1::SoftmaxRequest req;
    Tensor x = random_tensor(DType::kFloat32, {dim(1, 8), dim(1, 64)}, rng_);
    wire::encode_tensor(x.view(), req.mutable_x());
    grpc::StatusCode want = grpc::StatusCode::INVALID_ARGUMENT;
    switch (dim(0, 4)) {
      case 0: req.mutable_x()->mutable_data()->pop_back(); break;               // byte count
      case 1: req.mutable_x()->set_dtype(v1::D_TYPE_UNSPECIFIED); break;         // dtype
      case 2: req.mutable_x()->set_shape(0, -3); break;                          // a negative dim
      case 3: req.set_kernel("softmax/does_not_exist"); break;                   // unknown variant
      case 4: req.mutable_x()->add_values(1.0f); break;                          // data and values
    }
    v1::SoftmaxResponse resp;
    grpc::ClientContext ctx;
    const grpc::Status s = stub_->Softmax(&ctx, req, &resp);
    tally_.add("invalid", s.error_code());
    if (s.error_code() != want && s.error_code() != grpc::StatusCode::NOT_FOUND)
      tally_.flag(tally_.unexpected, std::string("invalid call got ") + code_name(s.error_code()) + ": " + s.error_message());
  }

  std::unique_ptr<v1::AttnService::Stub> stub_;
  std::mt19937_64 rng_;
  Tally& tally_;
};

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ATTN_SOAK_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define ATTN_SOAK_ASAN 1
#endif

// Under ASan: the quarantine the soak's server runs with, in MiB (the bound allows for it).
#ifdef ATTN_SOAK_ASAN
constexpr std::int64_t kQuarantineMiB = 16;
#else
constexpr std::int64_t kQuarantineMiB = 0;
#endif

testing::ServerProcessOptions soak_server_options() {
  testing::ServerProcessOptions o;
  if (kQuarantineMiB > 0) {
    const char* inherited = std::getenv("ASAN_OPTIONS");
    std::string options = inherited ? inherited : "";
    // Freed blocks go to the global quarantine in small per-thread batches, so a thread's share
    // is small too; detect_leaks stays as the preset set it (on).
    options += (options.empty() ? "" : ":") + std::string("quarantine_size_mb=") + std::to_string(kQuarantineMiB) +
               ":thread_local_quarantine_size_kb=64";
    o.env.emplace_back("ASAN_OPTIONS", options);
  }
  return o;
}

bool healthy(const std::string& address) {
  auto stub = grpc::health::v1::Health::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  grpc::health::v1::HealthCheckResponse resp;
  return stub->Check(&ctx, {}, &resp).ok() && resp.status() == grpc::health::v1::HealthCheckResponse::SERVING;
}

TEST(Soak, ThirtyTwoClientsMixedTrafficStaysCorrectAndBounded) {
  const char* env = std::getenv("ATTN_SOAK_SECONDS");
  const int seconds = env ? std::atoi(env) : 30;
  constexpr int kClients = 32;
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--queue-depth", "16", "--log-level", "error"},
                                soak_server_options());

  Tally warm_tally, tally;
  auto run_for = [&](std::chrono::seconds length, Tally& t) {
    std::vector<std::thread> threads;
    const auto until = Clock::now() + length;
    for (int i = 0; i < kClients; ++i)
      threads.emplace_back([&, i] {
        Soaker s(server.address(), testing::seed() * 131 + i, t);
        while (Clock::now() < until) s.one();
      });
    for (auto& th : threads) th.join();
  };
  // Warm-up: thread pools, allocator arenas and channels reach their working size.
  run_for(std::chrono::seconds(3), warm_tally);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const std::int64_t rss_before = server.rss_bytes();
  run_for(std::chrono::seconds(seconds), tally);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const std::int64_t rss_after = server.rss_bytes();

  long total = 0;
  // Allocator caches and thread stacks settle within a quarter of the warmed-up size plus 32 MiB
  // (seen: < 10 MiB of growth over 30 s in the release build); ASan's quarantine was already full.
  const std::int64_t rss_bound = rss_before + rss_before / 4 + (32 << 20);
  std::printf("soak: %d clients, %d s, seed %llu, server RSS after warm-up %.1f MiB, after the soak %.1f MiB "
              "(bound %.1f MiB%s)\n",
              kClients, seconds, static_cast<unsigned long long>(testing::seed()), rss_before / 1048576.0,
              rss_after / 1048576.0, rss_bound / 1048576.0,
              kQuarantineMiB > 0 ? ", ASan quarantine 16 MiB, leaks judged by LeakSanitizer at exit" : "");
  for (const auto& [kind, codes] : tally.by_kind)
    for (const auto& [code, n] : codes) {
      std::printf("soak:   %-14s %-19s %ld\n", kind.c_str(), code_name(code).c_str(), n);
      total += n;
    }
  std::printf("soak: %ld requests (%.0f/s), %ld wrong values, %ld unexpected codes\n", total,
              static_cast<double>(total) / seconds, tally.wrong.load(), tally.unexpected.load());
  for (const auto& e : tally.examples) std::printf("soak: e.g. %s\n", e.c_str());

  EXPECT_EQ(tally.wrong.load(), 0);
  EXPECT_EQ(tally.unexpected.load(), 0);
  EXPECT_GT(tally.by_kind["valid"][grpc::StatusCode::OK], 0);
  EXPECT_GT(tally.by_kind["invalid"][grpc::StatusCode::INVALID_ARGUMENT], 0);
  EXPECT_TRUE(healthy(server.address())) << server.log();
  // Memory back near where it was: no growth with the number of requests served.
  EXPECT_LT(rss_after, rss_bound) << "RSS grew from " << rss_before << " to " << rss_after;
  // Under ASan, LeakSanitizer runs at the exit and turns a leak into exit code 23.
  EXPECT_EQ(server.stop(SIGTERM), 0) << server.log();
}

}  // namespace
}  // namespace attn
