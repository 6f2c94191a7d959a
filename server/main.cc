// attnd: serves matmul, softmax and attention over gRPC, on a GPU when there is one.
//
// Exit codes: 0 after SIGINT/SIGTERM (in-flight calls drained), 1 when it cannot start, 3 when a
// device fault left it unable to serve (a supervisor should restart it).
#include <signal.h>
#include <unistd.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <mutex>
#include <thread>

#include "attn/version.h"
#include "state/memory_budget.h"
#include "server.h"

namespace {

constexpr int kExitDeviceFault = 3;

// Why the process stops: a signal (exit 0) or a device fault (exit 3). Static: the signal thread
// is detached and may outlive main's frame.
struct StopReason {
  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  int exit_code = 0;

  void set(int code) {
    std::lock_guard lock(mu);
    if (stop) return;
    stop = true;
    exit_code = code;
    cv.notify_all();
  }
  int wait() {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return stop; });
    return exit_code;
  }
};
StopReason stop_reason;

// Flags that are not ServerOptions fields as they are.
struct ProcessFlags {
  std::string log_level = "info", port_file, token_file;
  std::int64_t grace_ms = 0;
};

void add_flags(CLI::App& app, attn::server::ServerOptions& options, ProcessFlags& flags) {
  app.set_version_flag("--version", attn::kVersion);
  app.add_option("--listen", options.listen, "address:port to listen on (port 0 picks a free one)")
      ->capture_default_str();
  app.add_option("--backend", options.backend, "auto (CUDA when a GPU is usable), cpu or cuda")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}))
      ->capture_default_str();
  app.add_option("--devices", options.devices, "CUDA devices to serve on: all, or ordinals like 0,1")
      ->capture_default_str();
  app.add_option("--streams-per-device", options.streams_per_device,
                 "workers per GPU, each with its own stream and queue: one call's copies overlap "
                 "another's kernel")
      ->check(CLI::Range(1, 8))
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
  app.add_option("--shutdown-grace-ms", flags.grace_ms, "how long in-flight calls may finish on SIGTERM")
      ->capture_default_str();
  app.add_option("--tls-cert", options.security.tls_cert_file, "PEM certificate chain: serve TLS");
  app.add_option("--tls-key", options.security.tls_key_file, "PEM private key of --tls-cert");
  app.add_option("--tls-client-ca", options.security.tls_client_ca_file,
                 "PEM CA bundle: require client certificates it signed (mutual TLS)");
  app.add_option("--token-file", flags.token_file,
                 "file holding the bearer token every call must carry (else $ATTND_TOKEN; neither: "
                 "no token)");
  app.add_option("--max-inflight-mb", options.max_inflight_mb,
                 "request and response bytes all calls together may hold at once, MiB; a call past it gets "
                 "RESOURCE_EXHAUSTED (0: half of the memory this process may use)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app.add_option("--tensor-quota-mb", options.tensor_quota_mb,
                 "memory for resident tensors (PutTensor, keep_output) and KV caches, all devices together")
      ->capture_default_str();
  app.add_option("--tensor-ttl-s", options.tensor_ttl_s, "a resident tensor's life after its last use, by default")
      ->capture_default_str();
  app.add_option("--tensor-max-ttl-s", options.tensor_max_ttl_s, "the longest life a client may ask for")
      ->capture_default_str();
  app.add_option("--batch-window-us", options.batch_window_us,
                 "dynamic batching: how long a Decode call may wait for others on its cache to "
                 "share one launch (only where that key had company before; 0: batching off)")
      ->capture_default_str();
  app.add_option("--max-batch-calls", options.max_batch_calls, "dynamic batching: the most calls one launch serves")
      ->capture_default_str();
  app.add_option("--advertise-address", options.advertise_address,
                 "HOST:PORT clients of several replicas reach this one at; KV caches name it (default: "
                 "--listen's address, a wildcard host replaced by the host name)");
  app.add_option("--metrics-listen", options.metrics_listen,
                 "serve Prometheus metrics at http://ADDRESS:PORT/metrics (default: off)");
  app.add_option("--shared-memory", options.shared_memory,
                 "let clients on this host pass tensors through shared memory they register: system "
                 "(POSIX shm), cuda (CUDA IPC), or system,cuda (default: off)");
  app.add_flag("--enable-fault-injection", options.fault_injection,
               "tests only: softmax with kernel \"fault_injection/trap\" makes the device fault");
  app.add_option("--log-level", flags.log_level, "trace, debug, info, warn, error")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "critical", "off"}))
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeLast)
      ->capture_default_str();
  app.add_option("--port-file", flags.port_file,
                 "write the bound port (and the metrics port, second line) here once serving");
}

