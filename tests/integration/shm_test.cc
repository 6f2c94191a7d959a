// System shared memory (--shared-memory system) against the real attnd (CPU backend): regions
// registered, listed and unregistered per caller; inputs read from and outputs written into
// them, bit-equal to the inline path; every bad reference refused by name; a region shrunk,
// unlinked or rewritten while calls run never takes the server down; the quota; the flag off.
#include <arpa/inet.h>
#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "support/http_get.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using ::testing::HasSubstr;
using testing::random_tensor;

const std::vector<std::string> kShm = {"--backend", "cpu", "--shared-memory", "system"};

bool same_bytes(const Tensor& a, const void* b) { return std::memcmp(a.data(), b, a.bytes()) == 0; }

// q, k, v of [1, 2, 64, 32] float32 copied into a buffer, O after them.
struct AttentionInShm {
  Tensor q, k, v;
  SharedMemoryBuffer buf;
  std::int64_t offsets[3] = {0, 0, 0};
  std::int64_t o_offset = 0;

  explicit AttentionInShm(std::mt19937_64& rng, Shape shape = {1, 2, 64, 32}) {
    q = random_tensor(DType::kFloat32, shape, rng);
    k = random_tensor(DType::kFloat32, shape, rng);
    v = random_tensor(DType::kFloat32, shape, rng);
    auto b = SharedMemoryBuffer::create(4 * q.bytes());
    if (!b.ok()) throw std::runtime_error(b.status().to_string());
    buf = std::move(b).value();
    std::int64_t at = 0;
    const Tensor* ins[3] = {&q, &k, &v};
    for (int i = 0; i < 3; ++i) {
      offsets[i] = at;
      std::memcpy(static_cast<char*>(buf.data()) + at, ins[i]->data(), ins[i]->bytes());
      at += static_cast<std::int64_t>(ins[i]->bytes());
    }
    o_offset = at;
  }
  Result<OpResult> call(Client& c, const std::string& region, bool copy_out = true) {
    AttentionOptions opts;
    opts.causal = true;
    return c.attention_shm(region, buf, DType::kFloat32, q.shape(), k.shape(), offsets, o_offset,
                           opts, copy_out);
  }
};

