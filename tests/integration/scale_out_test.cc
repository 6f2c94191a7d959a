// Scale-out as a client sees it: three attnd processes on loopback ports behind one multi-address
// target with gRPC's round_robin policy. Calls spread over all three, and the client keeps
// working when one of them is killed mid-run.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <thread>

#include "attn/client.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

// How many calls the server's log shows it finished.
int served(const testing::ServerProcess& server) {
  const std::string log = server.log();
  int n = 0;
  for (auto pos = log.find("softmax softmax/"); pos != std::string::npos; pos = log.find("softmax softmax/", pos + 1)) ++n;
  return n;
}

TEST(ScaleOut, RoundRobinSpreadsCallsAndSurvivesAReplicaKilledMidRun) {
  std::vector<std::unique_ptr<testing::ServerProcess>> servers;
  std::string target = "ipv4:";
  for (int i = 0; i < 3; ++i) {
    servers.push_back(std::make_unique<testing::ServerProcess>(ATTND_PATH, std::vector<std::string>{"--backend", "cpu"}));
    if (i) target += ",";
    target += servers.back()->address();
  }
  ClientOptions options;
  options.load_balancing = "round_robin";
  options.timeout = std::chrono::seconds(10);
  Client client(target, options);

  // round_robin spreads calls over the connections that are up; wait until all three are, so that
  // each replica's share below is about the load, not about how fast a connection came up.
  {
    std::mt19937_64 rng(testing::seed());
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while ((served(*servers[0]) == 0 || served(*servers[1]) == 0 || served(*servers[2]) == 0) &&
           std::chrono::steady_clock::now() < give_up) {
      (void)client.softmax(testing::random_tensor(DType::kFloat32, {1, 4}, rng));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  // Four callers keep calls in flight while one replica is killed.
  std::atomic<int> ok{0}, failed{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> callers;
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      std::mt19937_64 rng(testing::seed() + t);
      while (!stop) {
        Tensor x = testing::random_tensor(DType::kFloat32, {4, 100}, rng);
        auto r = client.softmax(x);
        if (r.ok()) {
          ++ok;
        } else {
          ++failed;
          std::printf("failed: %s\n", r.status().to_string().c_str());
        }
      }
    });
  auto wait_for_ok = [&](int n) {
    while (ok < n && failed == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  };
  wait_for_ok(150);
  servers[1]->stop(SIGKILL);  // no drain: as if its machine went away, calls in flight
  const int at_kill = ok;
  wait_for_ok(at_kill + 150);
  stop = true;
  for (auto& th : callers) th.join();

  const int s0 = served(*servers[0]), s1 = served(*servers[1]), s2 = served(*servers[2]);
  std::printf("calls served: %d, %d (killed after %d calls in all), %d; %d ok, %d failed\n", s0, s1,
              at_kill, s2, ok.load(), failed.load());
  EXPECT_EQ(failed, 0);
  // Each replica took about a third before the kill; the survivors took the rest.
  EXPECT_GE(s1, at_kill / 5);
  EXPECT_GE(s0, at_kill / 5 + 50);
  EXPECT_GE(s2, at_kill / 5 + 50);
}

}  // namespace
}  // namespace attn
