// attn_gpu_server_tests: the real attnd on a GPU, for what only a GPU can show: running out of
// device memory is RESOURCE_EXHAUSTED and the next call is served; a device fault turns health
// NOT_SERVING and the process exits 3 for its supervisor to restart it; with several GPUs, calls
// spread over all of them; KV caches on the GPU's paged kernels. Skips where there is no usable GPU.
#include <cuda_runtime.h>
#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>

#include <map>
#include <thread>

#include "attn/client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "reference.h"
#include "support/decode_callers.h"
#include "support/kv_mirror.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using ::testing::HasSubstr;
using testing::random_tensor;

int gpu_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

#define SKIP_WITHOUT_GPU() \
  if (gpu_count() == 0) GTEST_SKIP() << "no usable GPU"

// Holds all but `leave` bytes of the device's free memory while it lives.
class MemoryHog {
 public:
  explicit MemoryHog(std::size_t leave) {
    std::size_t free = 0, total = 0;
    cudaMemGetInfo(&free, &total);
    std::size_t want = free > leave ? free - leave : 0;
    for (std::size_t chunk = std::size_t{1} << 30; chunk >= (std::size_t{16} << 20) && want > 0;) {
      void* p = nullptr;
      if (want >= chunk && cudaMalloc(&p, chunk) == cudaSuccess) {
        blocks_.push_back(p);
        want -= chunk;
      } else {
        cudaGetLastError();
        chunk /= 2;
      }
    }
    cudaMemGetInfo(&free, &total);
    left_ = free;
  }
  ~MemoryHog() {
    for (void* p : blocks_) cudaFree(p);
  }
  std::size_t left() const { return left_; }

 private:
  std::vector<void*> blocks_;
  std::size_t left_ = 0;
};

TEST(GpuServer, OutOfDeviceMemoryIsResourceExhaustedAndTheNextCallIsServed) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0"});
  ClientOptions options;
  options.timeout = std::chrono::seconds(60);
  Client client(server.address(), options);
  std::mt19937_64 rng(testing::seed());
  // 3 x 64 MiB on the device, against the ~100 MiB this test leaves free.
  Tensor a = random_tensor(DType::kFloat32, {4096, 4096}, rng);
  {
    MemoryHog hog(100 << 20);
    std::printf("device memory left free for the server: %.0f MiB\n", hog.left() / 1048576.0);
    auto r = client.matmul(a, a);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status().to_string();
    EXPECT_THAT(r.status().message(), HasSubstr("memory"));
    // Health stays SERVING: running out of memory is not a fault.
    Tensor x = Tensor::from_floats(DType::kFloat32, {2}, {0.0f, 0.0f});
    auto small = client.softmax(x);
    EXPECT_TRUE(small.ok()) << small.status().to_string();
  }
  auto r = client.matmul(a, a);
  ASSERT_TRUE(r.ok()) << r.status().to_string() << "\n" << server.log();
  EXPECT_THAT(r->timings.device(), HasSubstr("cuda:0"));
}

TEST(GpuServer, DeviceFaultTurnsHealthNotServingAndExitsThree) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--enable-fault-injection"});
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  auto health = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext watch_ctx;
  auto watch = health->Watch(&watch_ctx, {});
  grpc::health::v1::HealthCheckResponse status;
  ASSERT_TRUE(watch->Read(&status));
  EXPECT_EQ(status.status(), grpc::health::v1::HealthCheckResponse::SERVING);

  v1::SoftmaxRequest req;
  req.set_kernel("fault_injection/trap");
  v1::SoftmaxResponse resp;
  grpc::ClientContext ctx;
  const grpc::Status s = v1::AttnService::NewStub(channel)->Softmax(&ctx, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INTERNAL) << s.error_message();

  // The watcher hears NOT_SERVING before the server goes away.
  bool saw_not_serving = false;
  while (watch->Read(&status))
    saw_not_serving |= status.status() == grpc::health::v1::HealthCheckResponse::NOT_SERVING;
  EXPECT_TRUE(saw_not_serving);
  EXPECT_EQ(server.wait_exit(std::chrono::seconds(60)), 3) << server.log();
  EXPECT_THAT(server.log(), HasSubstr("faulted"));
}

TEST(GpuServer, ResidentTensorsServeEveryStreamOfTheirGpu) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--streams-per-device", "2"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  Tensor q = random_tensor(DType::kBFloat16, {2, 8, 300, 128}, rng);
  Tensor k = random_tensor(DType::kBFloat16, {2, 2, 500, 128}, rng);
  Tensor v = random_tensor(DType::kBFloat16, {2, 2, 500, 128}, rng);
  auto inline_result = client.attention(q, k, v, {.causal = true});
  ASSERT_TRUE(inline_result.ok()) << inline_result.status().to_string();
  // Three puts: the store spreads them over the GPU's two executors.
  auto hq = client.put_tensor(q), hk = client.put_tensor(k), hv = client.put_tensor(v);
  ASSERT_TRUE(hq.ok() && hk.ok() && hv.ok());
  for (int i = 0; i < 4; ++i) {
    v1::AttentionRequest req;
    *req.mutable_q() = Client::resident(hq->handle());
    *req.mutable_k() = Client::resident(hk->handle());
    *req.mutable_v() = Client::resident(hv->handle());
    req.set_causal(true);
    req.set_keep_output(true);
    v1::AttentionResponse resp;
    grpc::ClientContext ctx;
    const grpc::Status s = client.stub().Attention(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    EXPECT_THAT(resp.timings().device(), HasSubstr("cuda:0"));
    auto o = client.get_tensor(resp.o().handle());
    ASSERT_TRUE(o.ok()) << o.status().to_string();
    ASSERT_EQ(o->bytes(), inline_result->output.bytes());
    EXPECT_EQ(std::memcmp(o->data(), inline_result->output.data(), o->bytes()), 0);
    EXPECT_TRUE(client.delete_tensor(resp.o().handle()).ok());
  }
}

