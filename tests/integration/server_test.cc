// The real attnd process on a loopback port, called over gRPC: every RPC, every bad input, the
// standard health and reflection services, limits and graceful shutdown.
#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "reference.h"
#include "reflection/v1alpha/reflection.grpc.pb.h"
#include "support/random.h"
#include "support/server_process.h"
#include "support/server_load.h"
#include "support/slow_call.h"

namespace attn {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using testing::random_tensor;

class ServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { server_ = new testing::ServerProcess(ATTND_PATH); }
  static void TearDownTestSuite() {
    delete server_;
    server_ = nullptr;
  }
  void TearDown() override {
    // Whatever a test sent, the server still answers a valid call.
    Tensor x = Tensor::from_floats(DType::kFloat32, {2}, {0.0f, 0.0f});
    auto r = client_.softmax(x);
    ASSERT_TRUE(r.ok()) << "server stopped serving: " << r.status().to_string() << "\n"
                        << server_->log();
    EXPECT_FLOAT_EQ(r->output.get(0), 0.5f);
  }

  // Sends a raw request and returns the gRPC status.
  template <class Req, class Resp>
  grpc::Status call(grpc::Status (v1::AttnService::Stub::*method)(grpc::ClientContext*, const Req&,
                                                                  Resp*),
                    const Req& req) {
    grpc::ClientContext ctx;
    Resp resp;
    return (client_.stub().*method)(&ctx, req, &resp);
  }

  static testing::ServerProcess* server_;
  Client client_{server_->address()};
  std::mt19937_64 rng{testing::seed()};
};

testing::ServerProcess* ServerTest::server_ = nullptr;

void set_tensor(v1::Tensor* t, v1::DType dtype, const Shape& shape) {
  t->set_dtype(dtype);
  for (auto d : shape) t->add_shape(d);
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  t->set_data(std::string(static_cast<std::size_t>(n) * (dtype == v1::D_TYPE_FLOAT32 ? 4 : 2), '\0'));
}

v1::MatmulRequest matmul_request(const Shape& a, const Shape& b, v1::DType dtype = v1::D_TYPE_FLOAT32) {
  v1::MatmulRequest req;
  set_tensor(req.mutable_a(), dtype, a);
  set_tensor(req.mutable_b(), dtype, b);
  return req;
}

v1::AttentionRequest attention_request(const Shape& q, const Shape& kv) {
  v1::AttentionRequest req;
  set_tensor(req.mutable_q(), v1::D_TYPE_BFLOAT16, q);
  set_tensor(req.mutable_k(), v1::D_TYPE_BFLOAT16, kv);
  set_tensor(req.mutable_v(), v1::D_TYPE_BFLOAT16, kv);
  return req;
}

#define EXPECT_REFUSED(status, code, ...)                              \
  do {                                                                 \
    const grpc::Status s_ = (status);                                  \
    EXPECT_EQ(s_.error_code(), grpc::StatusCode::code) << s_.error_message(); \
    EXPECT_THAT(s_.error_message(), AllOf(__VA_ARGS__));               \
  } while (0)

TEST_F(ServerTest, ServerInfoSaysCpuBackend) {
  auto info = client_.server_info();
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->backend(), "cpu");
  ASSERT_EQ(info->devices_size(), 1);
  EXPECT_EQ(info->devices(0).backend(), "cpu");
  EXPECT_THAT(info->devices(0).name(), HasSubstr("OpenBLAS"));  // which BLAS serves
  EXPECT_GT(info->devices(0).multiprocessors(), 0);
  EXPECT_GT(info->devices(0).memory_bytes(), 0);
  EXPECT_FALSE(info->version().empty());
  EXPECT_EQ(info->limits().max_message_bytes(), 1024LL << 20);
  EXPECT_GT(info->limits().max_elements(), 0);
  EXPECT_THAT(server_->log(), HasSubstr("with the cpu backend"));
}

