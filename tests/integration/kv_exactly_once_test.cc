// Exactly-once Decode and Prefill under faults, against the real attnd (CPU backend). A decode
// loop (two groups of two sequences, each group on its own thread; three layers; a prefill, then
// decode steps; every call carrying expected_lengths) runs through a loopback proxy
// (support/fault_proxy.h) that, from the test's seed, resets connections, delays and stalls bytes
// and drops responses after the server ran the call; some calls are also sent with a deadline
// that expires mid-call, some cancelled in flight, and some sent straight to the server with
// their response thrown away (a lost response, for certain). The client resends on its own
// (KvRetryOptions); the test sends a call again when the client gives up. The same loop runs
// fault-free on a cache of its own: at the end every output and every sequence's K/V (ReadKv)
// equal the fault-free run's, bit for bit. ATTN_TEST_SEED replays a run's draws.
#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>

#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>

#include "attn/client.h"
#include "attn/wire.h"
#include "support/fault_proxy.h"
#include "support/kv_mirror.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using testing::random_tensor;
using testing::to_wire;
using Clock = std::chrono::steady_clock;

constexpr int kLayers = 3, kDecodeSteps = 12, kGroups = 2, kHkv = 2, kHq = 4, kD = 16;

// One call of the loop: its sequences, new tokens, inputs and expectation.
struct Call {
  int layer = 0;
  bool prefill = false;
  std::vector<std::string> ids;
  std::vector<std::int64_t> lens, expected;
  Tensor q, k, v;
};

// The calls of one group in order: its prefill at every layer, then each step at every layer.
std::vector<Call> make_calls(int group, std::mt19937_64& rng) {
  const std::vector<std::string> ids{"g" + std::to_string(group) + "a",
                                     "g" + std::to_string(group) + "b"};
  std::uniform_int_distribution<std::int64_t> prompt(3, 20);
  const std::vector<std::int64_t> lens{prompt(rng), prompt(rng)};
  std::vector<Call> calls;
  for (int step = 0; step <= kDecodeSteps; ++step)
    for (int layer = 0; layer < kLayers; ++layer) {
      Call c;
      c.layer = layer;
      c.prefill = step == 0;
      c.ids = ids;
      c.lens = c.prefill ? lens : std::vector<std::int64_t>{1, 1};
      c.expected = c.prefill ? std::vector<std::int64_t>{0, 0}
                             : std::vector<std::int64_t>{lens[0] + step - 1, lens[1] + step - 1};
      const std::int64_t rows = c.lens[0] + c.lens[1];
      c.q = random_tensor(DType::kFloat32, {rows, kHq, kD}, rng);
      c.k = random_tensor(DType::kFloat32, {rows, kHkv, kD}, rng);
      c.v = random_tensor(DType::kFloat32, {rows, kHkv, kD}, rng);
      calls.push_back(std::move(c));
    }
  return calls;
}

// What a call answered: o and lse bytes, lengths.
std::string answer(const KvOpResult& r) {
  std::string s(static_cast<const char*>(r.output.data()), r.output.bytes());
  s.append(static_cast<const char*>(r.lse.data()), r.lse.bytes());
  for (auto len : r.lengths) s += "," + std::to_string(len);
  return s;
}

Result<KvOpResult> send(Client& client, const std::string& cache, const Call& c) {
  if (c.prefill) {
    PrefillOptions o;
    o.return_lse = true;
    o.expected_lengths = c.expected;
    return client.prefill(cache, c.layer, c.ids, c.lens, c.q, c.k, c.v, o);
  }
  DecodeOptions o;
  o.return_lse = true;
  o.expected_lengths = c.expected;
  return client.decode(cache, c.layer, c.ids, c.q, c.k, c.v, o);
}

// The same call as the stub's request (what Client::decode/prefill send), for the attempts the
// test disturbs itself: a deadline, a cancellation, a response thrown away.
grpc::Status send_raw(v1::AttnService::Stub& stub, grpc::ClientContext* ctx,
                      const std::string& cache, const Call& c) {
  if (c.prefill) {
    v1::PrefillRequest req;
    req.set_cache(cache);
    req.set_layer(c.layer);
    for (const auto& id : c.ids) req.add_sequence_ids(id);
    req.mutable_lens()->Assign(c.lens.begin(), c.lens.end());
    *req.mutable_q() = to_wire(c.q);
    *req.mutable_k() = to_wire(c.k);
    *req.mutable_v() = to_wire(c.v);
    req.set_return_lse(true);
    req.mutable_expected_lengths()->Assign(c.expected.begin(), c.expected.end());
    v1::PrefillResponse resp;
    return stub.Prefill(ctx, req, &resp);
  }
  v1::DecodeRequest req;
  req.set_cache(cache);
  req.set_layer(c.layer);
  for (const auto& id : c.ids) req.add_sequence_ids(id);
  *req.mutable_q() = to_wire(c.q);
  *req.mutable_k_new() = to_wire(c.k);
  *req.mutable_v_new() = to_wire(c.v);
  req.set_return_lse(true);
  req.mutable_expected_lengths()->Assign(c.expected.begin(), c.expected.end());
  v1::DecodeResponse resp;
  return stub.Decode(ctx, req, &resp);
}

