// KV caches: paged K/V stores on a device, named by handle, with sequences named by the client.
// The memory is one allocation per cache, [layers][K, V][pages][Hkv][page_size][D]; pages come
// from one free list per cache and a sequence's page table is shared by all its layers (vLLM's
// layout), each layer with its own length.
//
// Ordering: every call that changes a cache (append, release, fork, truncate) runs as a job on
// the cache's state in the scheduler, so they happen one at a time in arrival order. The mutex
// only guards the bookkeeping against concurrent readers (describe, list). A change is planned
// first (every check made, pages reserved) and applied only once the kernel has succeeded: a call
// that fails leaves the cache as it was.
//
// Exactly-once (kv_replay.h): an append that states its expectation is judged against the
// sequences' lengths and their last applied calls in plan_append, under the same lock and in the
// same order as the append itself, so no other call on those sequences comes between the check
// and the apply.
#pragma once

#include <chrono>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "attn/executor.h"
#include "attn/paged_ops.h"
#include "attn/status.h"
#include "state/kv_replay.h"
#include "state/tensor_store.h"

namespace attn::server {

struct KvCacheConfig {
  int layers = 0, heads_kv = 0, head_dim = 0, page_size = 16;
  DType dtype = DType::kBFloat16;
  std::int64_t pages = 0;
  // float8 storage: codes in the pools, and after every layer's pools a block of float32 scales
  // [layers][K, V][pages][Hkv] (the pools' layout, one scale per (page, kv head)).
  KvStorage storage = KvStorage::kDType;
  // Client-calibrated scales of K and V, [layers][Hkv] each, written into every page's slots at
  // creation and fixed for the cache's life; empty: computed on append.
  std::vector<float> fixed_k_scales, fixed_v_scales;
  bool fixed_scales() const { return !fixed_k_scales.empty(); }

  bool fp8() const { return storage == KvStorage::kFloat8E4M3; }
  std::size_t storage_element_size() const { return fp8() ? 1 : element_size(dtype); }
  std::int64_t capacity_tokens() const { return pages * page_size; }
  // Bytes of one pool (K or V) of one layer, of the scales (float8 storage) and of the whole cache.
  std::size_t pool_bytes() const {
    return static_cast<std::size_t>(pages * heads_kv * page_size * head_dim) *
           storage_element_size();
  }
  std::size_t pools_bytes() const { return static_cast<std::size_t>(layers) * 2 * pool_bytes(); }
  std::size_t scale_bytes() const {
    return fp8() ? static_cast<std::size_t>(layers) * 2 *
                       static_cast<std::size_t>(pages * heads_kv) * sizeof(float)
                 : 0;
  }
  std::size_t bytes() const { return pools_bytes() + scale_bytes(); }
  // Whether every layer fits one pool view (KvCache::all_layers): its page numbers, and the rows
  // of all the pools (pages x Hkv x page_size, what the CUDA rungs index with int32), below 2^31.
  bool layers_fit_one_view() const {
    const std::int64_t pages_all = 2 * static_cast<std::int64_t>(layers) * pages;
    return pages_all <= std::numeric_limits<std::int32_t>::max() &&
           pages_all * heads_kv * page_size <= std::numeric_limits<std::int32_t>::max();
  }
};

// Page sizes a cache may have, and the checks of a requested configuration (fields named as in
// CreateKvCacheRequest.config). `max_elements` bounds one pool, like any tensor. float8 storage
// serves float16 and bfloat16 caches; fixed scales (k_scales/v_scales) must be layers x Hkv
// each, positive and finite, and only come with float8 storage.
Status check_kv_config(const KvCacheConfig& c, std::int64_t capacity_tokens,
                       std::int64_t max_elements);

struct KvSequenceSummary {
  std::string id;
  std::vector<std::int64_t> lengths;
  std::int64_t pages = 0, shared_pages = 0;
};

struct KvCacheSummary {
  std::int64_t pages_used = 0, pages_free = 0, sequences = 0, pages_unshared = 0;
  std::int64_t replay_bytes = 0;                 // the records kept for repeats (each counted once)
  std::vector<KvSequenceSummary> sequence_list;  // when asked for
};

class KvCacheStore;

class KvCache {
 public:
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  ~KvCache();