TEST_F(ServerTest, ListKernels) {
  auto all = client_.list_kernels();
  ASSERT_TRUE(all.ok());
  std::set<std::string> available;
  for (const auto& k : all->kernels())
    if (k.available()) available.insert(k.name());
  EXPECT_TRUE(available.count("matmul/cpu_blocked"));
  EXPECT_TRUE(available.count("matmul/cpu_openblas"));
  EXPECT_TRUE(available.count("softmax/cpu"));
  EXPECT_TRUE(available.count("attention/cpu"));
  EXPECT_TRUE(available.count("attention/cpu_flash"));
  for (const auto& k : all->kernels()) {
    if (k.name() == "matmul/cpu_openblas" || k.name() == "attention/cpu_flash") {
      EXPECT_THAT(k.description(), HasSubstr("OpenBLAS")) << k.name();
    }
  }
  auto mm = client_.list_kernels("matmul");
  ASSERT_TRUE(mm.ok());
  for (const auto& k : mm->kernels()) EXPECT_EQ(k.op(), "matmul");
  v1::ListKernelsRequest bad;
  bad.set_op("conv");
  EXPECT_REFUSED(call(&v1::AttnService::Stub::ListKernels, bad), INVALID_ARGUMENT, HasSubstr("op"),
                 HasSubstr("conv"));
}

TEST_F(ServerTest, MatmulEveryDtypeAndTransposeIsCorrect) {
  for (DType dt : kAllDTypes)
    for (bool ta : {false, true})
      for (bool tb : {false, true}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " ta=" + std::to_string(ta) + " tb=" + std::to_string(tb));
        const std::int64_t m = 33, k = 70, n = 17;
        Tensor a = random_tensor(dt, ta ? Shape{k, m} : Shape{m, k}, rng);
        Tensor b = random_tensor(dt, tb ? Shape{n, k} : Shape{k, n}, rng);
        auto r = client_.matmul(a, b, {ta, tb, ""});
        ASSERT_TRUE(r.ok()) << r.status().to_string();
        EXPECT_EQ(r->output.shape(), (Shape{m, n}));
        EXPECT_EQ(r->output.dtype(), dt);
        MatmulArgs args{a.view(), b.view(), r->output.view(), ta, tb};
        EXPECT_LE(reference::relative_frobenius_error(r->output.view(), reference::matmul(args)),
                  reference::tolerance(dt));
        const auto& t = r->timings;
        EXPECT_EQ(t.kernel(), "matmul/cpu_openblas");
        EXPECT_THAT(t.device(), HasSubstr("cpu"));
        EXPECT_EQ(t.flops(), 2 * m * n * k);
        EXPECT_EQ(t.bytes(), static_cast<std::int64_t>((m * k + k * n + m * n) * element_size(dt)));
        EXPECT_GT(t.kernel_ns(), 0);
        EXPECT_GE(t.total_ns(), t.kernel_ns() + t.queue_ns());
        EXPECT_GT(t.parse_ns(), 0);
        EXPECT_LE(t.receive_ns() + t.parse_ns() + t.queue_ns() + t.kernel_ns() + t.finish_ns(),
                  t.total_ns());
      }
}

TEST_F(ServerTest, BatchedMatmulWithNamedKernel) {
  Tensor a = random_tensor(DType::kFloat32, {3, 7, 5}, rng), b = random_tensor(DType::kFloat32, {3, 5, 9}, rng);
  auto r = client_.matmul(a, b, {false, false, "matmul/cpu_blocked"});
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->output.shape(), (Shape{3, 7, 9}));
  MatmulArgs args{a.view(), b.view(), r->output.view()};
  EXPECT_LE(reference::relative_frobenius_error(r->output.view(), reference::matmul(args)), 1e-5);
}

TEST_F(ServerTest, SoftmaxWithJsonStyleValuesInAndOut) {
  v1::SoftmaxRequest req;
  req.mutable_x()->set_dtype(v1::D_TYPE_FLOAT16);
  req.mutable_x()->add_shape(2);
  req.mutable_x()->add_shape(3);
  for (float f : {1.0f, 2.0f, 3.0f, 0.0f, 0.0f, 0.0f}) req.mutable_x()->add_values(f);
  req.set_return_values(true);
  grpc::ClientContext ctx;
  v1::SoftmaxResponse resp;
  ASSERT_TRUE(client_.stub().Softmax(&ctx, req, &resp).ok());
  EXPECT_TRUE(resp.y().data().empty());
  ASSERT_EQ(resp.y().values_size(), 6);
  EXPECT_EQ(resp.y().dtype(), v1::D_TYPE_FLOAT16);
  EXPECT_NEAR(resp.y().values(2), 0.66524f, 1e-3);
  EXPECT_NEAR(resp.y().values(3), 1.0f / 3, 1e-3);
  EXPECT_EQ(resp.timings().kernel(), "softmax/cpu");
}

