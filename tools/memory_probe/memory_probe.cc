// attn-memory-probe: what big calls cost a running attnd, measured from outside. Sends N
// concurrent Softmax calls of one pre-serialized request (a shared buffer: the probe stays small)
// while sampling the server's RSS every 20 ms and timing small GetServerInfo calls beside them;
// prints RSS before / peak / after (and `--settle-s` later), each call's status and time.
//
//   attn-memory-probe --server 127.0.0.1:50051 --pid $(pidof attnd) --mb 1000 --calls 1 [--token T]
#include <CLI/CLI.hpp>

#include <cstdio>

#include "support/memory_probe.h"

int main(int argc, char** argv) {
  CLI::App app{"attn-memory-probe: server RSS under concurrent big calls"};
  std::string server = "127.0.0.1:50051", token;
  int pid = 0, calls = 1, settle_s = 10;
  std::int64_t mb = 100;
  app.add_option("--server", server, "attnd's address");
  app.add_option("--pid", pid, "attnd's process id (its RSS is sampled)")->required();
  app.add_option("--mb", mb, "payload of each call in MB (10^6 bytes)");
  app.add_option("--calls", calls, "concurrent calls");
  std::string kernel;
  bool undeclared = false;
  app.add_flag("--undeclared", undeclared, "do not send the request's size (attn-request-bytes)");
  app.add_option("--kernel", kernel, "the variant to ask for (an unknown one: refused after parsing)");
  app.add_option("--token", token, "bearer token to send (empty: none)");
  app.add_option("--settle-s", settle_s, "seconds to wait after the load before the last RSS sample");
  CLI11_PARSE(app, argc, argv);

  const grpc::ByteBuffer request = attn::testing::softmax_request_bytes(mb * 1000 * 1000, kernel);
  constexpr double kMB = 1e6;
  attn::testing::RssSampler rss(pid);
  attn::testing::SmallCalls small(server, token);
  const auto results = attn::testing::concurrent_calls(server, "/attn.v1.AttnService/Softmax", request, calls, token,
                                                      !undeclared);
  const std::int64_t after = rss.now();
  small.stop();
  std::this_thread::sleep_for(std::chrono::seconds(settle_s));
  std::printf("request %.0f MB x %d calls, %s token, size %s\n", static_cast<double>(request.Length()) / kMB, calls,
              token.empty() ? "no" : "with", undeclared ? "undeclared" : "declared");
  for (const auto& r : results)
    std::printf("  call: %s (%s) in %lld ms\n", grpc::StatusCode(r.status.error_code()) == grpc::StatusCode::OK ? "OK" : std::to_string(r.status.error_code()).c_str(),
                r.status.error_message().substr(0, 120).c_str(), static_cast<long long>(r.took.count()));
  std::printf("server RSS MB: before %.0f, peak %.0f (+%.0f), after %.0f, %d s later %.0f\n", rss.first() / kMB,
              rss.peak() / kMB, (rss.peak() - rss.first()) / kMB, after / kMB, settle_s, rss.now() / kMB);
  std::printf("small calls: %d, failed %d, slowest %.1f ms\n", small.calls(), small.failed(), small.slowest_us() / 1e3);
  return 0;
}