  const std::string& handle() const { return handle_; }
  const KvCacheConfig& config() const { return config_; }
  std::size_t executor() const { return executor_; }
  Executor& owner() const { return *owner_; }
  std::size_t bytes() const { return config_.bytes(); }
  std::chrono::milliseconds ttl() const { return ttl_; }

  // One layer's pools.
  PagedKvLayer layer(int l) const;
  // Every layer as one pool pair, so that one launch can serve calls on different layers: page p
  // of layer l is page p + layer_page_offset(l) of it (the layers' K and V pools alternate in the
  // cache's block, so V stays one pool after K). Usable where config().layers_fit_one_view().
  PagedKvLayer all_layers() const;
  std::int32_t layer_page_offset(int l) const {
    return static_cast<std::int32_t>(2 * static_cast<std::int64_t>(l) * config_.pages);
  }

  // An append planned: the pages it takes, the plan the kernel reads, the lengths it leads to.
  struct PendingAppend {
    int layer = 0;
    std::vector<std::string> ids;
    std::vector<std::int64_t> new_lengths;
    std::vector<std::vector<std::int32_t>> new_pages;  // per sequence, appended to its table
    std::vector<bool> created;
    PagedPlan plan;
    // With an expectation: set when the call is a repeat of this applied call (nothing planned
    // or reserved: answer from it), else the record to fill with the response before commit.
    std::shared_ptr<const AppliedCall> repeat_of;
    std::shared_ptr<AppliedCall> record;
  };
  // Plans appending fresh[i] tokens to sequence ids[i] at `layer`: NOT_FOUND for an unknown id
  // (unless create_missing, which starts it empty), RESOURCE_EXHAUSTED when the free pages do
  // not cover the call, naming the capacity. Reserves the pages; commit or abort must follow.
  // With `expect` (expected_lengths), first judges the call: every sequence at its expected
  // length: planned as above, with a record reserved; every one at expected + fresh with this
  // call as its last applied one at `layer`: a repeat (repeat_of); else FAILED_PRECONDITION
  // naming the sequence, the length expected and the one found.
  Result<PendingAppend> plan_append(int layer, const std::vector<std::string>& ids,
                                    const std::vector<std::int64_t>& fresh, bool create_missing,
                                    const Expectation* expect = nullptr);
  // Applies a planned append. Its record (when it has one, filled by then) becomes the last
  // applied call of each of its (sequence, layer); without one those slots are cleared.
  void commit(PendingAppend& p);
  void abort(PendingAppend& p);

  // Frees the sequences' pages (a page goes back to the free list with its last holder) and their
  // records. All ids must exist (NOT_FOUND otherwise, nothing freed). Returns the pages freed.
  Result<std::int64_t> release(const std::vector<std::string>& ids);
  // `to` shares `from`'s pages that every layer has filled and gets copies of the rest (the
  // partial last page), not its records. Returns the pages copied.
  Result<std::int64_t> fork(const std::string& from, const std::string& to, KvSequenceSummary* out);
  // Cuts sequence `id` back to `length` tokens at every layer (a layer already shorter keeps its
  // length); `length` 0 .. its longest layer's. Whole pages past the new end leave its table (a
  // page goes back to the free list with its last holder); a page some layer will write again
  // that another sequence holds too (the cut lands inside a page shared with a fork) is copied
  // first, so that appends never write a shared page. Its records go (at every layer): a call
  // before the cut can no longer be repeated. NOT_FOUND naming sequence_id,
  // INVALID_ARGUMENT naming length, RESOURCE_EXHAUSTED when a copy finds no page: nothing changed.
  struct Truncated {
    KvSequenceSummary sequence;
    std::int64_t freed_pages = 0, copied_pages = 0;
  };
  Result<Truncated> truncate(const std::string& id, std::int64_t length);
  // One sequence's K and V at one layer as [len, Hkv, D] host bytes, as stored (float8 storage:
  // the codes, and the float32 scales [pages of the sequence, Hkv] of K and V), or with
  // `dequantize` in the cache's dtype (a float8 element's code x scale, rounded to it).
  struct Contents {
    Shape shape;
    std::vector<unsigned char> k, v;
    bool fp8 = false;  // k/v hold float8 codes, and the scales below come with them
    Shape scales_shape;
    std::vector<float> k_scales, v_scales;
  };
  Status read(const std::string& id, int layer, bool dequantize, Contents* out) const;

