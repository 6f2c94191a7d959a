// A loopback TCP proxy between a gRPC client and attnd that injects faults, drawn from a seed:
// it resets connections (client to server bytes), delays bytes in either direction, stalls a
// connection past a client's deadline, and drops responses: it forwards the request upstream,
// then, when the server's response begins (an HTTP/2 HEADERS frame on a stream, which attnd sends
// only once the call has run), resets the client's side instead of forwarding it; or holds every
// response until the test lets them go (hold_responses). Plain sockets
// and two threads per connection; each direction of each connection draws from its own generator
// (seed, connection number, direction), so a seed replays the same decisions for the same bytes.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_set>

namespace attn::testing {

struct ProxyFaults {
  double reset = 0.0;          // per client->server read: reset the connection before forwarding
  double drop_response = 0.0;  // per response (server HEADERS frame on a stream): reset instead
  double delay = 0.0;          // per read, either direction: wait 1..max_delay_ms first
  int max_delay_ms = 10;
  double stall = 0.0;  // per response: hold it stall_ms first (past a client's deadline)
  int stall_ms = 0;
};

struct ProxyStats {
  std::atomic<int> connections{0}, resets{0}, dropped_responses{0}, delays{0}, stalls{0};
  std::atomic<int> forced_drops{0};
};

class FaultProxy {
 public:
  FaultProxy(int upstream_port, std::uint64_t seed, ProxyFaults faults)
      : upstream_port_(upstream_port), seed_(seed), faults_(faults) {
    listen_fd_ = socket(AF_INET, SOCK_STREAM, 0);
    if (listen_fd_ < 0) throw std::runtime_error("proxy: socket failed");
    const int one = 1;
    setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr = loopback(0);
    socklen_t len = sizeof addr;
    if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
        listen(listen_fd_, 64) != 0 ||
        getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0)
      throw std::runtime_error("proxy: cannot listen on loopback");
    port_ = ntohs(addr.sin_port);
    acceptor_ = std::thread([this] { accept_loop(); });
  }

  ~FaultProxy() {
    release_responses();
    stopping_ = true;
    shutdown(listen_fd_, SHUT_RDWR);
    acceptor_.join();
    close(listen_fd_);
    std::lock_guard lock(mu_);
    for (auto& c : connections_) c->cut(false);
    for (auto& c : connections_) c->join();
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  const ProxyStats& stats() const { return stats_; }
  // Faults on (the seed's draws) or off (bytes pass untouched; draws are not made).
  void set_enabled(bool on) { enabled_ = on; }
  // The next response to begin, on any connection, is dropped (whatever the draws say).
  void drop_next_response() { drop_next_ = true; }
  // From now on a response that begins waits, with all that follows it on its connection, until
  // release_responses().
  void hold_responses() {
    std::lock_guard lock(gate_mu_);
    held_ = true;
  }
  void release_responses() {
    {
      std::lock_guard lock(gate_mu_);
      held_ = false;
    }
    gate_cv_.notify_all();
  }

 private:
  static sockaddr_in loopback(int port) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return a;
  }

  // The HTTP/2 frames of the server's bytes, followed across reads: reports where a HEADERS frame
  // on a stream (a response beginning, or its trailers) starts. The server's connection preface is
  // a SETTINGS frame, so the byte stream is frames from its first byte.
  struct FrameScanner {
    unsigned char head[9];
    std::size_t head_have = 0;
    std::uint64_t body_left = 0;
    // Scans [p, p + n): the offset where the first response HEADERS frame in it starts, or n.
    std::size_t next_response(const unsigned char* p, std::size_t n) {
      std::size_t first = n;
      for (std::size_t at = 0; at < n;) {
        if (body_left) {
          const std::size_t skip =
              static_cast<std::size_t>(std::min<std::uint64_t>(body_left, n - at));
          body_left -= skip;
          at += skip;
          continue;
        }
        const std::size_t start = at;
        while (head_have < 9 && at < n) head[head_have++] = p[at++];
        if (head_have < 9) break;
        head_have = 0;
        body_left = (std::uint64_t{head[0]} << 16) | (std::uint64_t{head[1]} << 8) | head[2];
        const std::uint32_t stream = ((std::uint32_t{head[5]} & 0x7f) << 24) |
                                     (std::uint32_t{head[6]} << 16) |
                                     (std::uint32_t{head[7]} << 8) | head[8];
        // A stream's first HEADERS frame begins its response (the second holds its trailers). A
        // frame header split across reads is reported at the start of its last part.
        if (head[3] == 0x1 && stream != 0 && answered.insert(stream).second)
          first = std::min(first, start);
      }
      return first;
    }
    std::unordered_set<std::uint32_t> answered;
  };