std::string create_cache(Client& client) {
  v1::KvCacheConfig c;
  c.set_layers(kLayers);
  c.set_kv_heads(kHkv);
  c.set_head_dim(kD);
  c.set_dtype(v1::D_TYPE_FLOAT32);
  c.set_page_size(8);
  c.set_capacity_tokens(1024);
  auto info = client.create_kv_cache(c);
  EXPECT_TRUE(info.ok()) << info.status().to_string();
  return info.ok() ? info->handle() : "";
}

// Every sequence's K and V at every layer.
std::map<std::string, std::string> contents(Client& client, const std::string& cache) {
  std::map<std::string, std::string> out;
  for (int g = 0; g < kGroups; ++g)
    for (const char* s : {"a", "b"})
      for (int layer = 0; layer < kLayers; ++layer) {
        const std::string id = "g" + std::to_string(g) + s;
        auto kv = client.read_kv(cache, id, layer);
        EXPECT_TRUE(kv.ok()) << kv.status().to_string();
        if (!kv.ok()) continue;
        std::string& bytes = out[id + "/" + std::to_string(layer)];
        bytes.assign(static_cast<const char*>(kv->k.data()), kv->k.bytes());
        bytes.append(static_cast<const char*>(kv->v.data()), kv->v.bytes());
      }
  return out;
}

struct Tally {
  std::mutex mu;
  std::map<std::string, int> counts;
  void add(const std::string& what, int n = 1) {
    std::lock_guard lock(mu);
    counts[what] += n;
  }
};

