// Resident tensors, Benchmark and Echo against the real attnd (CPU backend): streaming put/get
// beyond the message limit, the handle lifecycle, the quota, chaining ops on handles, and the
// remote benchmark of the ladder.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "reference.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using ::testing::HasSubstr;
using testing::random_tensor;

void set_shape(v1::BenchmarkRequest& r, std::initializer_list<std::int64_t> dims) {
  r.clear_shape();
  for (auto d : dims) r.add_shape(d);
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

TEST(ResidentTensors, StreamsATensorLargerThanTheMessageLimitInAndOut) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--max-message-mb", "1"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  Tensor big = random_tensor(DType::kFloat32, {768, 1024}, rng);  // 3 MiB through a 1 MiB limit
  EXPECT_FALSE(client.softmax(big).ok()) << "inline, it cannot pass";
  auto info = client.put_tensor(big, 0, "", 256 << 10);
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->bytes(), static_cast<std::int64_t>(big.bytes()));
  EXPECT_THAT(info->device(), HasSubstr("cpu"));
  EXPECT_THAT(info->handle(), ::testing::StartsWith("t-"));
  auto back = client.get_tensor(info->handle(), 300 << 10);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_TRUE(same_bytes(*back, big));
  auto listed = client.list_tensors();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->tensors_size(), 1);
  EXPECT_EQ(listed->tensors(0).handle(), info->handle());
  EXPECT_EQ(listed->used_bytes(), static_cast<std::int64_t>(big.bytes()));
  EXPECT_GT(listed->tensors(0).expires_unix_ms(), 0);
}

TEST(ResidentTensors, HandleLifecycle) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  Tensor x = random_tensor(DType::kFloat16, {4, 33}, rng);
  auto info = client.put_tensor(x);
  ASSERT_TRUE(info.ok()) << info.status().to_string();

  // Used by handle, with and without dtype/shape; a mismatch names the field.
  v1::SoftmaxRequest req;
  *req.mutable_x() = Client::resident(info->handle());
  v1::SoftmaxResponse resp;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(client.stub().Softmax(&ctx, req, &resp).ok());
  }
  auto y = wire::decode_tensor(resp.y(), "y", {});
  ASSERT_TRUE(y.ok());
  SoftmaxArgs args{x.view(), x.view()};
  EXPECT_LT(reference::relative_frobenius_error(y->view, reference::softmax(args)), reference::tolerance(DType::kFloat16));
  req.mutable_x()->set_dtype(v1::D_TYPE_FLOAT32);
  {
    grpc::ClientContext ctx;
    const grpc::Status s = client.stub().Softmax(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("x.dtype"));
  }
  req.mutable_x()->set_dtype(v1::D_TYPE_FLOAT16);
  req.mutable_x()->add_values(1.0f);
  {
    grpc::ClientContext ctx;
    const grpc::Status s = client.stub().Softmax(&ctx, req, &resp);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("got both"));
  }

  // Deleted: NOT_FOUND, for ops, reads and a second delete.
  auto freed = client.delete_tensor(info->handle());
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, static_cast<std::int64_t>(x.bytes()));
  EXPECT_EQ(client.get_tensor(info->handle()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(client.delete_tensor(info->handle()).status().code(), StatusCode::kNotFound);
  v1::SoftmaxRequest again;
  *again.mutable_x() = Client::resident(info->handle());
  grpc::ClientContext ctx;
  const grpc::Status gone = client.stub().Softmax(&ctx, again, &resp);
  EXPECT_EQ(gone.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(gone.error_message(), HasSubstr("x.handle"));
  EXPECT_EQ(client.get_tensor("t-made-up").status().code(), StatusCode::kNotFound);

  // Expired: its owner-set time to live passes unused.
  // A second to live: the read right after the put is ~1 ms on loopback even in the sanitizer
  // build on a loaded machine, so it cannot come after the expiry; twice that later it is gone.
  auto brief = client.put_tensor(x, 1000);
  ASSERT_TRUE(brief.ok());
  EXPECT_TRUE(client.get_tensor(brief->handle()).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(2000));
  EXPECT_EQ(client.get_tensor(brief->handle()).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(client.list_tensors()->used_bytes(), 0);
}

TEST(ResidentTensors, MalformedStreamsAreRefused) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  Client client(server.address());
  auto put = [&](std::vector<v1::PutTensorRequest> msgs) {
    grpc::ClientContext ctx;
    v1::PutTensorResponse resp;
    auto w = client.stub().PutTensor(&ctx, &resp);
    for (auto& m : msgs) w->Write(m);
    w->WritesDone();
    return w->Finish();
  };
  v1::PutTensorRequest header, chunk;
  header.mutable_header()->set_dtype(v1::D_TYPE_FLOAT32);
  header.mutable_header()->add_shape(4);
  chunk.set_chunk(std::string(8, '\0'));
  auto s = put({chunk});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("header"));
  s = put({header, chunk});  // 8 of 16 bytes
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("brought 8"));
  s = put({header, chunk, chunk, chunk});  // 24 of 16
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("bring more"));
  v1::PutTensorRequest bad = header;
  bad.mutable_header()->set_dtype(v1::D_TYPE_UNSPECIFIED);
  EXPECT_EQ(put({bad}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  bad = header;
  bad.mutable_header()->set_device("cuda:7");
  s = put({bad});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("header.device"));
  EXPECT_TRUE(put({header, chunk, chunk}).ok());
  EXPECT_EQ(client.list_tensors()->tensors_size(), 1) << "only the complete one is kept";
}

