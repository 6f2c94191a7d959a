// Overload and abandoned calls, against the real attnd on the CPU backend: a full queue refuses at
// once, a call whose deadline passed in the queue is dropped before its kernel runs, and a call
// its client cancelled gives its queue slot back.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <future>
#include <stdexcept>
#include <string>
#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "support/server_load.h"
#include "support/random.h"
#include "support/server_process.h"
#include "support/slow_call.h"

namespace attn {
namespace {

using ::testing::HasSubstr;
using testing::random_tensor;

// A matmul that keeps the server busy for about two seconds (calibrated while other tests may
// load the machine, so it may run several times faster; the tests need only a few hundred ms).
// Its inputs are resident on the server, so that each call is a request of two handles: it is in
// the server's hands at once, not after tens of MB have crossed a loaded machine (a second call
// sent inline once arrived only after the first had finished, and never queued behind it).
struct SlowMatmul {
  explicit SlowMatmul(Client& client) : n(testing::calibrated_matmul_size(client, 2.0)) {
    std::mt19937_64 rng{testing::seed()};
    for (std::string* handle : {&a, &b}) {
      auto put = client.put_tensor(random_tensor(DType::kFloat32, {n, n}, rng));
      if (!put.ok()) throw std::runtime_error("PutTensor failed: " + put.status().to_string());
      *handle = put->handle();
    }
  }
  std::int64_t n;
  std::string a, b;  // resident tensors' handles
};

v1::MatmulRequest request_of(const SlowMatmul& m) {
  v1::MatmulRequest req;
  *req.mutable_a() = Client::resident(m.a);
  *req.mutable_b() = Client::resident(m.b);
  req.set_kernel(testing::kSlowMatmulKernel);
  return req;
}

std::future<grpc::Status> call_async(Client& client, const v1::MatmulRequest& req,
                                     grpc::ClientContext* ctx) {
  return std::async(std::launch::async, [&client, &req, ctx] {
    v1::MatmulResponse resp;
    return client.stub().Matmul(ctx, req, &resp);
  });
}

std::vector<std::string> server_flags(std::vector<std::string> extra) {
  extra.insert(extra.end(), {"--backend", "cpu", "--metrics-listen", "127.0.0.1:0"});
  return extra;
}

TEST(ServerLoad, FullQueueRefusesAtOnce) {
  testing::ServerProcess server(ATTND_PATH, server_flags({"--queue-depth", "1"}));
  Client client(server.address());
  SlowMatmul slow(client);
  const v1::MatmulRequest req = request_of(slow);
  grpc::ClientContext running_ctx, queued_ctx;
  auto running = call_async(client, req, &running_ctx);
  testing::wait_for_load(server, 1);  // it is on the worker now
  auto queued = call_async(client, req, &queued_ctx);
  testing::wait_for_load(server, 2);  // it holds the one slot

  Tensor x = Tensor::from_floats(DType::kFloat32, {2}, {0.0f, 1.0f});
  auto refused = client.softmax(x);
  // "At once" whatever this machine's speed: the refusal came while the slot was still taken, not
  // after waiting for it (the running call, about a second or more, had not finished yet).
  const bool still_running = running.wait_for(std::chrono::seconds(0)) == std::future_status::timeout;
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status().to_string();
  EXPECT_THAT(refused.status().message(), HasSubstr("queue"));
  EXPECT_TRUE(still_running) << "refused only after the running call had finished";
  EXPECT_TRUE(running.get().ok());
  EXPECT_TRUE(queued.get().ok());
  EXPECT_TRUE(client.softmax(x).ok()) << "the queue has room again";
}

TEST(ServerLoad, CancelledCallGivesItsSlotBack) {
  testing::ServerProcess server(ATTND_PATH, server_flags({"--queue-depth", "1"}));
  Client client(server.address());
  SlowMatmul slow(client);
  const v1::MatmulRequest req = request_of(slow);
  grpc::ClientContext running_ctx, cancelled_ctx;
  auto running = call_async(client, req, &running_ctx);
  testing::wait_for_load(server, 1);
  auto cancelled = call_async(client, req, &cancelled_ctx);
  testing::wait_for_load(server, 2);  // queued, holding the slot
  cancelled_ctx.TryCancel();
  EXPECT_EQ(cancelled.get().error_code(), grpc::StatusCode::CANCELLED);

  // The one slot is free again although the running call has not finished. The server hears of
  // the cancel a moment after the client: until then a call may still be refused, so ask again
  // (however slow this machine) as long as the running call runs.
  Tensor x = Tensor::from_floats(DType::kFloat32, {2}, {0.0f, 1.0f});
  Result<OpResult> accepted = internal_error("not sent");
  bool sent_while_running = false;
  for (;;) {
    sent_while_running = running.wait_for(std::chrono::seconds(0)) == std::future_status::timeout;
    accepted = client.softmax(x);  // once accepted, it waits behind the running call
    if (accepted.ok() || accepted.status().code() != StatusCode::kResourceExhausted || !sent_while_running) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(accepted.ok()) << accepted.status().to_string() << "\n" << server.log();
  EXPECT_TRUE(sent_while_running) << "the slot came back only when the running call finished";
  EXPECT_TRUE(running.get().ok());
  EXPECT_THAT(server.log(), HasSubstr("CANCELLED: the caller cancelled the call while it waited"));
}

TEST(ServerLoad, ExpiredCallIsDroppedBeforeItsKernel) {
  testing::ServerProcess server(ATTND_PATH, server_flags({}));
  Client client(server.address());
  SlowMatmul slow(client);
  const v1::MatmulRequest req = request_of(slow);
  const std::size_t log_start = server.log().size();  // after the calibration's matmuls
  // Two slow calls ahead of it (one running, one queued): at least a second of work on any
  // machine this runs on, against 500 ms to live, which is ample for the request to arrive.
  grpc::ClientContext first_ctx, second_ctx, expiring_ctx;
  auto first = call_async(client, req, &first_ctx);
  testing::wait_for_load(server, 1);
  auto second = call_async(client, req, &second_ctx);
  testing::wait_for_load(server, 2);
  // A small request (it must reach the handler well within its deadline), still too big for the
  // inline path of tiny ops: it waits in the queue.
  std::mt19937_64 rng(testing::seed());
  Tensor small = random_tensor(DType::kFloat32, {256, 256}, rng);
  v1::MatmulRequest small_req;
  wire::encode_tensor(small.view(), small_req.mutable_a());
  wire::encode_tensor(small.view(), small_req.mutable_b());
  expiring_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  auto expiring = call_async(client, small_req, &expiring_ctx);
  EXPECT_EQ(expiring.get().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_TRUE(first.get().ok());
  EXPECT_TRUE(second.get().ok());
  Tensor x = Tensor::from_floats(DType::kFloat32, {2}, {0.0f, 1.0f});
  auto next = client.softmax(x);  // runs after the worker has looked at the expired call
  ASSERT_TRUE(next.ok()) << next.status().to_string();
  const std::string log = server.log().substr(log_start);
  EXPECT_THAT(log, HasSubstr("DEADLINE_EXCEEDED: the call's deadline passed while it waited"));
  // Two matmul kernels ran, not three.
  std::size_t ran = 0;
  for (auto pos = log.find("matmul matmul/"); pos != std::string::npos; pos = log.find("matmul matmul/", pos + 1)) ++ran;
  EXPECT_EQ(ran, 2u) << log;
}

}  // namespace
}  // namespace attn