TEST_F(ServerTest, SoftmaxAnyRank) {
  for (DType dt : kAllDTypes) {
    Tensor x = random_tensor(dt, {2, 3, 1, 1000}, rng, 5.0f);
    auto r = client_.softmax(x);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    SoftmaxArgs args{x.view(), r->output.view()};
    EXPECT_LE(reference::relative_frobenius_error(r->output.view(), reference::softmax(args)),
              reference::tolerance(dt));
  }
}

TEST_F(ServerTest, AttentionGqaCausalWithLse) {
  for (DType dt : kAllDTypes)
    for (bool causal : {false, true}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (causal ? " causal" : ""));
      Tensor q = random_tensor(dt, {2, 4, 17, 64}, rng), k = random_tensor(dt, {2, 2, 33, 64}, rng),
             v = random_tensor(dt, {2, 2, 33, 64}, rng);
      auto r = client_.attention(q, k, v, {causal, 0.0f, true, ""});
      ASSERT_TRUE(r.ok()) << r.status().to_string();
      EXPECT_EQ(r->lse.shape(), (Shape{2, 4, 17}));
      EXPECT_EQ(r->lse.dtype(), DType::kFloat32);
      AttentionArgs args{q.view(), k.view(), v.view(), r->output.view(), {}, causal,
                         resolve_attention_scale(0.0f, 64)};
      std::vector<double> want_lse;
      EXPECT_LE(reference::relative_frobenius_error(r->output.view(), reference::attention(args, &want_lse)),
                reference::tolerance(dt));
      EXPECT_LE(reference::relative_frobenius_error(r->lse.view(), want_lse), 1e-5);
      EXPECT_EQ(r->timings.flops(), 4LL * 2 * 4 * 17 * 33 * 64);
    }
}

// Inputs from 1 MiB on go out from the caller's tensors and large outputs are read straight into
// Tensors (attn::Client's large-call path); small fields beside them go the usual way.
TEST_F(ServerTest, LargeCallsGiveTheBitsOfTheUsualPath) {
  Tensor q = random_tensor(DType::kFloat32, {1, 1, 4100, 64}, rng);  // 1.05 MB: large
  Tensor k = random_tensor(DType::kFloat32, {1, 1, 33, 64}, rng), v = random_tensor(DType::kFloat32, {1, 1, 33, 64}, rng);
  auto r = client_.attention(q, k, v, {false, 0.0f, true, ""});
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_EQ(r->output.shape(), q.shape());
  ASSERT_EQ(r->lse.shape(), (Shape{1, 1, 4100}));
  AttentionArgs args{q.view(), k.view(), v.view(), r->output.view(), {}, false, resolve_attention_scale(0.0f, 64)};
  std::vector<double> want_lse;
  EXPECT_LE(reference::relative_frobenius_error(r->output.view(), reference::attention(args, &want_lse)),
            reference::tolerance(DType::kFloat32));
  EXPECT_LE(reference::relative_frobenius_error(r->lse.view(), want_lse), 1e-5);

  // The same call through the generated stub (the request serialized whole, the response parsed
  // by protobuf) gives the same bits.
  v1::AttentionRequest req;
  wire::encode_tensor(q.view(), req.mutable_q());
  wire::encode_tensor(k.view(), req.mutable_k());
  wire::encode_tensor(v.view(), req.mutable_v());
  req.set_return_lse(true);
  v1::AttentionResponse resp;
  ASSERT_TRUE(client_.stub().Attention(client_.make_context(req).get(), req, &resp).ok());
  ASSERT_EQ(resp.o().data().size(), r->output.bytes());
  EXPECT_EQ(std::memcmp(resp.o().data().data(), r->output.data(), r->output.bytes()), 0);
  ASSERT_EQ(resp.lse().data().size(), r->lse.bytes());
  EXPECT_EQ(std::memcmp(resp.lse().data().data(), r->lse.data(), r->lse.bytes()), 0);

  Tensor a = random_tensor(DType::kFloat32, {2100, 130}, rng), b = random_tensor(DType::kFloat32, {130, 129}, rng);
  auto c = client_.matmul(a, b);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  MatmulArgs margs{a.view(), b.view(), c->output.view()};
  EXPECT_LE(reference::relative_frobenius_error(c->output.view(), reference::matmul(margs)),
            reference::tolerance(DType::kFloat32));
  Tensor x = random_tensor(DType::kBFloat16, {700, 1000}, rng, 5.0f);
  auto y = client_.softmax(x);
  ASSERT_TRUE(y.ok()) << y.status().to_string();
  SoftmaxArgs sargs{x.view(), y->output.view()};
  EXPECT_LE(reference::relative_frobenius_error(y->output.view(), reference::softmax(sargs)),
            reference::tolerance(DType::kBFloat16));
}

