// run_decode_bench: the options checked, a cache made for the workload, the prompts prefilled,
// the decode streams run, the report; the cache deleted at the end unless --keep. The steps are
// in decode_bench/.
#include "decode_bench.h"

#include <cstdio>
#include <random>

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
  if (o.seqs < 1 || o.steps < 1 || o.warmup < 0 || o.layers < 1 || o.q_heads < 1 ||
      o.kv_heads < 1 || o.head_dim < 1 || o.prefill_chunk < 1)
    return fail("options", invalid_argument("--seqs, --steps, --layers, the heads, --head-dim and "
                                            "--prefill-chunk must be >= 1, --warmup >= 0"));
  if (o.clients < 1 || o.clients > o.seqs)
    return fail("--clients", invalid_argument("expected 1 to --seqs (" + std::to_string(o.seqs) +
                                              ") streams, got " + std::to_string(o.clients)));
  return 0;
}

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
  auto decoded = decode_bench::decode(o, w, pools, to);
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
  return run_on_cache(o, *w, *info, client, rng);
}

}  // namespace attn::cli