TEST(GpuServer, CallsSpreadOverEveryGpu) {
  SKIP_WITHOUT_GPU();
  if (gpu_count() < 2) GTEST_SKIP() << "one GPU: nothing to spread over";
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "all"});
  std::mt19937_64 rng(testing::seed());
  Tensor a = random_tensor(DType::kBFloat16, {2048, 2048}, rng);
  std::mutex mu;
  std::map<std::string, int> by_device;
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&] {
      Client client(server.address());
      for (int i = 0; i < 8; ++i) {
        auto r = client.matmul(a, a);
        ASSERT_TRUE(r.ok()) << r.status().to_string();
        std::lock_guard lock(mu);
        ++by_device[r->timings.device()];
      }
    });
  for (auto& th : threads) th.join();
  for (const auto& [device, n] : by_device) std::printf("calls on %s: %d\n", device.c_str(), n);
  EXPECT_EQ(static_cast<int>(by_device.size()), gpu_count());
  for (const auto& [device, n] : by_device) EXPECT_GT(n, 0) << device;
}

// A KV cache on the GPU through the real server: ragged prefill (1, 17, 1000, 4097 tokens) and
// decode steps across page boundaries on the CUDA paged kernels, every output against float64
// attention over the test's mirror, ReadKv bit for bit, and a fork copied on the device.
// A float8 cache on the GPU holds what the CPU backend's holds: the same calls (prefill onto empty
// and cached sequences, decode steps, a fork appended to, a truncation into a page) on a cache on
// cuda:0 and one on the CPU of the same server leave the same codes and scales bit for bit
// (ReadKv as stored), and the outputs agree within bfloat16's error (the CPU's are checked
// against float64 by integration.KvFp8Server); windows, soft caps and sinks at GQA 7.
TEST(GpuServer, Fp8KvCacheOnTheGpuHoldsWhatTheCpuHolds) {
  SKIP_WITHOUT_GPU();
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess || prop.major != 9)
    GTEST_SKIP() << "float8 prefill on the GPU (paged_prefill/02_wgmma) is for sm_90";
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  for (const int d : {128, 64}) {
    const int hkv = 4, hq = 28, page = d == 128 ? 16 : 64;
    SCOPED_TRACE("D " + std::to_string(d) + " page " + std::to_string(page) + " seed " + std::to_string(testing::seed()));
    v1::KvCacheConfig cfg;
    cfg.set_layers(1);
    cfg.set_kv_heads(hkv);
    cfg.set_head_dim(d);
    cfg.set_dtype(v1::D_TYPE_BFLOAT16);
    cfg.set_page_size(page);
    cfg.set_capacity_tokens(8192);
    cfg.set_kv_storage(v1::D_TYPE_FLOAT8_E4M3);
    auto on_gpu = client.create_kv_cache(cfg, 0, "cuda:0");
    ASSERT_TRUE(on_gpu.ok()) << on_gpu.status().to_string();
    EXPECT_THAT(on_gpu->device(), HasSubstr("cuda:0"));
    auto on_cpu = client.create_kv_cache(cfg, 0, "cpu");
    ASSERT_TRUE(on_cpu.ok()) << on_cpu.status().to_string();
    const std::string caches[2] = {on_gpu->handle(), on_cpu->handle()};
    // Heavier rows later: pages' scales grow and their earlier rows are requantized.
    const auto rows = [&](std::int64_t n, std::int64_t heads, float scale) {
      Tensor t = random_tensor(DType::kBFloat16, {n, heads, d}, rng);
      for (std::size_t e = 0; e < static_cast<std::size_t>(t.numel()); ++e) t.set(e, t.get(e) * scale);
      return t;
    };
    const auto same_outputs = [&](const Result<KvOpResult>& g, const Result<KvOpResult>& c, const std::string& what) {
      ASSERT_TRUE(g.ok()) << what << ": " << g.status().to_string();
      ASSERT_TRUE(c.ok()) << what << ": " << c.status().to_string();
      EXPECT_THAT(g->timings.kernel(), ::testing::Not(HasSubstr("/cpu"))) << what;
      std::vector<double> want;
      for (std::size_t e = 0; e < static_cast<std::size_t>(c->output.numel()); ++e) want.push_back(c->output.get(e));
      EXPECT_LE(reference::relative_frobenius_error(g->output.view(), want), 1e-2) << what;
    };
    const auto same_cache = [&](const std::string& id, const std::string& what) {
      auto g = client.read_kv(caches[0], id, 0), c = client.read_kv(caches[1], id, 0);
      ASSERT_TRUE(g.ok() && c.ok()) << what;
      ASSERT_TRUE(g->fp8 && c->fp8) << what;
      EXPECT_EQ(g->shape, c->shape) << what;
      EXPECT_TRUE(g->k_codes == c->k_codes && g->v_codes == c->v_codes) << what << ": codes differ (" << id << ")";
      EXPECT_TRUE(g->k_scales == c->k_scales && g->v_scales == c->v_scales) << what << ": scales differ (" << id << ")";
    };
    const std::vector<std::string> ids{"a", "b", "c"};
    const std::vector<std::int64_t> lens{1, 37, 700};
    {
      const std::int64_t total = 738;
      Tensor q = rows(total, hq, 1.0f), k = rows(total, hkv, 1.0f), v = rows(total, hkv, 1.0f);
      same_outputs(client.prefill(caches[0], 0, ids, lens, q, k, v), client.prefill(caches[1], 0, ids, lens, q, k, v),
                   "prefill onto empty");
      for (const auto& id : ids) same_cache(id, "prefill onto empty");
    }
    {
      const std::vector<std::int64_t> more{20, 5, 100};
      Tensor q = rows(125, hq, 1.0f), k = rows(125, hkv, 3.0f), v = rows(125, hkv, 5.0f);
      PrefillOptions opt;
      opt.window_left = 50;
      opt.softcap = 30.0f;
      same_outputs(client.prefill(caches[0], 0, ids, more, q, k, v, opt),
                   client.prefill(caches[1], 0, ids, more, q, k, v, opt), "prefill onto cached, windowed");
      for (const auto& id : ids) same_cache(id, "prefill onto cached");
    }
    ASSERT_TRUE(client.fork_sequence(caches[0], "c", "c2").ok());
    ASSERT_TRUE(client.fork_sequence(caches[1], "c", "c2").ok());
    const std::vector<std::string> all{"a", "b", "c", "c2"};
    for (int step = 0; step < 40; ++step) {
      Tensor q = rows(4, hq, 1.0f), k = rows(4, hkv, step == 20 ? 40.0f : 1.0f), v = rows(4, hkv, step == 30 ? 40.0f : 1.0f);
      DecodeOptions opt;
      if (step % 3 == 1) opt.window_left = 100;
      if (step % 4 == 2) opt.softcap = 20.0f;
      if (step % 5 == 3) {
        opt.sinks = Tensor(DType::kFloat32, {hq});
        for (int h = 0; h < hq; ++h) opt.sinks.set(static_cast<std::size_t>(h), 0.5f * static_cast<float>(h % 3));
      }
      same_outputs(client.decode(caches[0], 0, all, q, k, v, opt), client.decode(caches[1], 0, all, q, k, v, opt),
                   "decode step " + std::to_string(step));
    }
    for (const auto& id : all) same_cache(id, "after decoding");
    ASSERT_TRUE(client.truncate_sequence(caches[0], "c2", 705).ok());
    ASSERT_TRUE(client.truncate_sequence(caches[1], "c2", 705).ok());
    {
      Tensor q = rows(4, hq, 1.0f), k = rows(4, hkv, 8.0f), v = rows(4, hkv, 8.0f);
      same_outputs(client.decode(caches[0], 0, all, q, k, v), client.decode(caches[1], 0, all, q, k, v),
                   "decode after truncation");
    }
    for (const auto& id : all) same_cache(id, "after truncation");
  }
}