// A large call whose deadline passes while its bytes are still going out returns (gRPC lets go
// of the caller's tensor) and the client's next call is served.
TEST_F(ServerTest, LargeCallPastItsDeadlineReturnsAndTheNextIsServed) {
  ClientOptions options;
  options.timeout = std::chrono::milliseconds(1);
  Client hasty(server_->address(), options);
  Tensor x(DType::kFloat32, {10, 1 << 20});  // 40 MiB
  for (int i = 0; i < 3; ++i) {
    auto r = hasty.softmax(x);
    EXPECT_EQ(r.status().code(), StatusCode::kDeadlineExceeded) << r.status().to_string();
  }
  Client patient(server_->address());
  auto r = patient.softmax(x);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_FLOAT_EQ(r->output.get(0), 1.0f / (1 << 20));
}

TEST_F(ServerTest, ManyConcurrentCallsAreEachCorrect) {
  std::atomic<int> wrong{0}, failed{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t)
    threads.emplace_back([&, t] {
      Client c(server_->address());
      std::mt19937_64 r(testing::seed() + t);
      for (int i = 0; i < 8; ++i) {
        Tensor a = random_tensor(DType::kFloat32, {9 + t, 20}, r), b = random_tensor(DType::kFloat32, {20, 5 + i}, r);
        auto res = c.matmul(a, b);
        if (!res.ok()) {
          ++failed;
          continue;
        }
        MatmulArgs args{a.view(), b.view(), res->output.view()};
        if (reference::relative_frobenius_error(res->output.view(), reference::matmul(args)) > 1e-5) ++wrong;
      }
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(failed.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
}

// ---- bad input: each gets a status naming the field, the expectation and what came ----

TEST_F(ServerTest, RefusesUnspecifiedDtype) {
  auto req = matmul_request({2, 2}, {2, 2});
  req.mutable_a()->set_dtype(v1::D_TYPE_UNSPECIFIED);
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, req), INVALID_ARGUMENT, HasSubstr("a.dtype"),
                 HasSubstr("D_TYPE_UNSPECIFIED"));
}

TEST_F(ServerTest, RefusesWrongByteLength) {
  auto req = matmul_request({2, 3}, {3, 2});
  req.mutable_b()->mutable_data()->pop_back();
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, req), INVALID_ARGUMENT, HasSubstr("b.data"),
                 HasSubstr("expected 24 bytes"), HasSubstr("got 23"));
}

TEST_F(ServerTest, RefusesBothOrNeitherOfDataAndValues) {
  auto both = matmul_request({1, 1}, {1, 1});
  both.mutable_a()->add_values(1.0f);
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, both), INVALID_ARGUMENT, HasSubstr("a:"),
                 HasSubstr("got both"));
  v1::SoftmaxRequest neither;
  neither.mutable_x()->set_dtype(v1::D_TYPE_FLOAT32);
  neither.mutable_x()->add_shape(4);
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Softmax, neither), INVALID_ARGUMENT, HasSubstr("x:"),
                 HasSubstr("got neither"));
  v1::SoftmaxRequest missing;  // x not set at all
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Softmax, missing), INVALID_ARGUMENT, HasSubstr("x"));
}

