#include "traffic.h"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdio>
#include <functional>
#include <thread>

#include "attn/wire.h"

namespace attn::cli::decode_bench {
namespace {

std::int64_t since_ns(Clock::time_point start) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start).count();
}

// Fills `req` with the next prefill chunk: sequences from `seq` at token `offset` on, both
// advanced past it. Returns the chunk's rows.
std::int64_t next_chunk(const DecodeBenchOptions& o, const Workload& w, std::size_t& seq,
                        std::size_t& offset, v1::PrefillRequest& req) {
  std::int64_t rows = 0;
  while (seq < w.lens.size() && rows < o.prefill_chunk) {
    const std::int64_t take = std::min<std::int64_t>(
        w.lens[seq] - static_cast<std::int64_t>(offset), o.prefill_chunk - rows);
    req.add_sequence_ids(w.ids[seq]);
    req.add_lens(take);
    rows += take;
    offset += static_cast<std::size_t>(take);
    if (static_cast<std::int64_t>(offset) == w.lens[seq]) ++seq, offset = 0;
  }
  return rows;
}

struct Stream {
  v1::DecodeRequest req;
  Samples samples;
  Status status;
};

std::vector<Stream> make_streams(const DecodeBenchOptions& o, const Workload& w, const Pools& pools,
                                 const std::string& cache, const InRegion& region) {
  std::vector<Stream> streams(static_cast<std::size_t>(o.clients));
  for (int c = 0; c < o.clients; ++c) {
    auto& req = streams[static_cast<std::size_t>(c)].req;
    req.set_cache(cache);
    for (int i = c; i < o.seqs; i += o.clients)
      req.add_sequence_ids(w.ids[static_cast<std::size_t>(i)]);
    const int n = req.sequence_ids_size();
    req.set_kernel(o.kernel);
    if (!region.name.empty()) {  // the pools' bytes were copied there
      const auto& at = region.offsets[static_cast<std::size_t>(c)];
      *req.mutable_q() =
          Client::in_shared_memory(w.dtype, {n, o.q_heads, o.head_dim}, region.name, at[0]);
      *req.mutable_k_new() =
          Client::in_shared_memory(w.dtype, {n, o.kv_heads, o.head_dim}, region.name, at[1]);
      *req.mutable_v_new() =
          Client::in_shared_memory(w.dtype, {n, o.kv_heads, o.head_dim}, region.name, at[2]);
      *req.add_output_shm() = Client::shared_memory_ref(region.name, at[3]);
      continue;
    }
    set_tensor(req.mutable_q(), w.dtype, n, o.q_heads, o.head_dim, pools.q);
    set_tensor(req.mutable_k_new(), w.dtype, n, o.kv_heads, o.head_dim, pools.kv);
    set_tensor(req.mutable_v_new(), w.dtype, n, o.kv_heads, o.head_dim, pools.kv);
  }
  return streams;
}

// What the streams share while they run.
struct DecodeLoop {
  const DecodeBenchOptions& o;
  const Target& to;
  std::barrier<>& timed;  // every stream starts its timed steps together
  std::atomic<bool>& failed;
};

// One step of a stream: a Decode per layer. Timed steps record each call, and add the step's
// kernel and server time to `kernel` and `server`.
Status decode_step(Stream& s, std::int64_t step, const DecodeLoop& loop, std::int64_t& kernel,
                   std::int64_t& server) {
  for (int layer = 0; layer < loop.o.layers; ++layer) {
    s.req.set_layer(layer);
    v1::DecodeResponse resp;
    auto ctx = loop.to.client.make_context(s.req);
    const auto call_start = Clock::now();
    Status st = wire::from_grpc(loop.to.stub.Decode(ctx.get(), s.req, &resp));
    const std::int64_t latency = since_ns(call_start);
    if (!st.ok()) {
      char where[64];
      std::snprintf(where, sizeof where, "Decode (layer %d, step %lld): ", layer,
                    static_cast<long long>(step));
      return Status(st.code(), where + st.message());
    }
    if (step < loop.o.warmup) continue;
    s.samples.calls.push_back({latency, resp.timings()});
    kernel += resp.timings().kernel_ns();
    server += resp.timings().total_ns();
  }
  return Status::Ok();
}

