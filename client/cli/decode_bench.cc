// run_decode_bench: the options checked, a cache made for the workload, the prompts prefilled,
// the decode streams run, the report; the cache deleted at the end unless --keep. The steps are
// in decode_bench/.
#include "decode_bench.h"

#include <unistd.h>

#include <array>
#include <cstdio>
#include <cstring>
#include <random>

#include "cuda_region.h"
#include "decode_bench/report.h"
#include "decode_bench/traffic.h"
#include "decode_bench/workload.h"

namespace attn::cli {
namespace {

using decode_bench::Workload;

// "attn: decode-bench: WHAT: STATUS" on stderr; the exit code.
int fail(const std::string& what, const Status& s) {
  std::fprintf(stderr, "attn: decode-bench: %s: %s\n", what.c_str(), s.to_string().c_str());
  return 1;
}

// The checks that need nothing drawn: says what is wrong and returns the exit code, else 0.
int check_options(const DecodeBenchOptions& o) {
  if (!parse_dtype(o.dtype))
    return fail("--dtype",
                invalid_argument("expected float32, float16 or bfloat16, got " + o.dtype));
  if (o.fp8 && *parse_dtype(o.dtype) == DType::kFloat32) {
    const std::string why = "float8 storage serves float16 and bfloat16 caches, got --dtype ";
    return fail("--fp8", invalid_argument(why + o.dtype));
  }
  if (o.seqs < 1 || o.steps < 1 || o.warmup < 0 || o.layers < 1 || o.q_heads < 1 ||
      o.kv_heads < 1 || o.head_dim < 1 || o.prefill_chunk < 1)
    return fail("options", invalid_argument("--seqs, --steps, --layers, the heads, --head-dim and "
                                            "--prefill-chunk must be >= 1, --warmup >= 0"));
  if (o.clients < 1 || o.clients > o.seqs)
    return fail("--clients", invalid_argument("expected 1 to --seqs (" + std::to_string(o.seqs) +
                                              ") streams, got " + std::to_string(o.clients)));
  if (o.shm && o.cuda_ipc_device >= 0)
    return fail("--shm and --cuda-ipc", invalid_argument("expected one of them, got both"));
  if (o.cuda_ipc_device < -1)
    return fail("--cuda-ipc", invalid_argument("expected a CUDA device ordinal >= 0, got " +
                                               std::to_string(o.cuda_ipc_device)));
  return 0;
}

// --shm / --cuda-ipc: one region the bench makes and registers, holding each decode stream's q,
// k_new and v_new (copied from the pools) and its o; forgotten by the server when the run ends.
class BenchRegion {
 public:
  explicit BenchRegion(Client& client) : client_(client) {}
  BenchRegion(const BenchRegion&) = delete;
  BenchRegion& operator=(const BenchRegion&) = delete;
  ~BenchRegion() {
    if (registered_) (void)client_.unregister_shared_memory(in.name);
  }

  // Lays the streams' tensors out, copies the inputs in and registers the region.
  Status make(const DecodeBenchOptions& o, const Workload& w, const decode_bench::Pools& pools) {
    const std::size_t elem = element_size(w.dtype);
    const std::size_t q_row = static_cast<std::size_t>(o.q_heads) * o.head_dim * elem;
    const std::size_t kv_row = static_cast<std::size_t>(o.kv_heads) * o.head_dim * elem;
    std::size_t total = 0;
    const auto room = [&](std::size_t bytes) {
      const auto at = static_cast<std::int64_t>(total);
      total += (bytes + 255) / 256 * 256;
      return at;
    };
    struct Copy {
      std::int64_t at;
      const std::string* pool;
      std::size_t bytes;
    };
    std::vector<Copy> copies;
    for (int n : decode_bench::stream_sequences(o)) {
      const auto rows = static_cast<std::size_t>(n);
      std::array<std::int64_t, 4> at{room(rows * q_row), room(rows * kv_row), room(rows * kv_row),
                                     room(rows * q_row)};
      copies.push_back({at[0], &pools.q, rows * q_row});
      copies.push_back({at[1], &pools.kv, rows * kv_row});
      copies.push_back({at[2], &pools.kv, rows * kv_row});
      in.offsets.push_back(at);
    }
    in.name = "decode-bench-" + std::to_string(::getpid());
    if (o.cuda_ipc_device >= 0) {
      ATTN_ASSIGN_OR_RETURN(made, CudaRegion::create(o.cuda_ipc_device, total));
      device_ = std::move(made);
      for (const Copy& c : copies)
        ATTN_RETURN_IF_ERROR(
            device_.upload(static_cast<std::size_t>(c.at), c.pool->data(), c.bytes));
      ATTN_RETURN_IF_ERROR(client_
                               .register_cuda_memory(in.name, device_.ipc_handle(),
                                                     o.cuda_ipc_device, 0,
                                                     static_cast<std::int64_t>(total))
                               .status());
    } else {
      ATTN_ASSIGN_OR_RETURN(made, SharedMemoryBuffer::create(total));
      host_ = std::move(made);
      for (const Copy& c : copies)
        std::memcpy(static_cast<char*>(host_.data()) + c.at, c.pool->data(), c.bytes);
      ATTN_RETURN_IF_ERROR(
          client_.register_shared_memory(in.name, host_.key(), 0, static_cast<std::int64_t>(total))
              .status());
    }
    registered_ = true;
    return Status::Ok();
  }

