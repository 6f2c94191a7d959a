// Memory under hostile and heavy traffic, against the real attnd (issue #21): strangers' bodies
// stay unread, the in-flight bound refuses what is past it, a call costs about its payload, and
// the memory comes back. The server's RSS is sampled from /proc every 20 ms. Requests are one
// pre-serialized buffer shared by every call (tests/support/memory_probe.h), so this process
// holds one copy however many calls it makes. Sizes fit this machine class (the largest test
// brings the server to ~2.5 GB); under ASan they are a quarter, and the RSS bounds that ASan's
// quarantine and shadow memory would distort are left out.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/memory_probe.h"
#include "support/server_process.h"

#include <thread>

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ATTN_MEMORY_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define ATTN_MEMORY_ASAN 1
#endif

namespace attn {
namespace {

using ::testing::AnyOf;
using ::testing::Eq;

constexpr std::int64_t kMiB = std::int64_t{1} << 20;
#ifdef ATTN_MEMORY_ASAN
constexpr bool kAsan = true;
constexpr std::int64_t kScale = 4;   // requests a quarter of the size
constexpr int kSlowdown = 5;         // time bounds five times wider
#else
constexpr bool kAsan = false;
constexpr std::int64_t kScale = 1;
constexpr int kSlowdown = 1;
#endif
constexpr std::int64_t kBigRequest = 1000 * 1000 * 1000 / kScale;  // "1 GB"
constexpr const char* kToken = "s3cret-token";
constexpr const char* kSoftmax = "/attn.v1.AttnService/Softmax";

testing::ServerProcessOptions with_token() {
  testing::ServerProcessOptions o;
  o.env = {{"ATTND_TOKEN", kToken}};
  return o;
}

std::chrono::milliseconds ms(std::int64_t n) { return std::chrono::milliseconds(n * kSlowdown); }

// RSS of an idle server that has served a few calls (its threads and buffers exist).
std::int64_t idle_rss(const testing::ServerProcess& server) {
  const grpc::ByteBuffer warm = testing::softmax_request_bytes(16 * kMiB);
  for (int i = 0; i < 3; ++i) {
    const auto r = testing::concurrent_calls(server.address(), kSoftmax, warm, 2, kToken);
    EXPECT_TRUE(r[0].status.ok()) << r[0].status.error_message();
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  return server.rss_bytes();
}

// A caller without the token is refused from its metadata: its 1 GB body is never read, so the
// server neither grows nor takes the time the body would take to arrive (~1 s on loopback).
// Before: UNAUTHENTICATED after 7 s, the server 2.6 GB larger at peak.
TEST(Memory, StrangersBodiesStayUnread) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"}, with_token());
  const grpc::ByteBuffer request = testing::softmax_request_bytes(kBigRequest);
  // An op, a method whose requests are small, a server-streaming one; with and without a
  // declared size.
  for (const std::string method : {"Softmax", "GetServerInfo", "GetTensor"})
    for (const std::string token : {"", "wrong-token"})
      for (const bool declare : {true, false}) {
        testing::RssSampler rss(server.pid());
        const auto results = testing::concurrent_calls(server.address(), "/attn.v1.AttnService/" + method, request, 1,
                                                       token, declare);
        EXPECT_EQ(results[0].status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
            << method << ": " << results[0].status.error_message();
        EXPECT_LT(results[0].took, ms(1000)) << method;
        EXPECT_LT(rss.peak() - rss.first(), 32 * kMiB) << method << ", token \"" << token << "\"";
      }
  // A method no service has: refused unread too.
  testing::RssSampler rss(server.pid());
  const auto unknown = testing::concurrent_calls(server.address(), "/attn.v1.AttnService/NoSuchMethod", request, 1, kToken);
  EXPECT_EQ(unknown[0].status.error_code(), grpc::StatusCode::UNIMPLEMENTED) << unknown[0].status.error_message();
  EXPECT_LT(unknown[0].took, ms(1000));
  EXPECT_LT(rss.peak() - rss.first(), 32 * kMiB);
}

// Eight callers with the token send 1 GB at once against a 2 GiB bound: the calls past it are
// refused before their bodies come, the server stays under idle + 2.5 GB, small calls keep
// answering, and afterwards the whole bound is free again (a 1 GB call alone succeeds).
TEST(Memory, InflightBoundRefusesWhatIsPastIt) {
  const std::int64_t bound_mib = 2048 / kScale, max_message_mib = 1024 / kScale;
  testing::ServerProcess server(ATTND_PATH,
                                {"--backend", "cpu", "--max-inflight-mb", std::to_string(bound_mib),
                                 "--max-message-mb", std::to_string(max_message_mib)},
                                with_token());
  const std::int64_t idle = idle_rss(server);
  const grpc::ByteBuffer request = testing::softmax_request_bytes(kBigRequest);
  std::vector<testing::CallResult> results;
  std::int64_t peak = 0;
  {
    testing::RssSampler rss(server.pid());
    testing::SmallCalls small(server.address(), kToken);
    results = testing::concurrent_calls(server.address(), kSoftmax, request, 8, kToken);
    small.stop();
    peak = rss.peak();
    EXPECT_GT(small.calls(), 5);
    EXPECT_EQ(small.failed(), 0);
    // 71 ms measured on a busy 2-core machine; a second allows for a loaded one (before: 5.8 s
    // and a call lost to its 10 s deadline).
    if (!kAsan) {
      EXPECT_LT(small.slowest_us(), 1000 * 1000);
    }
  }
  int refused_at_once = 0;
  for (const auto& r : results) {
    EXPECT_THAT(r.status.error_code(), AnyOf(Eq(grpc::StatusCode::OK), Eq(grpc::StatusCode::RESOURCE_EXHAUSTED)))
        << r.status.error_message();
    if (r.status.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED && r.took < ms(1000)) {
      EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr("--max-inflight-mb"));
      ++refused_at_once;
    }
  }
  // Two requests' room fits the bound, so at least six are refused before their bodies come
  // (each body takes ~1 s to arrive here, the refusals ~60 ms).
  EXPECT_GE(refused_at_once, 6);
  if (!kAsan) {
    EXPECT_LE(peak - idle, 2500 * 1000 * 1000LL) << "idle " << idle / kMiB << " MiB";
  }
  // A client hears its call's status a moment before the server lets go of the call's memory:
  // the last holds go within a few seconds, or they leaked.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::vector<testing::CallResult> alone;
  do {
    alone = testing::concurrent_calls(server.address(), kSoftmax, request, 1, kToken);
    if (alone[0].status.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  } while (std::chrono::steady_clock::now() < deadline);
  EXPECT_TRUE(alone[0].status.ok()) << alone[0].status.error_message();
}

// Calls that do not declare their size (grpcurl, a client of one's own) against the same 2 GiB
// bound: each waits, its body unread, until room for the largest request (--max-message-mb) is
// free, then is read. So they are served one after another under the bound instead of all being
// read at once and refused afterwards (before: the server at 1.6x the bound, +3.5 GB), small calls
// answer meanwhile, and a waiting call that reaches its deadline ends without leaving a trace.
TEST(Memory, UndeclaredCallsWaitForRoomUnderTheBound) {
  const std::int64_t bound_mib = 2048 / kScale, max_message_mib = 1024 / kScale;
  testing::ServerProcess server(ATTND_PATH,
                                {"--backend", "cpu", "--max-inflight-mb", std::to_string(bound_mib),
                                 "--max-message-mb", std::to_string(max_message_mib)},
                                with_token());
  const std::int64_t idle = idle_rss(server);
  const grpc::ByteBuffer request = testing::softmax_request_bytes(kBigRequest);
  std::vector<testing::CallResult> results, hurried;
  std::int64_t peak = 0;
  {
    testing::RssSampler rss(server.pid());
    testing::SmallCalls small(server.address(), kToken);
    std::thread late([&] {
      // Comes while the others hold or wait for the room; its deadline passes while it waits.
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      hurried = testing::concurrent_calls(server.address(), kSoftmax, request, 1, kToken, false, "",
                                          std::chrono::seconds(1));
    });
    // Enough ahead of it that their turns take longer than its deadline, under ASan too.
    results = testing::concurrent_calls(server.address(), kSoftmax, request, kAsan ? 4 : 3, kToken,
                                        /*declare_size=*/false);
    late.join();
    small.stop();
    peak = rss.peak();
    EXPECT_EQ(small.failed(), 0);
  }
  for (const auto& r : results) EXPECT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(hurried[0].status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED) << hurried[0].status.error_message();
  if (!kAsan) {
    EXPECT_LE(peak - idle, 2500 * 1000 * 1000LL) << "idle " << idle / kMiB << " MiB";
  }
  // Nothing is left holding or waiting: a 1 GB undeclared call alone succeeds at once.
  const auto alone = testing::concurrent_calls(server.address(), kSoftmax, request, 1, kToken, false, "",
                                               std::chrono::seconds(60));
  EXPECT_TRUE(alone[0].status.ok()) << alone[0].status.error_message();
}

// The declared size is checked before the body is read (a malformed or too large one) and
// against the body once it has come.
TEST(Memory, DeclaredSizeIsChecked) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--max-message-mb", "64"}, with_token());
  const grpc::ByteBuffer request = testing::softmax_request_bytes(kMiB);
  const std::string size = std::to_string(request.Length());
  struct Case {
    std::string declared;
    grpc::StatusCode code;
    std::string says;
  };
  for (const Case& c : {Case{size, grpc::StatusCode::OK, ""},
                        Case{"12abc", grpc::StatusCode::INVALID_ARGUMENT, "attn-request-bytes: expected the request's size in bytes, got \"12abc\""},
                        Case{"-1", grpc::StatusCode::INVALID_ARGUMENT, "attn-request-bytes: expected"},
                        Case{std::to_string(65 * kMiB), grpc::StatusCode::RESOURCE_EXHAUSTED, "(--max-message-mb)"},
                        Case{"1000", grpc::StatusCode::INVALID_ARGUMENT, "attn-request-bytes: declared 1000 bytes, the request brought " + size}}) {
    const auto r = testing::concurrent_calls(server.address(), kSoftmax, request, 1, kToken, true, c.declared);
    EXPECT_EQ(r[0].status.error_code(), c.code) << c.declared << ": " << r[0].status.error_message();
    EXPECT_THAT(r[0].status.error_message(), ::testing::HasSubstr(c.says)) << c.declared;
  }
}

// One big call costs about its payload, not 2.7-3.5 times it: its request is parsed from gRPC's
// buffers as they are let go and its response sent from where the kernel wrote it. Ten seconds
// after, the server is back within 20% of its idle size.
TEST(Memory, ACallCostsItsPayloadAndGivesItBack) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"}, with_token());
  const std::int64_t idle = idle_rss(server);
  // The request alone: read and parsed, then refused (an unknown variant) before any output.
  {
    const grpc::ByteBuffer request = testing::softmax_request_bytes(kBigRequest, "no_such_variant");
    testing::RssSampler rss(server.pid());
    const auto r = testing::concurrent_calls(server.address(), kSoftmax, request, 1, kToken);
    EXPECT_EQ(r[0].status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << r[0].status.error_message();
    // 1.07x measured (before: 2.6x).
    if (!kAsan) {
      EXPECT_LE(static_cast<double>(rss.peak() - rss.first()), 1.3 * static_cast<double>(request.Length()));
    }
  }
  // The whole call: its request in and its result out (as large), 1.0x measured (before: 1.45x
  // of both, 2.9x of the request).
  {
    const grpc::ByteBuffer request = testing::softmax_request_bytes(kBigRequest);
    testing::RssSampler rss(server.pid());
    const auto r = testing::concurrent_calls(server.address(), kSoftmax, request, 1, kToken);
    EXPECT_TRUE(r[0].status.ok()) << r[0].status.error_message();
    if (!kAsan) {
      EXPECT_LE(static_cast<double>(rss.peak() - rss.first()), 1.3 * 2.0 * static_cast<double>(request.Length()));
    }
  }
  if (kAsan) return;  // freed memory waits in ASan's quarantine
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::int64_t after = server.rss_bytes();
  while (after > idle * 12 / 10 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    after = server.rss_bytes();
  }
  EXPECT_LE(after, idle * 12 / 10) << "idle " << idle / kMiB << " MiB, 10 s after " << after / kMiB << " MiB";
}

}  // namespace
}  // namespace attn