TEST(GpuServer, KvCacheDecodeAndPrefillOnTheGpuMatchFloat64) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--streams-per-device", "2"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  const int layers = 2, hkv = 4, hq = 16, d = 128;
  for (int page : {16, 64}) {
    SCOPED_TRACE("page " + std::to_string(page) + " seed " + std::to_string(testing::seed()));
    v1::CreateKvCacheRequest creq;
    auto* c = creq.mutable_config();
    c->set_layers(layers);
    c->set_kv_heads(hkv);
    c->set_head_dim(d);
    c->set_dtype(v1::D_TYPE_BFLOAT16);
    c->set_page_size(page);
    c->set_capacity_tokens(16384);
    v1::CreateKvCacheResponse cresp;
    {
      grpc::ClientContext ctx;
      const grpc::Status s = client.stub().CreateKvCache(&ctx, creq, &cresp);
      ASSERT_TRUE(s.ok()) << s.error_message();
    }
    const std::string handle = cresp.cache().handle();
    EXPECT_THAT(cresp.cache().device(), HasSubstr("cuda:0"));
    testing::Mirror mirror{hkv, d, {}, {}};
    const std::vector<std::string> ids{"a", "b", "c", "d"};
    const std::vector<std::int64_t> lens{1, 17, 1000, 4097};
    const std::int64_t total = 1 + 17 + 1000 + 4097;
    for (int layer = 0; layer < layers; ++layer) {
      Tensor q = random_tensor(DType::kBFloat16, {total, hq, d}, rng), k = random_tensor(DType::kBFloat16, {total, hkv, d}, rng),
             v = random_tensor(DType::kBFloat16, {total, hkv, d}, rng);
      v1::PrefillRequest req;
      req.set_cache(handle);
      req.set_layer(layer);
      for (std::size_t i = 0; i < ids.size(); ++i) req.add_sequence_ids(ids[i]), req.add_lens(lens[i]);
      *req.mutable_q() = testing::to_wire(q);
      *req.mutable_k() = testing::to_wire(k);
      *req.mutable_v() = testing::to_wire(v);
      v1::PrefillResponse resp;
      grpc::ClientContext ctx;
      const grpc::Status s = client.stub().Prefill(&ctx, req, &resp);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_THAT(resp.timings().device(), HasSubstr("cuda"));
      EXPECT_THAT(resp.timings().kernel(), ::testing::Not(HasSubstr("/cpu")));
      const Tensor o = testing::from_wire(resp.o());
      std::vector<double> want, got;
      std::int64_t row = 0;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        mirror.append(ids[i], layer, layers, k, v, row, lens[i]);
        for (std::int64_t j : {std::int64_t{0}, lens[i] / 2, lens[i] - 1}) {
          mirror.attend(q, row + j, ids[i], layer, j + 1, want);
          for (std::int64_t e = 0; e < hq * d; ++e) got.push_back(o.get(static_cast<std::size_t>((row + j) * hq * d + e)));
        }
        row += lens[i];
      }
      EXPECT_LE(reference::relative_frobenius_error(got, want), 1e-2) << "prefill layer " << layer;
    }
    for (int step = 0; step < 70; ++step)
      for (int layer = 0; layer < layers; ++layer) {
        const auto n = static_cast<std::int64_t>(ids.size());
        Tensor q = random_tensor(DType::kBFloat16, {n, hq, d}, rng), k = random_tensor(DType::kBFloat16, {n, hkv, d}, rng),
               v = random_tensor(DType::kBFloat16, {n, hkv, d}, rng);
        v1::DecodeRequest req;
        req.set_cache(handle);
        req.set_layer(layer);
        for (const auto& id : ids) req.add_sequence_ids(id);
        *req.mutable_q() = testing::to_wire(q);
        *req.mutable_k_new() = testing::to_wire(k);
        *req.mutable_v_new() = testing::to_wire(v);
        v1::DecodeResponse resp;
        grpc::ClientContext ctx;
        const grpc::Status s = client.stub().Decode(&ctx, req, &resp);
        ASSERT_TRUE(s.ok()) << s.error_message();
        EXPECT_THAT(resp.timings().kernel(), ::testing::Not(HasSubstr("/cpu")));
        std::vector<double> want;
        for (std::int64_t i = 0; i < n; ++i) {
          const std::string& id = ids[static_cast<std::size_t>(i)];
          mirror.append(id, layer, layers, k, v, i, 1);
          mirror.attend(q, i, id, layer, mirror.length(id, layer), want);
        }
        if (step % 10 == 0 || step == 69) {  // the float64 check is the slow part: a sample of steps
          EXPECT_LE(reference::relative_frobenius_error(testing::from_wire(resp.o()).view(), want), 1e-2)
              << "decode step " << step << " layer " << layer;
        }
      }
    v1::ForkSequenceResponse fork;
    {
      grpc::ClientContext ctx;
      v1::ForkSequenceRequest req;
      req.set_cache(handle);
      req.set_source_id("d");
      req.set_new_id("d2");
      ASSERT_TRUE(client.stub().ForkSequence(&ctx, req, &fork).ok());
    }
    EXPECT_LE(fork.copied_pages(), 1);
    for (const char* id : {"c", "d2"}) {
      grpc::ClientContext ctx;
      v1::ReadKvRequest req;
      req.set_cache(handle);
      req.set_sequence_id(id);
      req.set_layer(1);
      auto reader = client.stub().ReadKv(&ctx, req);
      v1::ReadKvResponse msg;
      std::string bytes;
      while (reader->Read(&msg))
        if (!msg.has_header()) bytes += msg.chunk();
      ASSERT_TRUE(reader->Finish().ok());
      const auto& mk = mirror.k[id == std::string("d2") ? "d" : id][1];
      ASSERT_EQ(bytes.size(), 2 * mk.size() * 2);
      Tensor k(DType::kBFloat16, {static_cast<std::int64_t>(mk.size())});
      std::memcpy(k.data(), bytes.data(), k.bytes());
      bool same = true;
      for (std::size_t e = 0; e < mk.size(); ++e) same &= k.get(e) == mk[e];
      EXPECT_TRUE(same) << id;
    }
  }
}