  decode_bench::InRegion in;

 private:
  Client& client_;
  SharedMemoryBuffer host_;
  CudaRegion device_;
  bool registered_ = false;
};

// Deletes the cache when the run ends, however it ends (after the report or the error), unless
// --keep.
class CacheLease {
 public:
  CacheLease(Client& client, std::string handle, bool keep)
      : client_(client), handle_(std::move(handle)), keep_(keep) {}
  CacheLease(const CacheLease&) = delete;
  CacheLease& operator=(const CacheLease&) = delete;
  ~CacheLease() {
    if (keep_) return;
    auto freed = client_.delete_kv_cache(handle_);
    if (!freed.ok())
      std::fprintf(stderr, "attn: decode-bench: DeleteKvCache: %s\n",
                   freed.status().to_string().c_str());
  }

 private:
  Client& client_;
  std::string handle_;
  bool keep_;
};

// The prefill, the decode and the report, on a cache made for `w`.
int run_on_cache(const DecodeBenchOptions& o, const Workload& w, const v1::KvCacheInfo& info,
                 Client& client, std::mt19937_64& rng) {
  const std::string& cache = info.handle();
  auto stub = client.kv_stub(cache);
  if (!stub.ok()) return fail("the cache's replica", stub.status());
  const decode_bench::Target to{client, **stub, cache};
  const decode_bench::Pools pools = decode_bench::random_pools(o, w, rng);
  auto prefilled = decode_bench::prefill(o, w, pools, to);
  if (!prefilled.ok()) return fail("Prefill", prefilled.status());
  BenchRegion region(client);
  if (o.shm || o.cuda_ipc_device >= 0) {
    if (Status made = region.make(o, w, pools); !made.ok())
      return fail(o.shm ? "--shm" : "--cuda-ipc", made);
  }
  auto decoded = decode_bench::decode(o, w, pools, to, region.in);
  if (!decoded.ok()) return fail("Decode", decoded.status());
  auto described = client.describe_kv_cache(cache);
  const std::int64_t cache_bytes = described.ok() ? described->bytes() : info.bytes();
  decode_bench::report(o, w, {info, cache_bytes, *prefilled, *decoded});
  return 0;
}

}  // namespace

int run_decode_bench(const DecodeBenchOptions& o, Client& client) {
  if (int rc = check_options(o)) return rc;
  std::mt19937_64 rng(o.seed);
  auto w = decode_bench::plan_workload(o, rng);
  if (!w.ok()) return fail("options", w.status());
  auto info = client.create_kv_cache(decode_bench::cache_config(o, *w), 0, o.device);
  if (!info.ok()) return fail("CreateKvCache", info.status());
  const CacheLease lease(client, info->handle(), o.keep);
  // A server that predates float8 storage ignores the field: say so rather than time its dtype.
  if (o.fp8 && info->config().kv_storage() != v1::D_TYPE_FLOAT8_E4M3)
    return fail("--fp8", failed_precondition("the server made a cache stored in its dtype (no "
                                             "float8 storage there)"));
  return run_on_cache(o, *w, *info, client, rng);
}

}  // namespace attn::cli