  class Connection {
   public:
    Connection(FaultProxy& proxy, int client, int server, int number)
        : proxy_(proxy), client_(client), server_(server) {
      up_ = std::thread([this, number] { pump(client_, server_, true, rng(number, 0)); });
      down_ = std::thread([this, number] { pump(server_, client_, false, rng(number, 1)); });
    }
    // Ends both directions: a reset (linger 0: RST on close) or a plain close.
    void cut(bool reset) {
      if (reset) {
        const linger hard{1, 0};
        setsockopt(client_, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
        setsockopt(server_, SOL_SOCKET, SO_LINGER, &hard, sizeof hard);
      }
      shutdown(client_, SHUT_RDWR);
      shutdown(server_, SHUT_RDWR);
    }
    void join() {
      if (up_.joinable()) up_.join();
      if (down_.joinable()) down_.join();
      if (client_ >= 0) close(client_);
      if (server_ >= 0) close(server_);
      client_ = server_ = -1;
    }
    bool done() const { return ended_ == 2; }

   private:
    std::mt19937_64 rng(int number, int direction) const {
      std::seed_seq s{static_cast<std::uint32_t>(proxy_.seed_),
                      static_cast<std::uint32_t>(proxy_.seed_ >> 32),
                      static_cast<std::uint32_t>(number), static_cast<std::uint32_t>(direction)};
      return std::mt19937_64(s);
    }
    static bool send_all(int fd, const unsigned char* p, std::size_t n) {
      while (n) {
        const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0) return false;
        p += w;
        n -= static_cast<std::size_t>(w);
      }
      return true;
    }
    void pump(int from, int to, bool upstream, std::mt19937_64 rng) {
      const ProxyFaults& f = proxy_.faults_;
      ProxyStats& stats = proxy_.stats_;
      std::uniform_real_distribution<double> u(0.0, 1.0);
      FrameScanner scanner;
      unsigned char buf[16384];
      for (;;) {
        const ssize_t n = recv(from, buf, sizeof buf, 0);
        if (n <= 0) break;
        const bool faults = proxy_.enabled_;
        // One draw of each kind per read (made whether or not it applies, so the sequence of
        // draws depends only on the reads).
        const double d_reset = u(rng), d_drop = u(rng), d_delay = u(rng), d_stall = u(rng);
        const int delay_ms = 1 + static_cast<int>(u(rng) * f.max_delay_ms);
        if (faults && d_delay < f.delay) {
          ++stats.delays;
          std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
        }
        if (upstream) {
          if (faults && d_reset < f.reset) {
            ++stats.resets;
            break;
          }
          if (!send_all(to, buf, static_cast<std::size_t>(n))) break;
          continue;
        }
        std::size_t at = scanner.next_response(buf, static_cast<std::size_t>(n));
        bool drop = false;
        if (at < static_cast<std::size_t>(n)) {
          {
            std::unique_lock lock(proxy_.gate_mu_);
            proxy_.gate_cv_.wait(lock, [&] { return !proxy_.held_; });
          }
          if (proxy_.drop_next_.exchange(false)) {
            ++stats.forced_drops;
            drop = true;
          } else if (faults && d_drop < f.drop_response) {
            ++stats.dropped_responses;
            drop = true;
          } else if (faults && d_stall < f.stall) {
            ++stats.stalls;
            std::this_thread::sleep_for(std::chrono::milliseconds(f.stall_ms));
          }
        }
        // What came before the response goes on; the response does not.
        if (!send_all(to, buf, drop ? at : static_cast<std::size_t>(n)) || drop) break;
      }
      cut(true);
      ++ended_;
    }

    FaultProxy& proxy_;
    int client_, server_;
    std::thread up_, down_;
    std::atomic<int> ended_{0};
  };

  void accept_loop() {
    for (int number = 0;; ++number) {
      const int client = accept(listen_fd_, nullptr, nullptr);
      if (client < 0) {
        if (stopping_) return;
        continue;
      }
      const int server = socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in up = loopback(upstream_port_);
      if (server < 0 || connect(server, reinterpret_cast<sockaddr*>(&up), sizeof up) != 0) {
        close(client);
        if (server >= 0) close(server);
        continue;
      }
      const int one = 1;
      setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      ++stats_.connections;
      std::lock_guard lock(mu_);
      // Connections that ended give their threads back.
      for (auto it = connections_.begin(); it != connections_.end();) {
        if ((*it)->done()) {
          (*it)->join();
          it = connections_.erase(it);
        } else {
          ++it;
        }
      }
      connections_.push_back(std::make_unique<Connection>(*this, client, server, number));
    }
  }

  int upstream_port_;
  std::uint64_t seed_;
  ProxyFaults faults_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stopping_{false}, enabled_{true}, drop_next_{false};
  std::mutex gate_mu_;
  std::condition_variable gate_cv_;
  bool held_ = false;
  ProxyStats stats_;
  std::mutex mu_;
  std::list<std::unique_ptr<Connection>> connections_;
  std::thread acceptor_;
};

}  // namespace attn::testing