// Dynamic batching on the GPU: 16 concurrent decode callers each get their own rows — bit for bit
// what a server with batching off returns for the same calls (Decode cuts each sequence into
// split-KV chunks by its own length, so sharing a launch changes no rounding) — and a caller with
// a bad sequence fails alone.
TEST(GpuServer, BatchedDecodeOnTheGpuMatchesUnbatched) {
  SKIP_WITHOUT_GPU();
  constexpr int kCallers = 16, kBad = 3, kHurried = 5;
  const testing::DecodeShape shape{32, 8, 128};
  std::vector<testing::CallerLog> alone, merged;
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--batch-window-us", "0"});
    alone = testing::run_decode_callers(server.address(), kCallers, {kBad, kHurried}, shape);
  }
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--batch-window-us", "2000"});
    merged = testing::run_decode_callers(server.address(), kCallers, {kBad, kHurried}, shape);
  }
  int merged_calls = 0, identical = 0, compared = 0;
  for (int t = 0; t < kCallers; ++t) {
    const auto& a = alone[static_cast<std::size_t>(t)];
    const auto& b = merged[static_cast<std::size_t>(t)];
    merged_calls += b.merged;
    if (t == kBad) {
      EXPECT_EQ(b.codes.at(grpc::StatusCode::NOT_FOUND), testing::kDecodeSteps * testing::kDecodeLayers);
      continue;
    }
    if (t == kHurried) continue;
    EXPECT_EQ(b.ok, testing::kDecodeSteps * testing::kDecodeLayers) << "caller " << t;
    ASSERT_EQ(a.outputs.size(), b.outputs.size());
    for (const auto& [at, bytes] : a.outputs) {
      const std::string& other = b.outputs.at(at);
      ASSERT_EQ(other.size(), bytes.size());
      Tensor x(DType::kBFloat16, {static_cast<std::int64_t>(bytes.size() / 2)}), y = x;
      std::memcpy(x.data(), bytes.data(), bytes.size());
      std::memcpy(y.data(), other.data(), other.size());
      std::vector<double> want(static_cast<std::size_t>(x.numel()));
      for (std::size_t e = 0; e < want.size(); ++e) want[e] = x.get(e);
      EXPECT_LE(reference::relative_frobenius_error(y.view(), want), 1e-2)
          << "caller " << t << " step " << at.first << " layer " << at.second;
      EXPECT_TRUE(other == bytes) << "caller " << t << " step " << at.first << " layer " << at.second
                                  << ": merged output differs from the unbatched one";
      identical += other == bytes;
      ++compared;
    }
  }
  std::printf("calls that shared a launch: %d; outputs identical to the unbatched run: %d of %d\n", merged_calls,
              identical, compared);
  EXPECT_GT(merged_calls, 0) << "no call shared a launch";
}