TEST(SharedMemory, RegisterStatusUnregister) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  auto buf = SharedMemoryBuffer::create(1 << 20);
  ASSERT_TRUE(buf.ok()) << buf.status().to_string();
  auto info = client.register_shared_memory("r1", buf->key(), 4096, 65536);
  ASSERT_TRUE(info.ok()) << info.status().to_string();
  EXPECT_EQ(info->name(), "r1");
  EXPECT_EQ(info->key(), buf->key());
  EXPECT_EQ(info->offset(), 4096);
  EXPECT_EQ(info->bytes(), 65536);
  ASSERT_TRUE(client.register_shared_memory("r2", buf->key(), 0, 1 << 20).ok());

  auto status = client.shared_memory_status();
  ASSERT_TRUE(status.ok()) << status.status().to_string();
  EXPECT_EQ(status->regions_size(), 2);
  EXPECT_EQ(status->used_bytes(), 65536 + (1 << 20)) << "regions count against the quota";
  auto one = client.shared_memory_status("r1");
  ASSERT_TRUE(one.ok());
  ASSERT_EQ(one->regions_size(), 1);
  EXPECT_EQ(one->regions(0).bytes(), 65536);

  // A second region of the same name, an object that is not there, a region past its object,
  // bad names: each refused by name.
  auto dup = client.register_shared_memory("r1", buf->key(), 0, 16);
  EXPECT_EQ(dup.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(dup.status().message(), HasSubstr("registered already"));
  auto missing = client.register_shared_memory("r3", "/attn-no-such-object-here", 0, 16);
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("attn-no-such-object-here"));
  auto past = client.register_shared_memory("r3", buf->key(), 1 << 19, (1 << 19) + 1);
  EXPECT_EQ(past.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(past.status().message(), HasSubstr("holds 1048576 bytes"));
  EXPECT_EQ(client.register_shared_memory("bad name", buf->key(), 0, 16).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(client.register_shared_memory("r3", "/../etc/passwd", 0, 16).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(client.register_shared_memory("r3", buf->key(), -1, 16).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(client.register_shared_memory("r3", buf->key(), 0, 0).status().code(),
            StatusCode::kInvalidArgument);

  auto gone = client.unregister_shared_memory("r1");
  ASSERT_TRUE(gone.ok());
  EXPECT_EQ(*gone, 1);
  EXPECT_EQ(client.unregister_shared_memory("r1").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(client.shared_memory_status("r1").status().code(), StatusCode::kNotFound);
  auto all = client.unregister_shared_memory();
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(*all, 1);
  auto after = client.shared_memory_status();
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->regions_size(), 0);
  EXPECT_EQ(after->used_bytes(), 0);
}

TEST(SharedMemory, ResultsEqualTheInlinePath) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  AttentionInShm a(rng);
  ASSERT_TRUE(
      client.register_shared_memory("io", a.buf.key(), 0, static_cast<std::int64_t>(a.buf.size()))
          .ok());
  AttentionOptions opts;
  opts.causal = true;
  auto inline_result = client.attention(a.q, a.k, a.v, opts);
  ASSERT_TRUE(inline_result.ok()) << inline_result.status().to_string();
  auto shm_result = a.call(client, "io");
  ASSERT_TRUE(shm_result.ok()) << shm_result.status().to_string();
  EXPECT_TRUE(same_bytes(inline_result->output, shm_result->output.data()));
  EXPECT_EQ(shm_result->timings.kernel(), inline_result->timings.kernel());

  // Mixed: q inline, k and v from the region, the output inline; softmax and matmul too.
  v1::AttentionRequest req;
  wire::encode_tensor(a.q.view(), req.mutable_q());
  *req.mutable_k() = Client::in_shared_memory(DType::kFloat32, a.k.shape(), "io", a.offsets[1]);
  *req.mutable_v() = Client::in_shared_memory(DType::kFloat32, a.v.shape(), "io", a.offsets[2]);
  req.set_causal(true);
  v1::AttentionResponse resp;
  ASSERT_TRUE(client.stub().Attention(client.make_context(req).get(), req, &resp).ok());
  EXPECT_EQ(resp.o().data(), std::string(static_cast<const char*>(inline_result->output.data()),
                                         inline_result->output.bytes()));

  v1::SoftmaxRequest sreq;
  *sreq.mutable_x() = Client::in_shared_memory(DType::kFloat32, {64, 64}, "io", a.offsets[0]);
  *sreq.add_output_shm() = Client::shared_memory_ref("io", a.o_offset);
  v1::SoftmaxResponse sresp;
  ASSERT_TRUE(client.stub().Softmax(client.make_context(sreq).get(), sreq, &sresp).ok());
  EXPECT_TRUE(sresp.y().has_shm());
  EXPECT_EQ(sresp.y().shm().bytes(), 64 * 64 * 4);
  EXPECT_TRUE(sresp.y().data().empty());
  Tensor x(DType::kFloat32, {64, 64});
  std::memcpy(x.data(), a.q.data(), x.bytes());
  auto y = client.softmax(x);
  ASSERT_TRUE(y.ok());
  EXPECT_TRUE(same_bytes(y->output, static_cast<const char*>(a.buf.data()) + a.o_offset));
}

TEST(SharedMemory, BadReferencesAreRefusedByName) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  AttentionInShm a(rng);
  const auto size = static_cast<std::int64_t>(a.buf.size());
  ASSERT_TRUE(client.register_shared_memory("io", a.buf.key(), 0, size).ok());

  auto unknown = a.call(client, "nope");
  EXPECT_EQ(unknown.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(unknown.status().message(), HasSubstr("q.shm.region"));
  EXPECT_THAT(unknown.status().message(), HasSubstr("\"nope\""));

  auto attention = [&](std::int64_t k_offset, std::int64_t k_bytes, std::int64_t o_offset) {
    v1::AttentionRequest req;
    *req.mutable_q() = Client::in_shared_memory(DType::kFloat32, a.q.shape(), "io", a.offsets[0]);
    *req.mutable_k() = Client::in_shared_memory(DType::kFloat32, a.k.shape(), "io", k_offset);
    req.mutable_k()->mutable_shm()->set_bytes(k_bytes);
    *req.mutable_v() = Client::in_shared_memory(DType::kFloat32, a.v.shape(), "io", a.offsets[2]);
    *req.add_output_shm() = Client::shared_memory_ref("io", o_offset);
    v1::AttentionResponse resp;
    return client.stub().Attention(client.make_context(req).get(), req, &resp);
  };
  const std::int64_t t = static_cast<std::int64_t>(a.q.bytes());
  EXPECT_TRUE(attention(a.offsets[1], 0, a.o_offset).ok());
  EXPECT_TRUE(attention(a.offsets[1], t, a.o_offset).ok());
  for (auto [off, bytes, o_off, what] :
       std::vector<std::tuple<std::int64_t, std::int64_t, std::int64_t, std::string>>{
           {size - t + 1, 0, a.o_offset, "k.shm"},  // past the end
           {-1, 0, a.o_offset, "k.shm"},            // negative
           {std::int64_t{1} << 62, 0, a.o_offset, "k.shm"},
           {a.offsets[1], t - 4, a.o_offset, "k.shm.bytes"},  // wrong size for the shape
           {a.offsets[1], 0, size - t + 1, "output_shm (o)"},
           {a.offsets[1], 0, -8, "output_shm (o)"}}) {
    const grpc::Status s = attention(off, bytes, o_off);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << what << ": " << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(what));
  }

  // Both data and shm; shm without a shape; more output refs than outputs; keep_output with one.
  v1::SoftmaxRequest req;
  *req.mutable_x() = Client::in_shared_memory(DType::kFloat32, {4, 4}, "io", 0);
  req.mutable_x()->set_data(std::string(64, '\0'));
  v1::SoftmaxResponse resp;
  EXPECT_EQ(client.stub().Softmax(client.make_context(req).get(), req, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  req.mutable_x()->clear_data();
  req.mutable_x()->clear_shape();
  EXPECT_EQ(client.stub().Softmax(client.make_context(req).get(), req, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  req.mutable_x()->add_shape(4);
  *req.add_output_shm() = Client::shared_memory_ref("io", 0);
  *req.add_output_shm() = Client::shared_memory_ref("io", 0);
  EXPECT_EQ(client.stub().Softmax(client.make_context(req).get(), req, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  req.mutable_output_shm()->RemoveLast();
  req.set_keep_output(true);
  EXPECT_EQ(client.stub().Softmax(client.make_context(req).get(), req, &resp).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // Still serving, correctly.
  EXPECT_TRUE(a.call(client, "io").ok());
}

TEST(SharedMemory, RegionsBelongToTheirToken) {
  testing::ServerProcessOptions po;
  po.env = {{"ATTND_TOKEN", "token-alice\ntoken-bob"}};
  testing::ServerProcess server(ATTND_PATH, kShm, po);
  ClientOptions alice_opts, bob_opts;
  alice_opts.token = "token-alice";
  bob_opts.token = "token-bob";
  Client alice(server.address(), alice_opts), bob(server.address(), bob_opts);
  std::mt19937_64 rng(testing::seed());
  AttentionInShm a(rng);
  const auto size = static_cast<std::int64_t>(a.buf.size());
  ASSERT_TRUE(alice.register_shared_memory("io", a.buf.key(), 0, size).ok());
  EXPECT_TRUE(a.call(alice, "io").ok());
  auto stolen = a.call(bob, "io");
  EXPECT_EQ(stolen.status().code(), StatusCode::kNotFound) << "bob cannot use alice's region";
  auto listed = bob.shared_memory_status();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->regions_size(), 0);
  EXPECT_EQ(bob.unregister_shared_memory("io").status().code(), StatusCode::kNotFound);
  // Bob may use the same name for his own.
  ASSERT_TRUE(bob.register_shared_memory("io", a.buf.key(), 0, size).ok());
  EXPECT_TRUE(a.call(bob, "io").ok());
  EXPECT_EQ(*alice.unregister_shared_memory(), 1);
  EXPECT_TRUE(a.call(bob, "io").ok());
  Client nobody(server.address());
  EXPECT_EQ(nobody.register_shared_memory("x", a.buf.key(), 0, size).status().code(),
            StatusCode::kUnauthenticated);
}

TEST(SharedMemory, ShrunkRegionFailsByNameAndTheServerServesOn) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  AttentionInShm a(rng);
  const auto size = static_cast<std::int64_t>(a.buf.size());
  ASSERT_TRUE(client.register_shared_memory("io", a.buf.key(), 0, size).ok());
  auto good = a.call(client, "io");
  ASSERT_TRUE(good.ok());
  // Shrunk under the inputs: a short read, named.
  ASSERT_EQ(::ftruncate(a.buf.fd(), 16), 0);
  auto shrunk = a.call(client, "io", false);
  EXPECT_EQ(shrunk.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(shrunk.status().message(), HasSubstr("region \"io\""));
  EXPECT_THAT(shrunk.status().message(), HasSubstr("truncated"));
  // Shrunk under the output only: the write is refused (and does not grow the object back).
  a = AttentionInShm(rng);  // fresh inputs, new object
  ASSERT_TRUE(client.unregister_shared_memory("io").ok());
  ASSERT_TRUE(client.register_shared_memory("io", a.buf.key(), 0, size).ok());
  ASSERT_EQ(::ftruncate(a.buf.fd(), a.o_offset + 8), 0);
  auto out_shrunk = a.call(client, "io", false);
  EXPECT_EQ(out_shrunk.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(out_shrunk.status().message(), HasSubstr("output_shm (o)"));
  struct stat st {};
  ASSERT_EQ(::fstat(a.buf.fd(), &st), 0);
  EXPECT_EQ(st.st_size, a.o_offset + 8);
  // Grown back: served again.
  ASSERT_EQ(::ftruncate(a.buf.fd(), size), 0);
  std::memcpy(static_cast<char*>(a.buf.data()), a.q.data(), a.q.bytes());
  std::memcpy(static_cast<char*>(a.buf.data()) + a.offsets[1], a.k.data(), a.k.bytes());
  std::memcpy(static_cast<char*>(a.buf.data()) + a.offsets[2], a.v.data(), a.v.bytes());
  auto again = a.call(client, "io");
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  AttentionOptions opts;
  opts.causal = true;
  auto ref = client.attention(a.q, a.k, a.v, opts);
  ASSERT_TRUE(ref.ok());
  EXPECT_TRUE(same_bytes(ref->output, again->output.data()));
}

// Shrinks, unlinks or rewrites the object over and over while calls run on a big region; every
// call answers OK or a status naming the region, the server lives, and the next call is right.
void hammer(const std::string& what) {
  testing::ServerProcess server(ATTND_PATH, kShm);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  AttentionInShm a(rng, {1, 4, 512, 64});  // 512 KiB per tensor: reads take a while
  const auto size = static_cast<std::int64_t>(a.buf.size());
  ASSERT_TRUE(client.register_shared_memory("io", a.buf.key(), 0, size).ok());
  std::atomic<bool> stop{false};
  std::thread vandal([&] {
    std::mt19937_64 r(7);
    while (!stop) {
      if (what == "shrink") {
        (void)::ftruncate(a.buf.fd(), static_cast<off_t>(r() % static_cast<std::uint64_t>(size)));
        std::this_thread::sleep_for(std::chrono::microseconds(r() % 300));
        (void)::ftruncate(a.buf.fd(), size);
      } else if (what == "rewrite") {
        std::memset(a.buf.data(), static_cast<int>(r() & 0xff), a.buf.size() / 2);
      } else {  // unlink: the server keeps its descriptor; a new object takes the name
        ::shm_unlink(a.buf.key().c_str());
        const int fd = ::shm_open(a.buf.key().c_str(), O_RDWR | O_CREAT, 0600);
        if (fd >= 0) {
          (void)::ftruncate(fd, 8);
          ::close(fd);
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(r() % 500));
    }
  });
  int ok = 0, refused = 0;
  for (int i = 0; i < 60; ++i) {
    auto r = a.call(client, "io", false);
    if (r.ok()) {
      ++ok;
    } else {
      ++refused;
      EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition) << r.status().to_string();
      EXPECT_THAT(r.status().message(), HasSubstr("region \"io\""));
    }
  }
  stop = true;
  vandal.join();
  std::printf("%s: %d calls served, %d refused\n", what.c_str(), ok, refused);
  if (what == "unlink") {
    EXPECT_EQ(refused, 0) << "the server reads through the descriptor it opened";
  }
  // Restored: the next call is right.
  ASSERT_EQ(::ftruncate(a.buf.fd(), size), 0);
  std::memcpy(static_cast<char*>(a.buf.data()), a.q.data(), a.q.bytes());
  std::memcpy(static_cast<char*>(a.buf.data()) + a.offsets[1], a.k.data(), a.k.bytes());
  std::memcpy(static_cast<char*>(a.buf.data()) + a.offsets[2], a.v.data(), a.v.bytes());
  auto after = a.call(client, "io");
  ASSERT_TRUE(after.ok()) << after.status().to_string() << server.log();
  AttentionOptions opts;
  opts.causal = true;
  auto ref = client.attention(a.q, a.k, a.v, opts);
  ASSERT_TRUE(ref.ok());
  EXPECT_TRUE(same_bytes(ref->output, after->output.data()));
  if (what == "unlink") {
    // Re-registering by the key now finds the new, small object.
    EXPECT_EQ(client.register_shared_memory("io2", a.buf.key(), 0, size).status().code(),
              StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(client.server_info().ok());
}

TEST(SharedMemory, RegionShrunkMidCall) { hammer("shrink"); }
TEST(SharedMemory, RegionUnlinkedMidCall) { hammer("unlink"); }
TEST(SharedMemory, RegionRewrittenMidCall) { hammer("rewrite"); }

TEST(SharedMemory, RegionsCountAgainstTheQuota) {
  std::vector<std::string> args = kShm;
  args.insert(args.end(), {"--tensor-quota-mb", "1"});
  testing::ServerProcess server(ATTND_PATH, args);
  Client client(server.address());
  auto buf = SharedMemoryBuffer::create(2 << 20);
  ASSERT_TRUE(buf.ok());
  auto big = client.register_shared_memory("big", buf->key(), 0, (1 << 20) + 1);
  EXPECT_EQ(big.status().code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(big.status().message(), HasSubstr("quota"));
  ASSERT_TRUE(client.register_shared_memory("half", buf->key(), 0, 600 << 10).ok());
  std::mt19937_64 rng(testing::seed());
  EXPECT_EQ(client.put_tensor(random_tensor(DType::kFloat32, {128, 1024}, rng)).status().code(),
            StatusCode::kResourceExhausted)
      << "the region's bytes are taken";
  ASSERT_TRUE(client.unregister_shared_memory("half").ok());
  EXPECT_TRUE(client.put_tensor(random_tensor(DType::kFloat32, {128, 1024}, rng)).ok());
}

TEST(SharedMemory, OffUnlessTheFlagSaysSo) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  AttentionInShm a(rng);
  auto reg =
      client.register_shared_memory("io", a.buf.key(), 0, static_cast<std::int64_t>(a.buf.size()));
  EXPECT_EQ(reg.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(reg.status().message(), HasSubstr("--shared-memory"));
  auto call = a.call(client, "io");
  EXPECT_EQ(call.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(call.status().message(), HasSubstr("--shared-memory"));
  EXPECT_EQ(client.shared_memory_status().status().code(), StatusCode::kFailedPrecondition);

  // CUDA IPC asked of a server that has it off, or of this build.
  testing::ServerProcess shm(ATTND_PATH, kShm);
  Client c2(shm.address());
  v1::RegisterSharedMemoryRequest req;
  req.set_name("gpu");
  req.set_kind(v1::SHARED_MEMORY_KIND_CUDA);
  req.set_cuda_ipc_handle(std::string(64, '\0'));
  req.set_bytes(64);
  v1::RegisterSharedMemoryResponse resp;
  const grpc::Status s = c2.stub().RegisterSharedMemory(c2.make_context(req).get(), req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("cuda"));

  // On a server with the flag but no GPU: refused by name.
  testing::ServerProcess cuda_cpu(ATTND_PATH,
                                  {"--backend", "cpu", "--shared-memory", "system,cuda"});
  Client c3(cuda_cpu.address());
  const grpc::Status no_gpu =
      c3.stub().RegisterSharedMemory(c3.make_context(req).get(), req, &resp);
  EXPECT_EQ(no_gpu.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(no_gpu.error_message(), HasSubstr("serves no GPU"));
}

// A caller from another host could only name somebody else's object: registration is for loopback
// and Unix-socket peers. Reached here through this host's own non-loopback address, where it has
// one.
TEST(SharedMemory, RegistrationFromAnotherHostIsRefused) {
  std::string ip;
  ifaddrs* ifs = nullptr;
  if (getifaddrs(&ifs) == 0) {
    for (ifaddrs* i = ifs; i && ip.empty(); i = i->ifa_next) {
      if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
      char text[INET_ADDRSTRLEN] = {};
      inet_ntop(AF_INET, &reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr, text, sizeof text);
      if (std::string(text).rfind("127.", 0) != 0) ip = text;
    }
    freeifaddrs(ifs);
  }
  if (ip.empty()) GTEST_SKIP() << "this host has no non-loopback IPv4 address";
  testing::ServerProcessOptions options;
  options.listen = "0.0.0.0:0";
  testing::ServerProcess server(ATTND_PATH, kShm, options);
  auto buf = SharedMemoryBuffer::create(4096);
  ASSERT_TRUE(buf.ok()) << buf.status().to_string();
  Client remote(ip + ":" + std::to_string(server.port()));
  auto reg = remote.register_shared_memory("r", buf->key(), 0, 4096);
  EXPECT_EQ(reg.status().code(), StatusCode::kFailedPrecondition) << reg.status().to_string();
  EXPECT_THAT(reg.status().message(), HasSubstr("server's host"));
  Client local(server.address());  // the same server over loopback takes it
  EXPECT_TRUE(local.register_shared_memory("r", buf->key(), 0, 4096).ok());
}

TEST(SharedMemory, BadFlagStopsTheServer) {
  EXPECT_THROW(testing::ServerProcess(ATTND_PATH, {"--backend", "cpu", "--shared-memory", "gpu"}),
               std::runtime_error);
}

TEST(SharedMemory, MetricsCountBytesEachWay) {
  std::vector<std::string> args = kShm;
  args.insert(args.end(), {"--metrics-listen", "127.0.0.1:0"});
  testing::ServerProcess server(ATTND_PATH, args);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  AttentionInShm a(rng);
  ASSERT_TRUE(
      client.register_shared_memory("io", a.buf.key(), 0, static_cast<std::int64_t>(a.buf.size()))
          .ok());
  ASSERT_TRUE(a.call(client, "io").ok());
  const std::string text = testing::http_get(server.metrics_port(), "/metrics");
  EXPECT_THAT(text,
              HasSubstr("attnd_shared_memory_bytes_total{direction=\"in\",op=\"attention\"} " +
                        std::to_string(3 * a.q.bytes())));
  EXPECT_THAT(text,
              HasSubstr("attnd_shared_memory_bytes_total{direction=\"out\",op=\"attention\"} " +
                        std::to_string(a.q.bytes())));
}

// Decode and Prefill decode their inputs as every op does: q inline, K from a shared-memory
// region, V from a resident tensor give the same bits as all three inline (a twin cache fed the
// same tokens inline), the region's bytes are counted; a bad reference is refused by its field
// and leaves the cache as it was.
TEST(SharedMemory, KvCallsTakeInputsFromEverySource) {
  std::vector<std::string> args = kShm;
  args.insert(args.end(), {"--metrics-listen", "127.0.0.1:0"});
  testing::ServerProcess server(ATTND_PATH, args);
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  const int hkv = 2, hq = 6, d = 32;
  v1::KvCacheConfig config;
  config.set_layers(1);
  config.set_kv_heads(hkv);
  config.set_head_dim(d);
  config.set_dtype(v1::D_TYPE_FLOAT32);
  config.set_page_size(16);
  config.set_capacity_tokens(1024);
  auto create = [&] {
    auto c = client.create_kv_cache(config);
    EXPECT_TRUE(c.ok()) << c.status().to_string();
    return c.ok() ? c->handle() : std::string();
  };
  const std::string mixed = create(), plain = create();
  const std::int64_t rows = 33;  // a prompt of 33: three pages of 16
  Tensor q = random_tensor(DType::kFloat32, {rows, hq, d}, rng),
         k = random_tensor(DType::kFloat32, {rows, hkv, d}, rng),
         v = random_tensor(DType::kFloat32, {rows, hkv, d}, rng);
  auto buf = SharedMemoryBuffer::create(k.bytes());
  ASSERT_TRUE(buf.ok()) << buf.status().to_string();
  std::memcpy(buf->data(), k.data(), k.bytes());
  ASSERT_TRUE(
      client.register_shared_memory("kv", buf->key(), 0, static_cast<std::int64_t>(k.bytes()))
          .ok());
  auto v_resident = client.put_tensor(v);
  ASSERT_TRUE(v_resident.ok()) << v_resident.status().to_string();

  auto prefill = [&](const std::string& cache, bool from_elsewhere, v1::PrefillResponse* resp) {
    v1::PrefillRequest req;
    req.set_cache(cache);
    req.add_sequence_ids("s");
    req.add_lens(rows);
    wire::encode_tensor(q.view(), req.mutable_q());
    if (from_elsewhere) {
      *req.mutable_k() = Client::in_shared_memory(DType::kFloat32, k.shape(), "kv", 0);
      req.mutable_v()->set_handle(v_resident->handle());
    } else {
      wire::encode_tensor(k.view(), req.mutable_k());
      wire::encode_tensor(v.view(), req.mutable_v());
    }
    return client.stub().Prefill(client.make_context(req).get(), req, resp);
  };
  v1::PrefillResponse got, want;
  const grpc::Status s = prefill(mixed, true, &got);
  ASSERT_TRUE(s.ok()) << s.error_message();
  ASSERT_TRUE(prefill(plain, false, &want).ok());
  EXPECT_EQ(got.o().data(), want.o().data());
  EXPECT_FALSE(got.o().data().empty());
  EXPECT_EQ(got.lengths(0), rows);
  const std::string text = testing::http_get(server.metrics_port(), "/metrics");
  EXPECT_THAT(text,
              HasSubstr("attnd_shared_memory_bytes_total{direction=\"in\",op=\"paged_prefill\"} " +
                        std::to_string(k.bytes())));

  // Decode: k_new from the region (its first row), the rest inline; the same bits again.
  auto decode = [&](const std::string& cache, v1::Tensor k_new, v1::DecodeResponse* resp) {
    v1::DecodeRequest req;
    req.set_cache(cache);
    req.add_sequence_ids("s");
    Tensor q1(DType::kFloat32, {1, hq, d}), v1t(DType::kFloat32, {1, hkv, d});
    std::memcpy(q1.data(), q.data(), q1.bytes());
    std::memcpy(v1t.data(), v.data(), v1t.bytes());
    wire::encode_tensor(q1.view(), req.mutable_q());
    *req.mutable_k_new() = std::move(k_new);
    wire::encode_tensor(v1t.view(), req.mutable_v_new());
    return client.stub().Decode(client.make_context(req).get(), req, resp);
  };
  Tensor k1(DType::kFloat32, {1, hkv, d});
  std::memcpy(k1.data(), k.data(), k1.bytes());
  v1::Tensor k1_inline;
  wire::encode_tensor(k1.view(), &k1_inline);
  v1::DecodeResponse dgot, dwant;
  ASSERT_TRUE(
      decode(mixed, Client::in_shared_memory(DType::kFloat32, {1, hkv, d}, "kv", 0), &dgot).ok());
  ASSERT_TRUE(decode(plain, k1_inline, &dwant).ok());
  EXPECT_EQ(dgot.o().data(), dwant.o().data());
  EXPECT_EQ(dgot.lengths(0), rows + 1);

  // Bad references, each named, the sequence still rows + 1 long after each.
  struct Bad {
    v1::Tensor k_new;
    grpc::StatusCode code;
    std::string field;
  };
  v1::Tensor no_region = Client::in_shared_memory(DType::kFloat32, {1, hkv, d}, "nope", 0);
  v1::Tensor past_end = Client::in_shared_memory(DType::kFloat32, {1, hkv, d}, "kv",
                                                 static_cast<std::int64_t>(k.bytes()) - 4);
  v1::Tensor wrong_shape = Client::in_shared_memory(DType::kFloat32, {1, hkv + 1, d}, "kv", 0);
  v1::Tensor no_handle;
  no_handle.set_handle("t-no-such-tensor");
  v1::Tensor wrong_dtype_handle;  // the resident V is [33, 2, 32]: not a row of k_new
  wrong_dtype_handle.set_handle(v_resident->handle());
  for (const Bad& bad :
       std::vector<Bad>{{no_region, grpc::StatusCode::NOT_FOUND, "k_new.shm.region"},
                        {past_end, grpc::StatusCode::INVALID_ARGUMENT, "k_new.shm"},
                        {wrong_shape, grpc::StatusCode::INVALID_ARGUMENT, "k_new.shape"},
                        {no_handle, grpc::StatusCode::NOT_FOUND, "k_new.handle"},
                        {wrong_dtype_handle, grpc::StatusCode::INVALID_ARGUMENT, "k_new.shape"}}) {
    v1::DecodeResponse r;
    const grpc::Status bs = decode(mixed, bad.k_new, &r);
    EXPECT_EQ(bs.error_code(), bad.code) << bad.field << ": " << bs.error_message();
    EXPECT_THAT(bs.error_message(), HasSubstr(bad.field));
  }
  auto described = client.describe_kv_cache(mixed);
  ASSERT_TRUE(described.ok()) << described.status().to_string();
  ASSERT_EQ(described->sequences_size(), 1);
  EXPECT_EQ(described->sequences(0).lengths(0), rows + 1);
}

}  // namespace
}  // namespace attn