TEST_F(ServerTest, RefusesWrongRank) {
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, matmul_request({6}, {6, 2})), INVALID_ARGUMENT,
                 HasSubstr("a.shape"), HasSubstr("rank 2"), HasSubstr("got rank 1"));
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, matmul_request({2, 2}, {1, 1, 2, 2})),
                 INVALID_ARGUMENT, HasSubstr("b.shape"), HasSubstr("got rank 4"));
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Attention, attention_request({4, 8, 64}, {1, 4, 8, 64})),
                 INVALID_ARGUMENT, HasSubstr("q.shape"), HasSubstr("rank 4"), HasSubstr("got rank 3"));
}

TEST_F(ServerTest, RefusesMismatchedInnerDimensions) {
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, matmul_request({4, 5}, {6, 3})), INVALID_ARGUMENT,
                 HasSubstr("b.shape"), HasSubstr("must have 5 rows"), HasSubstr("got 6"));
  auto mixed = matmul_request({2, 2}, {2, 2});
  set_tensor(mixed.mutable_b(), v1::D_TYPE_FLOAT16, {2, 2});
  mixed.mutable_b()->mutable_shape()->RemoveLast();
  mixed.mutable_b()->mutable_shape()->RemoveLast();
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, mixed), INVALID_ARGUMENT, HasSubstr("b.dtype"),
                 HasSubstr("expected float32"), HasSubstr("got float16"));
}

TEST_F(ServerTest, RefusesHeadsThatDoNotGroup) {
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Attention, attention_request({1, 8, 4, 64}, {1, 3, 4, 64})),
                 INVALID_ARGUMENT, HasSubstr("k.shape[1]"), HasSubstr("multiple"), HasSubstr("got 3"));
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Attention, attention_request({1, 8, 4, 64}, {1, 8, 4, 32})),
                 INVALID_ARGUMENT, HasSubstr("k.shape[3]"), HasSubstr("64"), HasSubstr("got 32"));
}

// Sliding windows and soft-capping over gRPC, every dtype, the server's choice and each CPU
// variant by name, against the float64 reference.
TEST_F(ServerTest, AttentionWindowAndSoftcapMatchTheReference) {
  struct Opt {
    bool causal;
    std::int64_t left, right;
    float softcap;
  };
  const Opt opts[] = {{false, 5, 3, 0.0f}, {true, 9, -1, 0.0f}, {false, -1, 0, 5.0f},
                      {true, 0, -1, 0.0f}, {false, 200, 100, 50.0f}};
  int ran = 0;
  for (DType dt : kAllDTypes)
    for (const Opt& opt : opts)
      for (const char* kernel : {"", "attention/cpu", "attention/cpu_flash"}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + (opt.causal ? " causal" : "") + " window=(" +
                     std::to_string(opt.left) + "," + std::to_string(opt.right) + ") softcap=" +
                     std::to_string(opt.softcap) + " kernel=" + kernel + " seed=" + std::to_string(testing::seed()));
        // Large logits so that the cap matters; Sq 37 over Sk 1000: several of cpu_flash's key blocks.
        Tensor q = random_tensor(dt, {1, 4, 37, 64}, rng, 4.0f), k = random_tensor(dt, {1, 2, 1000, 64}, rng, 4.0f),
               v = random_tensor(dt, {1, 2, 1000, 64}, rng);
        AttentionOptions o{opt.causal, 0.0f, true, kernel};
        o.window_left = opt.left;
        o.window_right = opt.right;
        o.softcap = opt.softcap;
        auto r = client_.attention(q, k, v, o);
        ASSERT_TRUE(r.ok()) << r.status().to_string();
        EXPECT_EQ(r->timings.kernel().rfind("attention/cpu", 0), 0u) << r->timings.kernel();
        if (*kernel) {
          EXPECT_EQ(r->timings.kernel(), kernel);
        }
        AttentionArgs args{q.view(), k.view(), v.view(), r->output.view(), {}, opt.causal,
                           resolve_attention_scale(0.0f, 64), opt.left, opt.right, opt.softcap};
        std::vector<double> want_lse;
        EXPECT_LE(reference::relative_frobenius_error(r->output.view(), reference::attention(args, &want_lse)),
                  reference::tolerance(dt));
        EXPECT_LE(reference::relative_frobenius_error(r->lse.view(), want_lse), 1e-5);
        // The options reached the kernel: without them the answer differs.
        AttentionArgs plain = args;
        plain.window_left = plain.window_right = -1;
        plain.softcap = 0.0f;
        EXPECT_GT(reference::relative_frobenius_error(r->output.view(), reference::attention(plain)), 1e-2);
        // FLOPs count the pairs the window keeps.
        EXPECT_EQ(r->timings.flops(), cost_of(args).flops);
        ++ran;
      }
  EXPECT_EQ(ran, 3 * 5 * 3);
}