TEST(ResidentTensors, QuotaIsEnforcedForPutsAndKeptOutputs) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--tensor-quota-mb", "1"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  Tensor x = random_tensor(DType::kFloat32, {192, 1024}, rng);  // 768 KiB
  auto first = client.put_tensor(x);
  ASSERT_TRUE(first.ok()) << first.status().to_string();
  auto second = client.put_tensor(x);
  EXPECT_EQ(second.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(second.status().message(), HasSubstr("quota"));
  v1::SoftmaxRequest req;
  *req.mutable_x() = Client::resident(first->handle());
  req.set_keep_output(true);
  v1::SoftmaxResponse resp;
  grpc::ClientContext ctx;
  EXPECT_EQ(client.stub().Softmax(&ctx, req, &resp).error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  ASSERT_TRUE(client.delete_tensor(first->handle()).ok());
  EXPECT_TRUE(client.put_tensor(x).ok()) << "room again after the delete";
}

// On the CPU backend resident tensors and KV caches are host memory, like calls' bytes: they are
// charged to the same bound (--max-inflight-mb), so that no mix of the two passes it. Here a
// 40 MB tensor leaves too little of a 64 MB bound for a 24 MB call or a 64 MB KV cache, and
// deleting it makes room for both.
TEST(ResidentTensors, HostTensorsAndCallsShareOneMemoryBound) {
  testing::ServerProcess server(ATTND_PATH,
                                {"--backend", "cpu", "--max-inflight-mb", "64", "--max-message-mb", "64"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  Tensor big(DType::kFloat32, {10, 1 << 20});  // 40 MiB
  auto held = client.put_tensor(big);
  ASSERT_TRUE(held.ok()) << held.status().to_string();
  Tensor x = random_tensor(DType::kFloat32, {6, 1 << 20}, rng);  // 24 MiB in, 24 MiB out
  auto refused = client.softmax(x);
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(refused.status().message(), HasSubstr("--max-inflight-mb"));
  v1::KvCacheConfig config;
  config.set_layers(1);
  config.set_kv_heads(8);
  config.set_head_dim(128);
  config.set_dtype(v1::D_TYPE_FLOAT32);
  config.set_page_size(16);
  config.set_capacity_tokens(8192);  // 2 x 8192 x 8 x 128 x 4 bytes = 64 MiB
  auto cache = client.create_kv_cache(config);
  EXPECT_EQ(cache.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(cache.status().message(), HasSubstr("host memory"));
  ASSERT_TRUE(client.delete_tensor(held->handle()).ok());
  auto served = client.softmax(x);
  EXPECT_TRUE(served.ok()) << served.status().to_string();
  config.set_capacity_tokens(2048);  // 16 MiB
  auto made = client.create_kv_cache(config);
  EXPECT_TRUE(made.ok()) << made.status().to_string();
}

TEST(ResidentTensors, ChainedOpsOnHandlesEqualTheInlineResult) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  Tensor a = random_tensor(DType::kFloat32, {33, 70}, rng), b = random_tensor(DType::kFloat32, {70, 17}, rng);
  Tensor w = random_tensor(DType::kFloat32, {17, 9}, rng);

  // Inline: three round trips with the data.
  auto c = client.matmul(a, b);
  ASSERT_TRUE(c.ok());
  auto s = client.softmax(c->output);
  ASSERT_TRUE(s.ok());
  auto inline_result = client.matmul(s->output, w);
  ASSERT_TRUE(inline_result.ok());

  // On handles: the intermediates never leave the server.
  auto ha = client.put_tensor(a), hb = client.put_tensor(b), hw = client.put_tensor(w);
  ASSERT_TRUE(ha.ok() && hb.ok() && hw.ok());
  v1::MatmulRequest m1;
  *m1.mutable_a() = Client::resident(ha->handle());
  *m1.mutable_b() = Client::resident(hb->handle());
  m1.set_keep_output(true);
  v1::MatmulResponse r1;
  grpc::ClientContext c1;
  ASSERT_TRUE(client.stub().Matmul(&c1, m1, &r1).ok());
  EXPECT_TRUE(r1.c().data().empty());
  EXPECT_THAT(r1.c().handle(), ::testing::StartsWith("t-"));
  EXPECT_EQ(r1.c().shape_size(), 2);
  v1::SoftmaxRequest m2;
  *m2.mutable_x() = Client::resident(r1.c().handle());
  m2.set_keep_output(true);
  v1::SoftmaxResponse r2;
  grpc::ClientContext c2;
  ASSERT_TRUE(client.stub().Softmax(&c2, m2, &r2).ok());
  v1::MatmulRequest m3;
  *m3.mutable_a() = Client::resident(r2.y().handle());
  *m3.mutable_b() = Client::resident(hw->handle());
  v1::MatmulResponse r3;
  grpc::ClientContext c3;
  ASSERT_TRUE(client.stub().Matmul(&c3, m3, &r3).ok());
  auto chained = wire::decode_tensor(r3.c(), "c", {});
  ASSERT_TRUE(chained.ok());
  ASSERT_EQ(chained->view.bytes(), inline_result->output.bytes());
  EXPECT_EQ(std::memcmp(chained->view.data, inline_result->output.data(), chained->view.bytes()), 0)
      << "the same kernels on the same numbers give the same bits";
  // The kept intermediates are listed and readable.
  auto mid = client.get_tensor(r2.y().handle());
  ASSERT_TRUE(mid.ok());
  EXPECT_TRUE(same_bytes(*mid, s->output));
  EXPECT_EQ(client.list_tensors()->tensors_size(), 5);
}

TEST(Benchmark, TimesAndChecksEveryVariantWithoutMovingData) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  Client client(server.address());
  for (const char* op : {"matmul", "softmax", "attention"}) {
    v1::BenchmarkRequest req;
    req.set_op(op);
    req.set_dtype(v1::D_TYPE_BFLOAT16);
    if (std::string(op) == "matmul") set_shape(req, {2, 65, 33, 17});
    if (std::string(op) == "softmax") set_shape(req, {7, 1000});
    if (std::string(op) == "attention") {
      set_shape(req, {1, 4, 33, 64});
      req.set_kv_heads(2);
      req.set_kv_len(100);
      req.set_causal(true);
    }
    req.set_iterations(5);
    auto r = client.benchmark(req);
    ASSERT_TRUE(r.ok()) << op << ": " << r.status().to_string();
    // The op's CPU variants: the OpenBLAS one and the hand-written one (softmax: one).
    ASSERT_EQ(r->results_size(), std::string(op) == "softmax" ? 1 : 2) << op;
    for (const auto& res : r->results()) {
      EXPECT_TRUE(res.correct()) << res.kernel() << ": " << res.message() << " error " << res.error();
      EXPECT_LT(res.error(), 2e-2) << res.kernel();
      EXPECT_GT(res.median_ns(), 0) << res.kernel();
      EXPECT_LE(res.p10_ns(), res.median_ns()) << res.kernel();
      EXPECT_LE(res.median_ns(), res.p90_ns()) << res.kernel();
      EXPECT_GT(res.gbps(), 0) << res.kernel();
    }
  }
  v1::BenchmarkRequest bad;
  bad.set_op("conv");
  bad.set_dtype(v1::D_TYPE_FLOAT32);
  EXPECT_EQ(client.benchmark(bad).status().code(), StatusCode::kInvalidArgument);
  bad.set_op("attention");
  set_shape(bad, {1, 6, 8, 64});
  bad.set_kv_heads(4);
  EXPECT_THAT(client.benchmark(bad).status().message(), HasSubstr("kv_heads"));
  bad.set_op("softmax");
  bad.add_kernels("softmax/nope");
  EXPECT_EQ(client.benchmark(bad).status().code(), StatusCode::kNotFound);
  // A named variant that cannot run here says why.
  v1::BenchmarkRequest gpu_only;
  gpu_only.set_op("softmax");
  gpu_only.set_dtype(v1::D_TYPE_FLOAT32);
  set_shape(gpu_only, {4, 64});
  gpu_only.add_kernels("softmax/cpu");
  auto named = client.benchmark(gpu_only);
  ASSERT_TRUE(named.ok());
  ASSERT_EQ(named->results_size(), 1);
  EXPECT_TRUE(named->results(0).correct());
}

TEST(Benchmark, ElementLimitAppliesToEachTensorItMakes) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--max-elements", "1000"});
  Client client(server.address());
  v1::BenchmarkRequest req;
  req.set_op("matmul");
  req.set_dtype(v1::D_TYPE_FLOAT32);
  req.set_iterations(1);
  set_shape(req, {30, 30, 30});  // 27000 as a product, 900 per tensor
  auto ok = client.benchmark(req);
  ASSERT_TRUE(ok.ok()) << ok.status().to_string();
  EXPECT_TRUE(ok->results(0).correct());
  set_shape(req, {40, 20, 30});  // C is 1200
  auto big = client.benchmark(req);
  EXPECT_EQ(big.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(big.status().message(), HasSubstr("shape (c): [40, 30] has 1200 elements"));
}

TEST(Echo, ReturnsThePayload) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  Client client(server.address());
  const std::string payload(1 << 20, 'x');
  auto r = client.echo(payload);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->payload(), payload);
  EXPECT_GT(r->server_ns(), 0);
}

}  // namespace
}  // namespace attn