// The bound port (and the metrics port) for whoever started the server with port 0.
void write_port_file(const std::string& path, int port, int metrics_port) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << port << "\n";
    if (metrics_port) out << metrics_port << "\n";
  }
  std::rename(tmp.c_str(), path.c_str());  // readers never see a half-written file
}

// Signals are taken by sigwait on a thread of their own, not by handlers: they are blocked here,
// before any other thread starts, and the thread sets the stop reason.
sigset_t block_stop_signals() {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  return stop_signals;
}

void wait_for_signals(sigset_t stop_signals) {
  std::thread([stop_signals] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    spdlog::info("received {}", sig == SIGINT ? "SIGINT" : "SIGTERM");
    stop_reason.set(0);
  }).detach();
}

}  // namespace

// The CPU backend's OpenMP threads must sleep, not spin, between parallel regions: they share the
// cores with the gRPC threads, and with 4 concurrent decode streams on 2 cores spinning threads
// made each call 2.8x slower (1098 -> 3751 tokens/s with OMP_WAIT_POLICY=passive; one stream and
// one-shot attention unchanged). The OpenMP runtime reads its environment when it is loaded,
// before main, so the server runs itself again with the policy set, unless the user set one.
void ensure_passive_openmp(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY")) return;
  // By the binary's own path, so that the process keeps its name (exec names it after the file:
  // through /proc/self/exe, ps and podman top would show "exe").
  char self[4096];
  const ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return;
  self[n] = '\0';
  setenv("OMP_WAIT_POLICY", "passive", 1);
  execv(self, argv);  // returns only on failure (the file replaced, say): then carry on as we are
}

int main(int argc, char** argv) {
  ensure_passive_openmp(argv);
  attn::server::release_freed_memory_promptly();
  attn::server::ServerOptions options;
  ProcessFlags flags;
  flags.grace_ms = options.shutdown_grace.count();
  CLI::App app{"attnd: attention operations served over gRPC"};
  add_flags(app, options, flags);
  CLI11_PARSE(app, argc, argv);
  options.shutdown_grace = std::chrono::milliseconds(flags.grace_ms);
  spdlog::set_level(spdlog::level::from_str(flags.log_level));

  auto token = attn::server::load_token(flags.token_file);
  if (!token.ok()) {
    spdlog::critical("cannot start: {}", token.status().message());
    return 1;
  }
  options.security.token = *token;
  const sigset_t stop_signals = block_stop_signals();
  options.on_fatal = [](const std::string& why) {
    spdlog::critical("stopping with exit code {} so that a supervisor restarts the server: {}",
                     kExitDeviceFault, why);
    stop_reason.set(kExitDeviceFault);
  };
  auto server = attn::server::Server::start(options);
  if (!server.ok()) {
    spdlog::critical("cannot start: {}", server.status().message());
    return 1;
  }
  if (!flags.port_file.empty()) write_port_file(flags.port_file, (*server)->port(), (*server)->metrics_port());
  wait_for_signals(stop_signals);
  const int exit_code = stop_reason.wait();
  (*server)->shutdown();
  return exit_code;
}