TEST_F(ServerTest, RefusesBadWindowAndSoftcapNamingTheField) {
  auto base = attention_request({1, 2, 7, 32}, {1, 2, 33, 32});
  auto req = base;
  req.set_window_left(-2);
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Attention, req), INVALID_ARGUMENT, HasSubstr("window_left"),
                 HasSubstr("expected >= 0"), HasSubstr("got -2"));
  req = base;
  req.set_window_right(-5);
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Attention, req), INVALID_ARGUMENT, HasSubstr("window_right"),
                 HasSubstr("got -5"));
  for (float bad : {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    SCOPED_TRACE(std::to_string(bad));
    req = base;
    req.set_softcap(bad);
    EXPECT_REFUSED(call(&v1::AttnService::Stub::Attention, req), INVALID_ARGUMENT, HasSubstr("softcap"),
                   HasSubstr("finite value >= 0"));
  }
  // -1 set explicitly is the same as unset.
  req = base;
  req.set_window_left(-1);
  req.set_window_right(-1);
  EXPECT_TRUE(call(&v1::AttnService::Stub::Attention, req).ok());
  // A rung that takes no window, named: refused with the rung named (on a CUDA server by the
  // rung's own check, window_left first; on a CPU server because it runs elsewhere).
  auto kernels = client_.list_kernels("attention");
  ASSERT_TRUE(kernels.ok());
  bool has_decode = false;
  for (const auto& k : kernels->kernels()) has_decode |= k.name() == "attention/decode_split_kv";
  if (has_decode) {
    req = base;
    req.set_window_left(4);
    req.set_kernel("attention/decode_split_kv");
    EXPECT_REFUSED(call(&v1::AttnService::Stub::Attention, req), INVALID_ARGUMENT,
                   HasSubstr("attention/decode_split_kv"));
  }
  // The Benchmark RPC checks the same fields.
  v1::BenchmarkRequest bm;
  bm.set_op("attention");
  bm.set_dtype(v1::D_TYPE_FLOAT32);
  for (auto d : {1, 2, 7, 32}) bm.add_shape(d);
  bm.set_window_left(-2);
  auto r = client_.benchmark(bm);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("window_left"));
  bm.clear_window_left();
  bm.set_softcap(std::numeric_limits<float>::quiet_NaN());
  r = client_.benchmark(bm);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("softcap"));
  // And times a windowed, capped attention on every CPU variant, each checked against float64.
  bm.set_softcap(30.0f);
  bm.set_window_left(3);
  bm.set_window_right(2);
  bm.set_kv_len(50);
  bm.set_iterations(3);
  r = client_.benchmark(bm);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  ASSERT_GE(r->results_size(), 2);
  for (const auto& res : r->results()) EXPECT_TRUE(res.correct()) << res.kernel() << ": " << res.message();
}

TEST_F(ServerTest, RefusesUnknownKernel) {
  auto req = matmul_request({2, 2}, {2, 2});
  req.set_kernel("matmul/99_imaginary");
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, req), INVALID_ARGUMENT, HasSubstr("kernel"),
                 HasSubstr("matmul/99_imaginary"), HasSubstr("matmul/cpu_blocked"));
  req.set_kernel("softmax/cpu");  // a real name, but another op's
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, req), INVALID_ARGUMENT, HasSubstr("softmax/cpu"));
}

