// Memory under load, measured from outside the server: a sampler of a process's resident memory
// (/proc/<pid>/status, every few ms on its own thread) and a load generator that sends one
// pre-serialized request through a generic stub, so that N concurrent calls share one buffer and
// the client is never the memory hog. Used by tests/integration/memory_test.cc and
// tools/memory_probe.
#pragma once

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "attn/v1/attn.pb.h"
#include "process_rss.h"

namespace attn::testing {

// Samples a process's RSS every `period` until destroyed; peak() is the highest seen.
class RssSampler {
 public:
  RssSampler(int pid, std::chrono::milliseconds period = std::chrono::milliseconds(20))
      : pid_(pid), first_(process_rss(pid)), peak_(first_) {
    thread_ = std::thread([this, period] {
      while (!stop_.load()) {
        const std::int64_t rss = process_rss(pid_);
        std::int64_t seen = peak_.load();
        while (rss > seen && !peak_.compare_exchange_weak(seen, rss)) {
        }
        std::this_thread::sleep_for(period);
      }
    });
  }
  ~RssSampler() {
    stop_ = true;
    thread_.join();
  }
  std::int64_t first() const { return first_; }
  std::int64_t peak() const { return peak_.load(); }
  std::int64_t now() const { return process_rss(pid_); }

 private:
  int pid_;
  std::int64_t first_;
  std::atomic<std::int64_t> peak_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// A float32 Softmax request of `bytes` (rounded down to whole rows of 1024), serialized once;
// `kernel` names its variant (an unknown one: refused once parsed, before any output exists).
inline grpc::ByteBuffer softmax_request_bytes(std::int64_t bytes, const std::string& kernel = "") {
  v1::SoftmaxRequest req;
  req.set_kernel(kernel);
  const std::int64_t cols = 1024, rows = std::max<std::int64_t>(1, bytes / (cols * 4));
  v1::Tensor* x = req.mutable_x();
  x->set_dtype(v1::D_TYPE_FLOAT32);
  x->add_shape(rows);
  x->add_shape(cols);
  // Zeros: softmax of a zero row is uniform, finite; the content does not matter here.
  x->mutable_data()->assign(static_cast<std::size_t>(rows * cols * 4), '\0');
  std::string wire = req.SerializeAsString();
  req.Clear();
  grpc::Slice slice(std::move(wire));
  return grpc::ByteBuffer(&slice, 1);
}

struct CallResult {
  grpc::Status status;
  std::chrono::milliseconds took{0};
};

// `n` concurrent calls of `method` ("/attn.v1.AttnService/Softmax") with `request`, each on its
// own channel (as separate clients would), the token (if any) as "authorization: Bearer", the
// request's size as "attn-request-bytes" unless `declare_size` is false (or `declared` instead).
inline std::vector<CallResult> concurrent_calls(const std::string& address, const std::string& method,
                                                const grpc::ByteBuffer& request, int n, const std::string& token,
                                                bool declare_size = true, const std::string& declared = "",
                                                std::chrono::seconds deadline = std::chrono::seconds(120)) {
  std::vector<CallResult> results(static_cast<std::size_t>(n));
  std::vector<std::thread> threads;
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      grpc::ChannelArguments args;
      args.SetMaxSendMessageSize(-1);
      args.SetMaxReceiveMessageSize(-1);
      // A connection of its own, not one shared with earlier calls' channels.
      static std::atomic<int> channels{0};
      args.SetInt("attn.probe.channel", channels++);
      auto channel = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
      grpc::GenericStub stub(channel);
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + deadline);
      if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
      if (declare_size) ctx.AddMetadata("attn-request-bytes", declared.empty() ? std::to_string(request.Length()) : declared);
      grpc::ByteBuffer response;
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      const auto start = std::chrono::steady_clock::now();
      stub.UnaryCall(&ctx, method, grpc::StubOptions(), &request, &response, [&](grpc::Status s) {
        std::lock_guard<std::mutex> lock(mu);
        results[static_cast<std::size_t>(i)].status = std::move(s);
        done = true;
        cv.notify_one();
      });
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return done; });
      results[static_cast<std::size_t>(i)].took =
          std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - start);
    });
  }
  for (auto& t : threads) t.join();
  return results;
}

// Small calls (GetServerInfo) one after another until stopped; the slowest and any failure.
class SmallCalls {
 public:
  SmallCalls(const std::string& address, const std::string& token) {
    thread_ = std::thread([this, address, token] {
      auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
      grpc::GenericStub stub(channel);
      std::string empty;
      grpc::Slice slice(empty);
      const grpc::ByteBuffer request(&slice, 1);
      while (!stop_.load()) {
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
        if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
        grpc::ByteBuffer response;
        std::mutex mu;
        std::condition_variable cv;
        bool done = false;
        grpc::Status status;
        const auto start = std::chrono::steady_clock::now();
        stub.UnaryCall(&ctx, "/attn.v1.AttnService/GetServerInfo", grpc::StubOptions(), &request, &response,
                       [&](grpc::Status s) {
                         std::lock_guard<std::mutex> lock(mu);
                         status = std::move(s);
                         done = true;
                         cv.notify_one();
                       });
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return done; });
        const auto took = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start);
        ++calls_;
        if (!status.ok()) ++failed_;
        std::int64_t seen = slowest_us_.load();
        while (took.count() > seen && !slowest_us_.compare_exchange_weak(seen, took.count())) {
        }
        lock.unlock();
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    });
  }
  ~SmallCalls() { stop(); }
  void stop() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  int calls() const { return calls_.load(); }
  int failed() const { return failed_.load(); }
  std::int64_t slowest_us() const { return slowest_us_.load(); }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> calls_{0}, failed_{0};
  std::atomic<std::int64_t> slowest_us_{0};
  std::thread thread_;
};

}  // namespace attn::testing