TEST(KvExactlyOnce, AFaultyPathChangesNothingBitForBit) {
  const std::uint64_t seed = testing::seed();
  std::printf("seed %llu (ATTN_TEST_SEED=%llu replays it)\n", static_cast<unsigned long long>(seed),
              static_cast<unsigned long long>(seed));
  SCOPED_TRACE("seed " + std::to_string(seed));
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  std::mt19937_64 rng(seed);
  std::vector<std::vector<Call>> calls;
  for (int g = 0; g < kGroups; ++g) calls.push_back(make_calls(g, rng));

  Client direct(server.address());
  // The fault-free run: every group on its own thread, straight to the server.
  const std::string clean_cache = create_cache(direct);
  std::vector<std::vector<std::string>> clean(kGroups);
  {
    std::vector<std::thread> threads;
    for (int g = 0; g < kGroups; ++g)
      threads.emplace_back([&, g] {
        for (const Call& c : calls[static_cast<std::size_t>(g)]) {
          auto r = send(direct, clean_cache, c);
          EXPECT_TRUE(r.ok()) << r.status().to_string();
          EXPECT_FALSE(r.ok() && r->replayed);
          clean[static_cast<std::size_t>(g)].push_back(r.ok() ? answer(*r) : "");
        }
      });
    for (auto& t : threads) t.join();
  }

  // The faulty run, through the proxy.
  testing::ProxyFaults faults;
  faults.reset = 0.03;
  faults.drop_response = 0.08;
  faults.delay = 0.15;
  faults.max_delay_ms = 15;
  faults.stall = 0.02;
  faults.stall_ms = 300;
  testing::FaultProxy proxy(server.port(), seed, faults);
  grpc::ChannelArguments args;
  args.SetServiceConfigJSON(retry_service_config());
  // Reconnect soon after a connection attempt fails (gRPC's default first backoff is a second).
  // Its minimum (which is also the time a connection attempt may take) stays at gRPC's default:
  // an attempt progresses only while a call polls for it.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 10);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 100);
  ClientOptions options;
  options.timeout = std::chrono::milliseconds(250);  // per attempt: a stall passes it
  options.kv_retry.max_attempts = 6;
  options.kv_retry.initial_backoff = std::chrono::milliseconds(5);
  options.kv_retry.max_backoff = std::chrono::milliseconds(80);
  Client through(
      grpc::CreateCustomChannel(proxy.address(), grpc::InsecureChannelCredentials(), args),
      options);
  const std::string cache = create_cache(direct);
  through.set_kv_cache_replica(cache, "");  // every call on it over the proxy's channel

  Tally tally;
  std::vector<std::vector<std::string>> faulty(kGroups);
  const auto start = Clock::now();
  {
    std::vector<std::thread> threads;
    for (int g = 0; g < kGroups; ++g)
      threads.emplace_back([&, g] {
        std::mt19937_64 draws(seed ^ (0x9e3779b97f4a7c15ull * static_cast<std::uint64_t>(g + 1)));
        std::uniform_real_distribution<double> u(0.0, 1.0);
        std::uniform_int_distribution<int> ms(0, 6);
        const auto& mine = calls[static_cast<std::size_t>(g)];
        for (std::size_t i = 0; i < mine.size(); ++i) {
          const Call& c = mine[i];
          const double disturb = u(draws);
          const int after_ms = ms(draws);
          // A lost response, for certain, on one fixed call and now and then.
          bool lost = false;
          if (i == 4 || disturb < 0.06) {
            grpc::ClientContext ctx;
            lost = send_raw(direct.stub(), &ctx, cache, c).ok();
            tally.add("lost responses (sent straight, thrown away)", lost);
          } else if (disturb < 0.18) {  // a deadline that expires mid-call
            grpc::ClientContext ctx;
            ctx.set_deadline(std::chrono::system_clock::now() +
                             std::chrono::milliseconds(after_ms));
            const grpc::Status s = send_raw(through.stub(), &ctx, cache, c);
            tally.add("short deadlines: " + status_code_name(static_cast<int>(s.error_code())));
          } else if (disturb < 0.30) {  // cancelled in flight
            grpc::ClientContext ctx;
            std::thread canceller([&] {
              std::this_thread::sleep_for(std::chrono::milliseconds(after_ms));
              ctx.TryCancel();
            });
            const grpc::Status s = send_raw(through.stub(), &ctx, cache, c);
            canceller.join();
            tally.add("cancellations: " + status_code_name(static_cast<int>(s.error_code())));
          }
          if (g == 0 && i == 7) proxy.drop_next_response();
          // The call, through the client's retries; sent again while the client gives up.
          const auto give_up = Clock::now() + std::chrono::seconds(20);
          for (;;) {
            auto r = send(through, cache, c);
            if (r.ok()) {
              if (lost) {
                EXPECT_TRUE(r->replayed) << "the call ran already: group " << g << " call " << i;
              }
              tally.add("replayed", r->replayed);
              tally.add("attempts beyond the first", r->attempts - 1);
              faulty[static_cast<std::size_t>(g)].push_back(answer(*r));
              break;
            }
            const StatusCode code = r.status().code();
            ASSERT_TRUE(code == StatusCode::kUnavailable || code == StatusCode::kDeadlineExceeded)
                << "group " << g << " call " << i << ": " << r.status().to_string();
            tally.add("resent by the test after the client gave up");
            ASSERT_LT(Clock::now(), give_up)
                << "group " << g << " call " << i << " never got through";
          }
        }
      });
    for (auto& t : threads) t.join();
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  proxy.set_enabled(false);

  for (int g = 0; g < kGroups; ++g) {
    const auto& a = clean[static_cast<std::size_t>(g)];
    const auto& b = faulty[static_cast<std::size_t>(g)];
    ASSERT_EQ(a.size(), b.size()) << "group " << g;
    for (std::size_t i = 0; i < a.size(); ++i)
      EXPECT_TRUE(a[i] == b[i]) << "group " << g << " call " << i << " answered other bytes";
  }
  const auto want = contents(direct, clean_cache);
  const auto got = contents(direct, cache);
  ASSERT_EQ(want.size(), got.size());
  for (const auto& [where, bytes] : want)
    EXPECT_TRUE(got.at(where) == bytes) << where << ": the K/V differ from the fault-free run";

  const auto& st = proxy.stats();
  std::printf(
      "faulty run: %.2f s; proxy: %d connections, %d resets, %d responses dropped (+%d forced), "
      "%d delays, %d stalls\n",
      seconds, st.connections.load(), st.resets.load(), st.dropped_responses.load(),
      st.forced_drops.load(), st.delays.load(), st.stalls.load());
  for (const auto& [what, n] : tally.counts) std::printf("  %s: %d\n", what.c_str(), n);
  EXPECT_GE(tally.counts["replayed"], 1);
  EXPECT_EQ(st.forced_drops.load(), 1);
}

// What one caller of the merged-launch test saw: its answers and refusals in order, and how many
// of its calls shared a launch.
struct JudgedLog {
  std::vector<std::string> events;
  int merged = 0;
};

// Callers on one cache, each on its own sequence, sending together (a barrier per step) so that
// their calls wait in the queue together: one sends its call; one sends it twice (the second a
// repeat); one first sends a wrong expectation, then its call; one first sends another payload
// under the previous step's expectation (not a repeat), then its call. Returns what each saw,
// then every sequence's K/V.
std::pair<std::vector<JudgedLog>, std::map<std::string, std::string>> run_judged_callers(
    const std::string& address, std::uint64_t seed) {
  constexpr int kCallers = 8, kSteps = 10;
  Client client(address);
  const std::string cache = create_cache(client);
  std::mt19937_64 rng(seed);
  auto decode_req = [&](int caller, std::int64_t expected) {
    v1::DecodeRequest req;
    req.set_cache(cache);
    req.set_layer(caller % kLayers);
    req.add_sequence_ids("s" + std::to_string(caller));
    *req.mutable_q() = to_wire(random_tensor(DType::kFloat32, {1, kHq, kD}, rng));
    *req.mutable_k_new() = to_wire(random_tensor(DType::kFloat32, {1, kHkv, kD}, rng));
    *req.mutable_v_new() = to_wire(random_tensor(DType::kFloat32, {1, kHkv, kD}, rng));
    req.add_expected_lengths(expected);
    return req;
  };
  // Every request made up front, in one order, so that both servers get the same bytes.
  std::vector<std::vector<v1::DecodeRequest>> calls(kCallers), others(kCallers);
  for (int c = 0; c < kCallers; ++c) {
    Tensor q = random_tensor(DType::kFloat32, {5, kHq, kD}, rng);
    Tensor k = random_tensor(DType::kFloat32, {5, kHkv, kD}, rng);
    Tensor v = random_tensor(DType::kFloat32, {5, kHkv, kD}, rng);
    PrefillOptions o;
    o.expected_lengths = {0};
    EXPECT_TRUE(
        client.prefill(cache, c % kLayers, {"s" + std::to_string(c)}, {5}, q, k, v, o).ok());
    for (int step = 0; step < kSteps; ++step) {
      calls[static_cast<std::size_t>(c)].push_back(decode_req(c, 5 + step));
      others[static_cast<std::size_t>(c)].push_back(decode_req(c, 5 + step - 1));
    }
  }
  std::vector<JudgedLog> logs(kCallers);
  std::barrier step_together(kCallers);
  std::vector<std::thread> threads;
  for (int c = 0; c < kCallers; ++c)
    threads.emplace_back([&, c] {
      Client own(address);
      JudgedLog& log = logs[static_cast<std::size_t>(c)];
      auto send = [&](const v1::DecodeRequest& req) {
        v1::DecodeResponse resp;
        grpc::ClientContext ctx;
        const grpc::Status s = own.stub().Decode(&ctx, req, &resp);
        if (!s.ok()) {
          log.events.push_back(status_code_name(static_cast<int>(s.error_code())));
          return;
        }
        log.merged += resp.timings().batched_calls() > 1;
        log.events.push_back(std::string(resp.replayed() ? "replayed " : "applied ") +
                             resp.o().data() + std::to_string(resp.lengths(0)));
      };
      for (int step = 0; step < kSteps; ++step) {
        const v1::DecodeRequest& call =
            calls[static_cast<std::size_t>(c)][static_cast<std::size_t>(step)];
        step_together.arrive_and_wait();
        switch (c % 4) {
          case 1:
            send(call);
            break;
          case 2: {
            v1::DecodeRequest wrong = call;
            wrong.set_expected_lengths(0, 5 + step + 3);
            send(wrong);
            break;
          }
          case 3:
            if (step > 0) send(others[static_cast<std::size_t>(c)][static_cast<std::size_t>(step)]);
            break;
        }
        send(call);
      }
    });
  for (auto& t : threads) t.join();
  std::map<std::string, std::string> kv;
  for (int c = 0; c < kCallers; ++c) {
    auto r = client.read_kv(cache, "s" + std::to_string(c), c % kLayers);
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (r.ok()) {
      kv[std::to_string(c)].assign(static_cast<const char*>(r->k.data()), r->k.bytes());
      kv[std::to_string(c)].append(static_cast<const char*>(r->v.data()), r->v.bytes());
    }
  }
  return {logs, kv};
}

// Calls waiting together on one cache share a launch; each is judged on its own: a repeat is
// answered from its record, a refused one fails alone, and every other gets the bits it gets with
// batching off.
TEST(KvExactlyOnce, CallsInAMergedLaunchAreJudgedOneByOne) {
  const std::uint64_t seed = testing::seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::pair<std::vector<JudgedLog>, std::map<std::string, std::string>> alone, merged;
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "0"});
    alone = run_judged_callers(server.address(), seed);
  }
  {
    testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--batch-window-us", "2000"});
    merged = run_judged_callers(server.address(), seed);
  }
  int shared = 0;
  for (std::size_t c = 0; c < alone.first.size(); ++c) {
    EXPECT_EQ(alone.first[c].merged, 0);
    shared += merged.first[c].merged;
    ASSERT_EQ(alone.first[c].events.size(), merged.first[c].events.size()) << "caller " << c;
    for (std::size_t e = 0; e < alone.first[c].events.size(); ++e) {
      const std::string& a = alone.first[c].events[e];
      EXPECT_TRUE(a == merged.first[c].events[e])
          << "caller " << c << " event " << e << ": " << a.substr(0, 20) << " vs "
          << merged.first[c].events[e].substr(0, 20);
      // What each role must see, with or without company.
      const bool refused = (c % 4 == 2 && e % 2 == 0) || (c % 4 == 3 && e % 2 == 1);
      if (refused) {
        EXPECT_EQ(a, "FAILED_PRECONDITION") << "caller " << c << " event " << e;
      } else if (c % 4 == 1 && e % 2 == 1) {
        EXPECT_EQ(a.rfind("replayed ", 0), 0u) << "caller " << c << " event " << e;
      } else {
        EXPECT_EQ(a.rfind("applied ", 0), 0u) << "caller " << c << " event " << e;
      }
    }
  }
  EXPECT_TRUE(alone.second == merged.second) << "the caches differ";
  std::printf("calls that shared a launch: %d\n", shared);
  EXPECT_GT(shared, 0) << "no call shared a launch";
}