// CUDA IPC (--shared-memory cuda): q, k and v in one cudaMalloc of this process, exported by its IPC handle; the
// server reads them in place and writes O straight into the same allocation. Bit-equal to the inline call (the same
// variant on the same GPU); a wrong device, a region past the allocation and a server with the flag off are refused.
TEST(GpuServer, CudaIpcInputsAndOutputsMatchTheInlinePath) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--shared-memory", "system,cuda"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  const Shape shape{4, 16, 1024, 128};  // the issue's 50 MB call
  Tensor q = random_tensor(DType::kBFloat16, shape, rng);
  Tensor k = random_tensor(DType::kBFloat16, shape, rng);
  Tensor v = random_tensor(DType::kBFloat16, shape, rng);
  const std::size_t n = q.bytes();
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  void* base = nullptr;
  ASSERT_EQ(cudaMalloc(&base, 4 * n), cudaSuccess);
  char* dev = static_cast<char*>(base);
  ASSERT_EQ(cudaMemcpy(dev, q.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dev + n, k.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(dev + 2 * n, v.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemset(dev + 3 * n, 0xff, n), cudaSuccess);
  cudaIpcMemHandle_t handle;
  ASSERT_EQ(cudaIpcGetMemHandle(&handle, base), cudaSuccess);

  const std::string ipc(reinterpret_cast<const char*>(&handle), sizeof handle);
  auto ok = client.register_cuda_memory("gpu", ipc, 0, 0, static_cast<std::int64_t>(4 * n));
  ASSERT_TRUE(ok.ok()) << ok.status().to_string() << server.log();
  EXPECT_EQ(ok->kind(), v1::SHARED_MEMORY_KIND_CUDA);
  auto other = client.register_cuda_memory("gpu1", ipc, gpu_count(), 0, 64);  // a device this server does not serve
  EXPECT_EQ(other.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(other.status().message(), HasSubstr("device_id"));
  auto past = client.register_cuda_memory("gpu2", ipc, 0, 0, static_cast<std::int64_t>(4 * n) + 4096);
  EXPECT_EQ(past.status().code(), StatusCode::kInvalidArgument) << past.status().to_string();
  std::string forged = ipc;
  for (std::size_t i = 8; i < forged.size(); ++i) forged[i] = static_cast<char>(forged[i] ^ 0x5a);
  auto bad = client.register_cuda_memory("forged", forged, 0, 0, 64);  // no process exported this
  EXPECT_EQ(bad.status().code(), StatusCode::kFailedPrecondition) << bad.status().to_string();
  EXPECT_THAT(bad.status().message(), HasSubstr("cuda_ipc_handle"));
  // A second region of the same allocation (the driver maps a handle once per process: the
  // server shares the mapping), which outlives the first below.
  auto twin = client.register_cuda_memory("gpu-twin", ipc, 0, static_cast<std::int64_t>(n), static_cast<std::int64_t>(3 * n));
  ASSERT_TRUE(twin.ok()) << twin.status().to_string();

  v1::AttentionRequest req;
  const std::int64_t offsets[3] = {0, static_cast<std::int64_t>(n), static_cast<std::int64_t>(2 * n)};
  *req.mutable_q() = Client::in_shared_memory(DType::kBFloat16, shape, "gpu", offsets[0]);
  *req.mutable_k() = Client::in_shared_memory(DType::kBFloat16, shape, "gpu", offsets[1]);
  *req.mutable_v() = Client::in_shared_memory(DType::kBFloat16, shape, "gpu", offsets[2]);
  req.set_causal(true);
  *req.add_output_shm() = Client::shared_memory_ref("gpu", static_cast<std::int64_t>(3 * n));
  v1::AttentionResponse resp;
  const grpc::Status called = client.stub().Attention(client.make_context(req).get(), req, &resp);
  ASSERT_TRUE(called.ok()) << called.error_message();
  EXPECT_TRUE(resp.o().has_shm());
  std::printf("CUDA IPC attention %s: kernel %.3f ms, h2d %.3f ms, d2h %.3f ms, server total %.3f ms\n",
              resp.timings().kernel().c_str(), resp.timings().kernel_ns() / 1e6, resp.timings().h2d_ns() / 1e6,
              resp.timings().d2h_ns() / 1e6, resp.timings().total_ns() / 1e6);
  Tensor o(DType::kBFloat16, shape);
  ASSERT_EQ(cudaMemcpy(o.data(), dev + 3 * n, n, cudaMemcpyDeviceToHost), cudaSuccess);
  AttentionOptions opts;
  opts.causal = true;
  auto inline_result = client.attention(q, k, v, opts);
  ASSERT_TRUE(inline_result.ok()) << inline_result.status().to_string();
  EXPECT_EQ(inline_result->timings.kernel(), resp.timings().kernel());
  EXPECT_EQ(std::memcmp(o.data(), inline_result->output.data(), n), 0);

  // Unregistered: the next call naming it is NOT_FOUND, and the server serves on.
  EXPECT_TRUE(client.unregister_shared_memory("gpu").ok());
  v1::AttentionResponse again;
  EXPECT_EQ(client.stub().Attention(client.make_context(req).get(), req, &again).error_code(),
            grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(client.attention(q, k, v, opts).ok());

  // The twin still reads and writes the allocation: attention(k, k, v) with O over the old O.
  ASSERT_EQ(cudaMemset(dev + 3 * n, 0xff, n), cudaSuccess);
  v1::AttentionRequest twin_req;
  *twin_req.mutable_q() = Client::in_shared_memory(DType::kBFloat16, shape, "gpu-twin", 0);
  *twin_req.mutable_k() = Client::in_shared_memory(DType::kBFloat16, shape, "gpu-twin", 0);
  *twin_req.mutable_v() = Client::in_shared_memory(DType::kBFloat16, shape, "gpu-twin", static_cast<std::int64_t>(n));
  twin_req.set_causal(true);
  *twin_req.add_output_shm() = Client::shared_memory_ref("gpu-twin", static_cast<std::int64_t>(2 * n));
  v1::AttentionResponse twin_resp;
  const grpc::Status twin_called = client.stub().Attention(client.make_context(twin_req).get(), twin_req, &twin_resp);
  ASSERT_TRUE(twin_called.ok()) << twin_called.error_message();
  ASSERT_EQ(cudaMemcpy(o.data(), dev + 3 * n, n, cudaMemcpyDeviceToHost), cudaSuccess);
  auto twin_inline = client.attention(k, k, v, opts);
  ASSERT_TRUE(twin_inline.ok()) << twin_inline.status().to_string();
  EXPECT_EQ(std::memcmp(o.data(), twin_inline->output.data(), n), 0);
  EXPECT_TRUE(client.unregister_shared_memory("gpu-twin").ok());
  cudaFree(base);

  testing::ServerProcess off(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--shared-memory", "system"});
  Client off_client(off.address());
  v1::RegisterSharedMemoryRequest off_req;
  off_req.set_name("gpu");
  off_req.set_kind(v1::SHARED_MEMORY_KIND_CUDA);
  off_req.set_bytes(64);
  v1::RegisterSharedMemoryResponse off_resp;
  const grpc::Status refused = off_client.stub().RegisterSharedMemory(off_client.make_context(off_req).get(), off_req,
                                                                      &off_resp);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(refused.error_message(), HasSubstr("--shared-memory cuda"));
}

// Decode and Prefill on a GPU cache read inputs in place from the GPU: q from a CUDA IPC region,
// K by handle of a resident tensor, V inline give the bits of a twin cache fed all inline.
TEST(GpuServer, KvCallsReadDeviceInputsInPlace) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--shared-memory", "system,cuda"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  const int hkv = 2, d = 128;
  v1::KvCacheConfig config;
  config.set_layers(1);
  config.set_kv_heads(hkv);
  config.set_head_dim(d);
  config.set_dtype(v1::D_TYPE_BFLOAT16);
  config.set_page_size(16);
  config.set_capacity_tokens(8192);
  auto create = [&] {
    auto c = client.create_kv_cache(config);
    EXPECT_TRUE(c.ok()) << c.status().to_string();
    return c.ok() ? c->handle() : std::string();
  };
  const std::string device_fed = create(), inline_fed = create();
  const std::int64_t rows = 1000;
  const int hq_decode = 14;  // Decode: Qwen2.5-7B's group of 7 over two KV heads
  Tensor q = random_tensor(DType::kBFloat16, {rows, hkv, d}, rng), k = random_tensor(DType::kBFloat16, {rows, hkv, d}, rng),
         v = random_tensor(DType::kBFloat16, {rows, hkv, d}, rng);
  auto hk = client.put_tensor(k);
  ASSERT_TRUE(hk.ok()) << hk.status().to_string();
  void* base = nullptr;
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  ASSERT_EQ(cudaMalloc(&base, q.bytes() + (1 << 20)), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(base, q.data(), q.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  cudaIpcMemHandle_t ipc;
  ASSERT_EQ(cudaIpcGetMemHandle(&ipc, base), cudaSuccess);
  auto region = client.register_cuda_memory("q", std::string(reinterpret_cast<const char*>(&ipc), sizeof ipc), 0, 0,
                                            static_cast<std::int64_t>(q.bytes() + (1 << 20)));
  ASSERT_TRUE(region.ok()) << region.status().to_string();

  auto prefill = [&](const std::string& cache, bool from_device, v1::PrefillResponse* resp) {
    v1::PrefillRequest req;
    req.set_cache(cache);
    req.add_sequence_ids("s");
    req.add_lens(rows);
    if (from_device) {
      *req.mutable_q() = Client::in_shared_memory(DType::kBFloat16, q.shape(), "q", 0);
      *req.mutable_k() = Client::resident(hk->handle());
    } else {
      *req.mutable_q() = testing::to_wire(q);
      *req.mutable_k() = testing::to_wire(k);
    }
    *req.mutable_v() = testing::to_wire(v);
    return client.stub().Prefill(client.make_context(req).get(), req, resp);
  };
  v1::PrefillResponse got, want;
  const grpc::Status s = prefill(device_fed, true, &got);
  ASSERT_TRUE(s.ok()) << s.error_message() << server.log();
  ASSERT_TRUE(prefill(inline_fed, false, &want).ok());
  EXPECT_THAT(got.timings().kernel(), ::testing::Not(HasSubstr("/cpu")));
  EXPECT_EQ(got.timings().kernel(), want.timings().kernel());
  EXPECT_EQ(got.o().data(), want.o().data());
  EXPECT_FALSE(got.o().data().empty());

  // Decode with q from the region (its first hq_decode/hkv rows as one row of 14 heads).
  auto decode = [&](const std::string& cache, bool from_device, v1::DecodeResponse* resp) {
    v1::DecodeRequest req;
    req.set_cache(cache);
    req.add_sequence_ids("s");
    Tensor q1(DType::kBFloat16, {1, hq_decode, d}), kv1(DType::kBFloat16, {1, hkv, d});
    std::memcpy(q1.data(), q.data(), q1.bytes());
    std::memcpy(kv1.data(), k.data(), kv1.bytes());
    if (from_device)
      *req.mutable_q() = Client::in_shared_memory(DType::kBFloat16, q1.shape(), "q", 0);
    else
      *req.mutable_q() = testing::to_wire(q1);
    *req.mutable_k_new() = testing::to_wire(kv1);
    *req.mutable_v_new() = testing::to_wire(kv1);
    return client.stub().Decode(client.make_context(req).get(), req, resp);
  };
  v1::DecodeResponse dgot, dwant;
  const grpc::Status ds = decode(device_fed, true, &dgot);
  ASSERT_TRUE(ds.ok()) << ds.error_message();
  ASSERT_TRUE(decode(inline_fed, false, &dwant).ok());
  EXPECT_EQ(dgot.o().data(), dwant.o().data());
  EXPECT_EQ(dgot.lengths(0), rows + 1);
  ASSERT_TRUE(client.unregister_shared_memory("q").ok());
  cudaFree(base);
}

// Decode and Prefill with every tensor in a CUDA IPC region (q, K/V in; O and the LSE out, device
// to device) give the inline path's bits, call after call; a reference past the region's end, to
// a region that is gone, or of the wrong size is refused by name with the cache unchanged.
TEST(GpuServer, KvCallsThroughCudaIpcMatchTheInlinePathBitForBit) {
  SKIP_WITHOUT_GPU();
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cuda", "--devices", "0", "--shared-memory", "system,cuda"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  const int hkv = 8, hq = 32, d = 128, seqs = 5;
  const std::int64_t lens[seqs] = {1, 7, 33, 1000, 70};  // awkward: none a multiple of a page or tile
  v1::KvCacheConfig config;
  config.set_layers(2);
  config.set_kv_heads(hkv);
  config.set_head_dim(d);
  config.set_dtype(v1::D_TYPE_BFLOAT16);
  config.set_page_size(16);
  config.set_capacity_tokens(16384);
  auto made_ipc = client.create_kv_cache(config);
  auto made_inline = client.create_kv_cache(config);
  ASSERT_TRUE(made_ipc.ok() && made_inline.ok()) << made_ipc.status().to_string() << server.log();
  const std::string via_ipc = made_ipc->handle(), via_inline = made_inline->handle();
  std::int64_t rows = 0;
  for (auto l : lens) rows += l;
  auto seq_id = [](int i) {  // not "s" + to_string(i): GCC 12's -Wrestrict misfires on it at -O3
    std::string id = "s";
    id += std::to_string(i);
    return id;
  };

  // One allocation: the prefill's q, k, v, o, lse, then room for decode's.
  const std::size_t row_q = static_cast<std::size_t>(hq) * d * 2, row_kv = static_cast<std::size_t>(hkv) * d * 2;
  const std::size_t q_at = 0, k_at = q_at + rows * row_q, v_at = k_at + rows * row_kv, o_at = v_at + rows * row_kv,
                    lse_at = o_at + rows * row_q, bytes = lse_at + rows * hq * 4;
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  char* dev = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&dev), bytes), cudaSuccess);
  cudaIpcMemHandle_t handle;
  ASSERT_EQ(cudaIpcGetMemHandle(&handle, dev), cudaSuccess);
  const std::string ipc(reinterpret_cast<const char*>(&handle), sizeof handle);
  auto region = client.register_cuda_memory("kv", ipc, 0, 0, static_cast<std::int64_t>(bytes));
  ASSERT_TRUE(region.ok()) << region.status().to_string();
  auto lengths_of = [&](const std::string& cache) {
    std::vector<std::vector<std::int64_t>> out;
    auto info = client.describe_kv_cache(cache);
    EXPECT_TRUE(info.ok()) << info.status().to_string();
    if (info.ok())
      for (const auto& s : info->sequences()) out.emplace_back(s.lengths().begin(), s.lengths().end());
    return out;
  };
  auto upload = [&](const Tensor& t, std::size_t at) {
    ASSERT_EQ(cudaMemcpy(dev + at, t.data(), t.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
  };
  auto poison_outputs = [&](std::int64_t n) {  // NaN bits where O and the LSE will go
    ASSERT_EQ(cudaMemset(dev + o_at, 0xff, n * row_q), cudaSuccess);
    ASSERT_EQ(cudaMemset(dev + lse_at, 0xff, n * hq * 4), cudaSuccess);
  };
  auto download = [&](std::size_t at, std::size_t n) {
    std::string out(n, '\0');
    EXPECT_EQ(cudaMemcpy(out.data(), dev + at, n, cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  };
  // A call twice: `req` with q, K/V in the region and O, the LSE written there; `inline_req` the same
  // call on the other cache, its tensors in the message. `k_of`/`v_of`: the op's K/V fields.
  auto route = [&](auto& req, auto& inline_req, auto k_of, auto v_of, const Tensor& q, const Tensor& k,
                   const Tensor& v) {
    req.set_return_lse(true);
    inline_req.set_return_lse(true);
    req.set_cache(via_ipc);
    *req.mutable_q() = Client::in_shared_memory(DType::kBFloat16, q.shape(), "kv", q_at);
    *(req.*k_of)() = Client::in_shared_memory(DType::kBFloat16, k.shape(), "kv", k_at);
    *(req.*v_of)() = Client::in_shared_memory(DType::kBFloat16, v.shape(), "kv", v_at);
    *req.add_output_shm() = Client::shared_memory_ref("kv", o_at);
    *req.add_output_shm() = Client::shared_memory_ref("kv", lse_at);
    inline_req.set_cache(via_inline);
    *inline_req.mutable_q() = testing::to_wire(q);
    *(inline_req.*k_of)() = testing::to_wire(k);
    *(inline_req.*v_of)() = testing::to_wire(v);
  };

  // Prefill, both layers.
  for (int layer = 0; layer < 2; ++layer) {
    Tensor q = random_tensor(DType::kBFloat16, {rows, hq, d}, rng), k = random_tensor(DType::kBFloat16, {rows, hkv, d}, rng),
           v = random_tensor(DType::kBFloat16, {rows, hkv, d}, rng);
    upload(q, q_at), upload(k, k_at), upload(v, v_at), poison_outputs(rows);
    v1::PrefillRequest inline_req;
    inline_req.set_layer(layer);
    for (int i = 0; i < seqs; ++i) inline_req.add_sequence_ids(seq_id(i)), inline_req.add_lens(lens[i]);
    v1::PrefillRequest req = inline_req;
    route(req, inline_req, &v1::PrefillRequest::mutable_k, &v1::PrefillRequest::mutable_v, q, k, v);
    v1::PrefillResponse got, want;
    const grpc::Status s = client.stub().Prefill(client.make_context(req).get(), req, &got);
    ASSERT_TRUE(s.ok()) << s.error_message() << server.log();
    ASSERT_TRUE(client.stub().Prefill(client.make_context(inline_req).get(), inline_req, &want).ok());
    EXPECT_TRUE(got.o().has_shm() && got.o().data().empty());
    EXPECT_EQ(got.timings().kernel(), want.timings().kernel());
    EXPECT_EQ(download(o_at, rows * row_q), want.o().data()) << "prefill O, layer " << layer;
    EXPECT_EQ(download(lse_at, rows * hq * 4), want.lse().data()) << "prefill LSE, layer " << layer;
  }

  // 12 decode steps over both layers; the timings say where the server's time went.
  for (int step = 0; step < 12; ++step) {
    const int layer = step % 2;
    Tensor q = random_tensor(DType::kBFloat16, {seqs, hq, d}, rng), k = random_tensor(DType::kBFloat16, {seqs, hkv, d}, rng),
           v = random_tensor(DType::kBFloat16, {seqs, hkv, d}, rng);
    upload(q, q_at), upload(k, k_at), upload(v, v_at), poison_outputs(seqs);
    v1::DecodeRequest inline_req;
    inline_req.set_layer(layer);
    for (int i = 0; i < seqs; ++i) inline_req.add_sequence_ids(seq_id(i));
    v1::DecodeRequest req = inline_req;
    route(req, inline_req, &v1::DecodeRequest::mutable_k_new, &v1::DecodeRequest::mutable_v_new, q, k, v);
    v1::DecodeResponse got, want;
    const grpc::Status s = client.stub().Decode(client.make_context(req).get(), req, &got);
    ASSERT_TRUE(s.ok()) << s.error_message() << server.log();
    ASSERT_TRUE(client.stub().Decode(client.make_context(inline_req).get(), inline_req, &want).ok());
    EXPECT_EQ(download(o_at, seqs * row_q), want.o().data()) << "decode O, step " << step;
    EXPECT_EQ(download(lse_at, seqs * hq * 4), want.lse().data()) << "decode LSE, step " << step;
    EXPECT_EQ(std::vector<std::int64_t>(got.lengths().begin(), got.lengths().end()),
              std::vector<std::int64_t>(want.lengths().begin(), want.lengths().end()));
    const v1::Timings& t = got.timings();
    if (step == 11)
      std::printf("CUDA IPC decode (%d sequences): kernel %.1f us, server total %.1f us: receive %.1f, parse %.1f, "
                  "queue %.1f, prepare %.1f, issue %.1f, wait %.1f, finish %.1f us\n",
                  seqs, t.kernel_ns() / 1e3, t.total_ns() / 1e3, t.receive_ns() / 1e3, t.parse_ns() / 1e3,
                  t.queue_ns() / 1e3,
                  t.prepare_ns() / 1e3, t.issue_ns() / 1e3, t.wait_ns() / 1e3, t.finish_ns() / 1e3);
    EXPECT_GT(t.issue_ns(), 0);
    EXPECT_GT(t.parse_ns(), 0);
    EXPECT_LE(t.receive_ns() + t.parse_ns() + t.queue_ns() + t.prepare_ns() + t.issue_ns() + t.wait_ns(), t.total_ns());
  }
  const auto before = lengths_of(via_ipc);
  ASSERT_EQ(before, lengths_of(via_inline));

  // Refusals, each naming its field, and the cache as it was.
  auto refused = [&](v1::DecodeRequest req, grpc::StatusCode code, const std::string& names) {
    req.set_cache(via_ipc);
    for (int i = 0; i < seqs; ++i) req.add_sequence_ids(seq_id(i));
    if (!req.has_q()) *req.mutable_q() = Client::in_shared_memory(DType::kBFloat16, {seqs, hq, d}, "kv", q_at);
    if (!req.has_k_new()) *req.mutable_k_new() = Client::in_shared_memory(DType::kBFloat16, {seqs, hkv, d}, "kv", k_at);
    if (!req.has_v_new()) *req.mutable_v_new() = Client::in_shared_memory(DType::kBFloat16, {seqs, hkv, d}, "kv", v_at);
    v1::DecodeResponse resp;
    const grpc::Status s = client.stub().Decode(client.make_context(req).get(), req, &resp);
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(names));
    EXPECT_EQ(lengths_of(via_ipc), before) << s.error_message();
  };
  v1::DecodeRequest past_end;  // q's last bytes beyond the region
  *past_end.mutable_q() = Client::in_shared_memory(DType::kBFloat16, {seqs, hq, d}, "kv",
                                                   static_cast<std::int64_t>(bytes - row_q));
  refused(past_end, grpc::StatusCode::INVALID_ARGUMENT, "q.shm: ");
  v1::DecodeRequest out_past_end;  // O written beyond the region
  *out_past_end.add_output_shm() = Client::shared_memory_ref("kv", static_cast<std::int64_t>(bytes - 16));
  refused(out_past_end, grpc::StatusCode::INVALID_ARGUMENT, "output_shm (o).shm: ");
  v1::DecodeRequest negative;
  *negative.mutable_k_new() = Client::in_shared_memory(DType::kBFloat16, {seqs, hkv, d}, "kv", -256);
  refused(negative, grpc::StatusCode::INVALID_ARGUMENT, "k_new.shm: ");
  v1::DecodeRequest wrong_rows;  // v_new of 4 rows for 5 sequences
  *wrong_rows.mutable_v_new() = Client::in_shared_memory(DType::kBFloat16, {seqs - 1, hkv, d}, "kv", v_at);
  refused(wrong_rows, grpc::StatusCode::INVALID_ARGUMENT, "v_new.shape");
  v1::DecodeRequest unknown;  // a region never registered
  *unknown.mutable_q() = Client::in_shared_memory(DType::kBFloat16, {seqs, hq, d}, "nope", 0);
  refused(unknown, grpc::StatusCode::NOT_FOUND, "q.shm.region: no shared-memory region named \"nope\"");
  ASSERT_TRUE(client.unregister_shared_memory("kv").ok());
  v1::DecodeRequest gone;  // the region unregistered: inputs and output
  *gone.add_output_shm() = Client::shared_memory_ref("kv", o_at);
  refused(gone, grpc::StatusCode::NOT_FOUND, "q.shm.region: no shared-memory region named \"kv\"");
  cudaFree(dev);
}

}  // namespace
}  // namespace attn