TEST_F(ServerTest, RefusesVariantOfAnotherBackend) {
  std::string cuda_variant;
  auto kernels = client_.list_kernels("matmul");
  ASSERT_TRUE(kernels.ok());
  for (const auto& k : kernels->kernels())
    if (k.backend() == "cuda") cuda_variant = k.name();
  if (cuda_variant.empty()) GTEST_SKIP() << "this build registers no CUDA matmul variant";
  auto req = matmul_request({2, 2}, {2, 2});
  req.set_kernel(cuda_variant);
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, req), INVALID_ARGUMENT, HasSubstr(cuda_variant),
                 HasSubstr("cuda backend"), HasSubstr("runs cpu"));
}

TEST_F(ServerTest, RefusesZeroNegativeAndOverflowingDims) {
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Matmul, matmul_request({0, 2}, {2, 2})), INVALID_ARGUMENT,
                 HasSubstr("a.shape[0]"), HasSubstr("got 0"));
  v1::SoftmaxRequest neg;
  neg.mutable_x()->set_dtype(v1::D_TYPE_FLOAT32);
  neg.mutable_x()->add_shape(4);
  neg.mutable_x()->add_shape(-2);
  neg.mutable_x()->set_data("12345678");
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Softmax, neg), INVALID_ARGUMENT, HasSubstr("x.shape[1]"),
                 HasSubstr("got -2"));
  v1::SoftmaxRequest huge;
  huge.mutable_x()->set_dtype(v1::D_TYPE_FLOAT32);
  for (int i = 0; i < 3; ++i) huge.mutable_x()->add_shape(1LL << 30);
  huge.mutable_x()->set_data("1234");
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Softmax, huge), INVALID_ARGUMENT, HasSubstr("x.shape"),
                 HasSubstr("overflows"));
}

TEST_F(ServerTest, RefusesNonFiniteScale) {
  auto req = attention_request({1, 1, 2, 8}, {1, 1, 2, 8});
  req.set_scale(std::numeric_limits<float>::quiet_NaN());
  EXPECT_REFUSED(call(&v1::AttnService::Stub::Attention, req), INVALID_ARGUMENT, HasSubstr("scale"));
}

// ---- the standard services ----

