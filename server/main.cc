// attnd: serves matmul, softmax and attention over gRPC, on a GPU when there is one.
#include <signal.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>

#include "attn/version.h"
#include "server.h"

int main(int argc, char** argv) {
  attn::server::ServerOptions options;
  std::string log_level = "info", port_file;
  std::int64_t grace_ms = options.shutdown_grace.count();

  CLI::App app{"attnd: attention operations served over gRPC"};
  app.set_version_flag("--version", attn::kVersion);
  app.add_option("--listen", options.listen, "address:port to listen on (port 0 picks a free one)")
      ->capture_default_str();
  app.add_option("--backend", options.backend, "auto (CUDA when a GPU is usable), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--max-message-mb", options.max_message_mb, "largest request or response, MiB")
      ->check(CLI::Range(1, 2047))
      ->capture_default_str();
  app.add_option("--max-elements", options.max_elements, "largest tensor accepted, in elements")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--queue-depth", options.queue_depth, "requests waiting per device before refusing")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--shutdown-grace-ms", grace_ms, "how long in-flight calls may finish on SIGTERM")
      ->capture_default_str();
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}))
      ->capture_default_str();
  app.add_option("--port-file", port_file, "write the bound port here once serving (for tests)");
  CLI11_PARSE(app, argc, argv);
  options.shutdown_grace = std::chrono::milliseconds(grace_ms);
  spdlog::set_level(spdlog::level::from_str(log_level));

  // Signals are taken by sigwait below, not by handlers: block them before any thread starts.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  auto server = attn::server::Server::start(options);
  if (!server.ok()) {
    spdlog::critical("cannot start: {}", server.status().message());
    return 1;
  }
  if (!port_file.empty()) {
    const std::string tmp = port_file + ".tmp";
    std::ofstream(tmp) << (*server)->port() << "\n";
    std::rename(tmp.c_str(), port_file.c_str());  // readers never see a half-written file
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  spdlog::info("received {}", sig == SIGINT ? "SIGINT" : "SIGTERM");
  (*server)->shutdown();
  return 0;
}