// A stream's warm-up and timed steps; stops early when any stream fails.
void run_stream(Stream& s, const DecodeLoop& loop) {
  const std::int64_t decoded = loop.o.warmup + loop.o.steps;
  bool joined = false;
  for (std::int64_t step = 0; step < decoded && !loop.failed; ++step) {
    if (step == loop.o.warmup) {
      loop.timed.arrive_and_wait();
      joined = true;
      s.samples.start = Clock::now();
    }
    const auto step_start = Clock::now();
    std::int64_t kernel = 0, server = 0;
    s.status = decode_step(s, step, loop, kernel, server);
    if (!s.status.ok()) {
      loop.failed = true;
      break;
    }
    if (step < loop.o.warmup) continue;
    s.samples.step_ns.push_back(since_ns(step_start));
    s.samples.step_kernel_ns.push_back(kernel);
    s.samples.step_server_ns.push_back(server);
  }
  s.samples.end = Clock::now();
  if (!joined)
    loop.timed.arrive_and_drop();  // failed during the warm-up: the others go on without it
}

// Every stream on its own thread; the first stream's failure, if any.
Status run_streams(std::vector<Stream>& streams, const DecodeBenchOptions& o, const Target& to) {
  std::barrier<> timed(o.clients);
  std::atomic<bool> failed{false};
  const DecodeLoop loop{o, to, timed, failed};
  {
    std::vector<std::thread> threads;
    for (auto& s : streams) threads.emplace_back(run_stream, std::ref(s), std::cref(loop));
    for (auto& t : threads) t.join();
  }
  for (const auto& s : streams) ATTN_RETURN_IF_ERROR(s.status);
  return Status::Ok();
}

// All streams' samples together, timed from the first stream's start to the last one's end.
Samples merge(const std::vector<Stream>& streams) {
  Samples all;
  all.start = streams[0].samples.start;
  all.end = streams[0].samples.end;
  for (const auto& stream : streams) {
    const Samples& s = stream.samples;
    all.calls.insert(all.calls.end(), s.calls.begin(), s.calls.end());
    all.step_ns.insert(all.step_ns.end(), s.step_ns.begin(), s.step_ns.end());
    all.step_kernel_ns.insert(all.step_kernel_ns.end(), s.step_kernel_ns.begin(),
                              s.step_kernel_ns.end());
    all.step_server_ns.insert(all.step_server_ns.end(), s.step_server_ns.begin(),
                              s.step_server_ns.end());
    all.start = std::min(all.start, s.start);
    all.end = std::max(all.end, s.end);
  }
  return all;
}

}  // namespace

Result<PrefillStats> prefill(const DecodeBenchOptions& o, const Workload& w, const Pools& pools,
                             const Target& to) {
  const auto start = Clock::now();
  PrefillStats stats;
  for (std::size_t seq = 0, offset = 0; seq < w.lens.size();) {
    v1::PrefillRequest req;
    req.set_cache(to.cache);
    const std::int64_t rows = next_chunk(o, w, seq, offset, req);
    set_tensor(req.mutable_q(), w.dtype, rows, o.q_heads, o.head_dim, pools.q);
    set_tensor(req.mutable_k(), w.dtype, rows, o.kv_heads, o.head_dim, pools.kv);
    set_tensor(req.mutable_v(), w.dtype, rows, o.kv_heads, o.head_dim, pools.kv);
    for (int layer = 0; layer < o.layers; ++layer) {
      req.set_layer(layer);
      v1::PrefillResponse resp;
      auto ctx = to.client.make_context(req);
      ATTN_RETURN_IF_ERROR(wire::from_grpc(to.stub.Prefill(ctx.get(), req, &resp)));
      ++stats.calls;
      stats.kernel_ns += resp.timings().kernel_ns();
    }
  }
  stats.ns = since_ns(start);
  return stats;
}

std::vector<int> stream_sequences(const DecodeBenchOptions& o) {
  std::vector<int> n(static_cast<std::size_t>(o.clients), 0);
  for (int i = 0; i < o.seqs; ++i) ++n[static_cast<std::size_t>(i % o.clients)];
  return n;
}

Result<Samples> decode(const DecodeBenchOptions& o, const Workload& w, const Pools& pools,
                       const Target& to, const InRegion& region) {
  std::vector<Stream> streams = make_streams(o, w, pools, to.cache, region);
  ATTN_RETURN_IF_ERROR(run_streams(streams, o, to));
  return merge(streams);
}

}  // namespace attn::cli::decode_bench