// A response lost once the server ran the call: without expected_lengths the client reports
// UNAVAILABLE (the token was appended all the same); with them it resends and gets the recorded
// answer. FAILED_PRECONDITION is not resent.
TEST(KvExactlyOnce, OnlyCallsWithExpectationsAreResent) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  testing::FaultProxy proxy(server.port(), testing::seed(), {});
  ClientOptions options;
  options.timeout = std::chrono::seconds(20);
  options.kv_retry.initial_backoff = std::chrono::milliseconds(1);
  Client direct(server.address());
  Client through(proxy.address(), options);
  const std::string cache = create_cache(direct);
  through.set_kv_cache_replica(cache, proxy.address());
  std::mt19937_64 rng(testing::seed());
  auto row = [&](std::int64_t heads) {
    return random_tensor(DType::kFloat32, {1, heads, kD}, rng);
  };
  auto length = [&] {
    auto info = direct.describe_kv_cache(cache);
    return info.ok() && info->sequences_size() == 1 ? info->sequences(0).lengths(0) : -1;
  };
  Tensor q = row(kHq), k = row(kHkv), v = row(kHkv);
  PrefillOptions first;
  first.expected_lengths = {0};
  proxy.drop_next_response();
  auto p = through.prefill(cache, 0, {"s"}, {1}, q, k, v, first);
  ASSERT_TRUE(p.ok()) << p.status().to_string();
  EXPECT_TRUE(p->replayed);
  EXPECT_GE(p->attempts, 2);  // 3 where the resend met the channel reconnecting
  EXPECT_EQ(length(), 1);

  q = row(kHq), k = row(kHkv), v = row(kHkv);
  proxy.drop_next_response();
  auto plain = through.decode(cache, 0, {"s"}, q, k, v);
  EXPECT_EQ(plain.status().code(), StatusCode::kUnavailable) << plain.status().to_string();
  EXPECT_EQ(length(), 2) << "applied, though its caller cannot tell";

  DecodeOptions wrong;
  wrong.expected_lengths = {1};
  auto refused = through.decode(cache, 0, {"s"}, q, k, v, wrong);
  EXPECT_EQ(refused.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), ::testing::Not(::testing::HasSubstr("attempts")));
  EXPECT_EQ(proxy.stats().forced_drops.load(), 2);
  EXPECT_EQ(length(), 2);
}

}  // namespace
}  // namespace attn
