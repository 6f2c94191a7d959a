// Starts the real attnd binary on a free loopback port and stops it, for integration tests.
#pragma once

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "process_rss.h"

namespace attn::testing {

struct ServerProcessOptions {
  std::string listen = "127.0.0.1:0";
  std::vector<std::pair<std::string, std::string>> env;  // set in the server's environment
};

class ServerProcess {
 public:
  // Runs `binary --listen 127.0.0.1:0 --port-file ... extra...` and waits until it serves. The
  // ATTND environment variable, when set, names the binary instead (a build run elsewhere).
  explicit ServerProcess(std::string binary, std::vector<std::string> extra = {},
                         const ServerProcessOptions& options = {}) {
    if (const char* env = std::getenv("ATTND"); env && *env) binary = env;
    char dir_template[] = "/tmp/attnd-test-XXXXXX";
    const char* dir = mkdtemp(dir_template);
    if (!dir) throw std::runtime_error("mkdtemp failed");
    dir_ = dir;
    port_file_ = dir_ + "/port";
    log_file_ = dir_ + "/attnd.log";
    std::vector<std::string> args{binary, "--listen", options.listen, "--port-file", port_file_,
                                  "--log-level", "debug"};
    args.insert(args.end(), extra.begin(), extra.end());
    pid_ = fork();
    if (pid_ == 0) {
      FILE* log = std::fopen(log_file_.c_str(), "w");
      if (log) {
        dup2(fileno(log), 1);
        dup2(fileno(log), 2);
      }
      for (const auto& [name, value] : options.env) setenv(name.c_str(), value.c_str(), 1);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(port_file_);
      if (in >> port_ && port_ > 0) {
        in >> metrics_port_;
        return;
      }
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        throw std::runtime_error("attnd exited at start: " + log());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    throw std::runtime_error("attnd did not start in 30 s: " + log());
  }

  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    std::remove(port_file_.c_str());
    std::remove(log_file_.c_str());
    rmdir(dir_.c_str());
  }

  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  pid_t pid() const { return pid_; }

  // Sends `sig` and waits for the exit; returns the exit code (or 128 + signal).
  int stop(int sig = SIGTERM, std::chrono::seconds timeout = std::chrono::seconds(30)) {
    if (pid_ <= 0) return -1;
    kill(pid_, sig);
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  // Waits for the process to exit by itself; returns its exit code, or -1 on timeout.
  int wait_exit(std::chrono::seconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > deadline) return -1;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  // Resident memory of the process, from /proc, in bytes.
  std::int64_t rss_bytes() const { return process_rss(pid_); }

  std::string log() const {
    std::ifstream in(log_file_);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  int metrics_port_ = 0;
  std::string dir_, port_file_, log_file_;
};

}  // namespace attn::testing