  KvCacheSummary summary(bool with_sequences) const;

 private:
  friend class KvCacheStore;
  KvCache() = default;
  std::string capacity_words() const;
  Status unknown_sequence(std::size_t i, const std::string& id) const;
  // The judgement of plan_append for a call with an expectation (mu_ held): OK to apply, OK with
  // *repeat set for a repeat, or the refusal.
  Status judge(int layer, const std::vector<std::string>& ids,
               const std::vector<std::int64_t>& fresh, bool create_missing, const Expectation& e,
               std::shared_ptr<const AppliedCall>* repeat) const;
  MemoryBudget* replay_budget() const;
  // Copies pages (K and V of every layer) from -> to, through the host; mu_ held.
  Status copy_pages(const std::vector<std::pair<std::int32_t, std::int32_t>>& copies);

  struct Sequence {
    std::vector<std::int32_t> pages;
    std::vector<std::int64_t> lengths;  // per layer
    // Per layer, the last applied call when it stated its expectation; empty until one did.
    std::vector<std::shared_ptr<const AppliedCall>> last;
    const AppliedCall* last_at(int layer) const {
      return last.empty() ? nullptr : last[static_cast<std::size_t>(layer)].get();
    }
  };

  std::string handle_;
  KvCacheConfig config_;
  std::size_t executor_ = 0;
  Executor* owner_ = nullptr;
  void* data_ = nullptr;
  std::chrono::milliseconds ttl_{0};
  KvCacheStore* store_ = nullptr;

  mutable std::mutex mu_;
  std::map<std::string, Sequence> sequences_;
  std::vector<std::int32_t> refs_;  // per page: the sequences holding it
  std::vector<std::int32_t> free_;  // free pages, taken from the back
  std::int64_t reserved_ = 0;       // pages taken by pending appends
};

// The caches of a server, by handle, with TTLs; their memory counts against the tensor store's
// quota (one quota for all device state).
class KvCacheStore {
 public:
  KvCacheStore(std::vector<Executor*> executors, TensorStore* quota, TensorStoreOptions options);
  ~KvCacheStore();

  Result<std::shared_ptr<KvCache>> create(const KvCacheConfig& config, std::int64_t ttl_ms,
                                          std::size_t executor);
  // The cache, its lifetime renewed; NOT_FOUND naming `field` when unknown or expired.
  Result<std::shared_ptr<KvCache>> find(const std::string& handle, const std::string& field);
  // Forgets the handle; the memory goes once no call in flight holds the cache.
  Result<std::size_t> erase(const std::string& handle);
  struct Listing {
    std::shared_ptr<KvCache> cache;
    std::chrono::system_clock::time_point expires;
  };
  std::vector<Listing> list();
  std::chrono::system_clock::time_point expires(const KvCache& c) const;
  // Frees the caches whose time to live has passed (their memory and quota).
  void drop_expired();

 private:
  friend class KvCache;
  void released(const KvCache& c);

  struct Entry {
    std::shared_ptr<KvCache> cache;
    std::chrono::steady_clock::time_point expires;
  };
  std::vector<Executor*> executors_;
  TensorStore* quota_;
  TensorStoreOptions options_;
  mutable std::mutex mu_;
  std::map<std::string, Entry> entries_;
};

}  // namespace attn::server
