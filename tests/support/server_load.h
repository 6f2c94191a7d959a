// Waiting on the server's own count of calls in hand (its metrics endpoint), so that tests of
// queueing do not depend on how fast this machine moves a request.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>

#include "support/http_get.h"
#include "support/server_process.h"

namespace attn::testing {

// Waits until the server's device has `n` calls waiting or running (from its metrics endpoint),
// then a little more so that a first call has moved from the queue to the worker.
inline void wait_for_load(const ServerProcess& server, int n) {
  const std::string want = "attnd_queue_depth{device=\"cpu";
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  while (Clock::now() < deadline) {
    const std::string text = http_get(server.metrics_port(), "/metrics");
    const auto pos = text.find(want);
    if (pos != std::string::npos) {
      const auto line_end = text.find('\n', pos);
      const std::string line = text.substr(pos, line_end - pos);
      if (std::stoi(line.substr(line.rfind(' ') + 1)) >= n) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        return;
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  FAIL() << "the server never had " << n << " calls in hand";
}

}  // namespace attn::testing