TEST_F(ServerTest, HealthCheckAndWatch) {
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  for (const char* service : {"", "attn.v1.AttnService"}) {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service(service);
    grpc::health::v1::HealthCheckResponse resp;
    ASSERT_TRUE(health->Check(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  }
  {
    grpc::ClientContext ctx;
    grpc::health::v1::HealthCheckRequest req;
    req.set_service("no.such.Service");
    grpc::health::v1::HealthCheckResponse resp;
    EXPECT_EQ(health->Check(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  grpc::ClientContext ctx;
  grpc::health::v1::HealthCheckRequest req;
  auto stream = health->Watch(&ctx, req);
  grpc::health::v1::HealthCheckResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  ctx.TryCancel();
  while (stream->Read(&resp)) {
  }
  stream->Finish();
}

TEST_F(ServerTest, ReflectionListsEveryService) {
  using namespace grpc::reflection::v1alpha;
  auto channel = grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials());
  auto stub = ServerReflection::NewStub(channel);
  grpc::ClientContext ctx;
  auto stream = stub->ServerReflectionInfo(&ctx);
  ServerReflectionRequest req;
  req.set_list_services("");
  ASSERT_TRUE(stream->Write(req));
  ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  std::set<std::string> names;
  for (const auto& s : resp.list_services_response().service()) names.insert(s.name());
  EXPECT_TRUE(names.count("attn.v1.AttnService"));
  EXPECT_TRUE(names.count("grpc.health.v1.Health"));
  // The API's descriptors come back too, so a client needs no .proto.
  ServerReflectionRequest file_req;
  file_req.set_file_containing_symbol("attn.v1.AttnService");
  ASSERT_TRUE(stream->Write(file_req));
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_GT(resp.file_descriptor_response().file_descriptor_proto_size(), 0);
  stream->WritesDone();
  stream->Finish();
}

// ---- limits and lifecycle, each on its own server ----

TEST(ServerLimits, MessageAndElementLimits) {
  testing::ServerProcess small(ATTND_PATH, {"--max-message-mb", "1", "--max-elements", "100000"});
  Client client(small.address());
  std::mt19937_64 rng(testing::seed());
  // 2 MiB payload over a 1 MiB limit: refused by gRPC itself, the server keeps serving.
  Tensor big = random_tensor(DType::kFloat32, {512, 1024}, rng);
  auto r = client.softmax(big);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().to_string();
  // Small inputs whose product would be too big: refused before anything is allocated.
  Tensor a = random_tensor(DType::kFloat32, {1000, 1}, rng), b = random_tensor(DType::kFloat32, {1, 1000}, rng);
  auto m = client.matmul(a, b);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(m.status().message(), AllOf(HasSubstr("c:"), HasSubstr("1000000 elements"), HasSubstr("100000")));
  Tensor many = random_tensor(DType::kFloat16, {200000}, rng);
  auto e = client.softmax(many);
  EXPECT_EQ(e.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(e.status().message(), AllOf(HasSubstr("x.shape"), HasSubstr("limit of 100000")));
  auto info = client.server_info();
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->limits().max_message_bytes(), 1 << 20);
  EXPECT_EQ(info->limits().max_elements(), 100000);
  EXPECT_THAT(small.log(), HasSubstr("failed: RESOURCE_EXHAUSTED"));
}

TEST(ServerLifecycle, SigtermFinishesInFlightCallsAndExitsZero) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--metrics-listen", "127.0.0.1:0"});
  std::mt19937_64 rng(testing::seed());
  // A call that takes about two seconds here.
  Client client(server.address());
  const std::int64_t n = testing::calibrated_matmul_size(client, 2.0);
  Tensor a = random_tensor(DType::kFloat32, {n, n}, rng);
  Result<OpResult> slow = internal_error("not run");
  std::thread caller([&] {
    slow = client.matmul(a, a, {false, false, testing::kSlowMatmulKernel});
  });
  // Once the server has the call in hand, ask it to stop.
  testing::wait_for_load(server, 1);
  ASSERT_EQ(kill(server.pid(), SIGTERM), 0);
  // Once it has begun to drain (it logs that just before it stops taking calls), new calls are
  // refused; waiting on the log rather than a fixed time holds however slow this machine is.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (server.log().find("shutting down") == std::string::npos && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  Tensor x = Tensor::from_floats(DType::kFloat32, {2}, {0.0f, 0.0f});
  auto late = Client(server.address()).softmax(x);
  EXPECT_FALSE(late.ok());
  const int code = server.stop(SIGTERM);
  caller.join();
  EXPECT_EQ(code, 0);
  EXPECT_TRUE(slow.ok()) << slow.status().to_string() << "\n" << server.log();
  const std::string log = server.log();
  // The call was still running when the signal came, and finished before the exit.
  const auto shutting_down = log.find("shutting down");
  ASSERT_NE(shutting_down, std::string::npos) << log;
  EXPECT_NE(log.find("matmul matmul/cpu", shutting_down), std::string::npos) << log;
}

TEST(ServerFaults, FaultInjectionIsOffByDefaultAndHarmlessOnTheCpu) {
  v1::SoftmaxRequest req;
  req.set_kernel("fault_injection/trap");
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
    Client client(server.address());
    grpc::ClientContext ctx;
    v1::SoftmaxResponse resp;
    EXPECT_EQ(client.stub().Softmax(&ctx, req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--enable-fault-injection"});
  Client client(server.address());
  grpc::ClientContext ctx;
  v1::SoftmaxResponse resp;
  const grpc::Status s = client.stub().Softmax(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("no fault to inject"));
  EXPECT_THAT(server.log(), HasSubstr("fault injection is on"));
  Tensor x = Tensor::from_floats(DType::kFloat32, {2}, {0.0f, 0.0f});
  EXPECT_TRUE(client.softmax(x).ok());
  EXPECT_EQ(server.stop(SIGTERM), 0);
}

TEST(ServerLifecycle, RefusesABusyPort) {
  testing::ServerProcess first(ATTND_PATH);
  const std::string cmd = std::string(ATTND_PATH) + " --listen " + first.address() + " >/dev/null 2>&1";
  const int rc = std::system(cmd.c_str());
  EXPECT_NE(rc, 0);
}

}  // namespace
}  // namespace attn
