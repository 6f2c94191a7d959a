#include "state/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <set>

#include "attn/fp8.h"

namespace attn::server {
namespace {

std::string new_handle() {
  static thread_local std::random_device device;
  char buf[40];
  std::snprintf(buf, sizeof buf, "kv-%08x%08x%08x%08x", device(), device(), device(), device());
  return buf;
}

std::string str(std::int64_t v) { return std::to_string(v); }

std::int64_t pages_for(std::int64_t tokens, std::int64_t page_size) {
  return (tokens + page_size - 1) / page_size;
}

}  // namespace

Status check_kv_config(const KvCacheConfig& c, std::int64_t capacity_tokens,
                       std::int64_t max_elements) {
  const std::string f = "config.";
  if (c.layers < 1 || c.layers > 4096)
    return invalid_argument(f + "layers: expected 1..4096, got " + str(c.layers));
  if (c.heads_kv < 1 || c.heads_kv > 1024) {
    return invalid_argument(f + "kv_heads: expected 1..1024, got " + str(c.heads_kv));
  }
  if (c.head_dim < 1 || c.head_dim > 1024) {
    return invalid_argument(f + "head_dim: expected 1..1024, got " + str(c.head_dim));
  }
  if (c.page_size != 8 && c.page_size != 16 && c.page_size != 32 && c.page_size != 64 &&
      c.page_size != 128) {
    return invalid_argument(f + "page_size: expected 8, 16, 32, 64 or 128 (0 for 16), got " +
                            str(c.page_size));
  }
  if (c.fp8() && c.dtype == DType::kFloat32) {
    return invalid_argument(f + "kv_storage: D_TYPE_FLOAT8_E4M3 storage serves float16 and " +
                            "bfloat16 caches (config.dtype), got float32");
  }
  const auto expected_scales =
      static_cast<std::size_t>(c.layers) * static_cast<std::size_t>(c.heads_kv);
  for (const auto& [scales, name] :
       {std::pair{&c.fixed_k_scales, "k_scales"}, std::pair{&c.fixed_v_scales, "v_scales"}}) {
    if (scales->empty() && c.fixed_k_scales.empty() && c.fixed_v_scales.empty()) continue;
    if (!c.fp8()) {
      return invalid_argument(f + name + ": scales come with float8 storage (config.kv_storage " +
                              "D_TYPE_FLOAT8_E4M3), got " +
                              str(static_cast<std::int64_t>(scales->size())) +
                              " scales for a cache stored in its dtype");
    }
    if (scales->size() != expected_scales) {
      return invalid_argument(
          f + name +
          ": expected layers x kv_heads = " + str(static_cast<std::int64_t>(expected_scales)) +
          " float32 scales (with both k_scales and v_scales, or neither), got " +
          str(static_cast<std::int64_t>(scales->size())));
    }
    for (std::size_t i = 0; i < scales->size(); ++i) {
      const float v = (*scales)[i];
      if (!(v > 0.0f) || !std::isfinite(v)) {
        return invalid_argument(f + name + "[" + str(static_cast<std::int64_t>(i)) +
                                "]: expected a positive finite scale, got " + std::to_string(v));
      }
    }
  }
  // Positions and lengths travel as int32: the capacity, rounded up to whole pages, must fit.
  if (capacity_tokens < 1 || pages_for(capacity_tokens, c.page_size) * c.page_size >
                                 std::numeric_limits<std::int32_t>::max()) {
    return invalid_argument(f + "capacity_tokens: expected 1..2^31-1 (in whole pages), got " +
                            str(capacity_tokens));
  }
  // One pool (K or V of one layer) is a tensor like any other: the element limit applies.
  const std::int64_t pool =
      pages_for(capacity_tokens, c.page_size) * c.page_size * c.heads_kv * c.head_dim;
  if (pool / c.page_size / c.heads_kv != pages_for(capacity_tokens, c.page_size) * c.head_dim ||
      pool > max_elements) {
    return resource_exhausted(f + "capacity_tokens: " + str(capacity_tokens) + " tokens x " +
                              str(c.heads_kv) + " heads x " + str(c.head_dim) +
                              " exceeds the server's limit of " + str(max_elements) +
                              " elements per layer pool");
  }
  return Status::Ok();
}

KvCache::~KvCache() {
  if (data_ && owner_) owner_->deallocate(data_);
  if (store_) store_->released(*this);
}

PagedKvLayer KvCache::layer(int l) const {
  PagedKvLayer p;
  p.dtype = config_.dtype;
  p.pages = config_.pages;
  p.heads_kv = config_.heads_kv;
  p.page_size = config_.page_size;
  p.head_dim = config_.head_dim;
  auto* base = static_cast<char*>(data_);
  p.k = base + (2 * static_cast<std::size_t>(l)) * config_.pool_bytes();
  p.v = base + (2 * static_cast<std::size_t>(l) + 1) * config_.pool_bytes();
  p.memory = owner_->resident_kind();
  if (config_.fp8()) {
    p.storage = KvStorage::kFloat8E4M3;
    p.fixed_scales = config_.fixed_scales();
    auto* scales = reinterpret_cast<float*>(base + config_.pools_bytes());
    const std::size_t per_pool = static_cast<std::size_t>(config_.pages * config_.heads_kv);
    p.k_scales = scales + 2 * static_cast<std::size_t>(l) * per_pool;
    p.v_scales = p.k_scales + per_pool;
  }
  return p;
}

PagedKvLayer KvCache::all_layers() const {
  PagedKvLayer p = layer(0);
  p.pages = (2 * static_cast<std::int64_t>(config_.layers) - 1) * config_.pages;
  return p;
}

Status KvCache::unknown_sequence(std::size_t i, const std::string& id) const {
  return not_found("sequence_ids[" + str(static_cast<std::int64_t>(i)) + "]: no sequence \"" + id +
                   "\" in kv cache " + handle_ + " (Prefill creates sequences)");
}

MemoryBudget* KvCache::replay_budget() const {
  return store_ ? store_->options_.host_budget : nullptr;
}

std::string KvCache::capacity_words() const {
  return str(static_cast<std::int64_t>(free_.size()) - reserved_) + " of " + str(config_.pages) +
         " pages of " + str(config_.page_size) + " tokens free (capacity " +
         str(config_.capacity_tokens()) + " tokens); release sequences or create a larger cache";
}

Result<KvCache::PendingAppend> KvCache::plan_append(int layer, const std::vector<std::string>& ids,
                                                    const std::vector<std::int64_t>& fresh,
                                                    bool create_missing,
                                                    const Expectation* expect) {
  std::lock_guard lock(mu_);
  PendingAppend p;
  p.layer = layer;
  p.ids = ids;
  if (expect) {
    ATTN_RETURN_IF_ERROR(judge(layer, ids, fresh, create_missing, *expect, &p.repeat_of));
    if (p.repeat_of) return p;  // nothing to plan: the record answers
  }
  const std::int64_t ps = config_.page_size;
  std::int64_t needed = 0;
  std::vector<std::int64_t> need(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) {
    auto it = sequences_.find(ids[i]);
    if (it == sequences_.end() && !create_missing) return unknown_sequence(i, ids[i]);
    const std::int64_t len =
        it == sequences_.end() ? 0 : it->second.lengths[static_cast<std::size_t>(layer)];
    const std::int64_t held =
        it == sequences_.end() ? 0 : static_cast<std::int64_t>(it->second.pages.size());
    const std::int64_t new_len = len + fresh[i];
    if (new_len > config_.capacity_tokens()) {
      return resource_exhausted(
          "sequence_ids[" + str(static_cast<std::int64_t>(i)) + "]: sequence \"" + ids[i] +
          "\" would hold " + str(new_len) + " tokens at layer " + str(layer) +
          ", more than the cache's capacity of " + str(config_.capacity_tokens()));
    }
    need[i] = std::max<std::int64_t>(0, pages_for(new_len, ps) - held);
    needed += need[i];
    p.new_lengths.push_back(new_len);
    p.created.push_back(it == sequences_.end());
  }
  // page_indptr is int32: the page references of one call must fit (forks share pages, so they
  // can exceed the cache's pages).
  std::int64_t references = needed;
  for (const std::string& id : ids)
    if (auto it = sequences_.find(id); it != sequences_.end())
      references += static_cast<std::int64_t>(it->second.pages.size());
  if (references > std::numeric_limits<std::int32_t>::max()) {
    return invalid_argument("sequence_ids: the call's sequences hold " + str(references) +
                            " page references, over 2^31-1; split the call");
  }
  const std::int64_t available = static_cast<std::int64_t>(free_.size()) - reserved_;
  if (needed > available) {
    return resource_exhausted("kv cache " + handle_ + ": the call needs " + str(needed) +
                              " more pages, " + capacity_words());
  }
  if (expect) {  // the last check: the memory its record will hold
    ATTN_ASSIGN_OR_RETURN(record, AppliedCall::reserve(replay_budget(), expect->record_bytes));
    record->ids = ids;
    record->expected = expect->lengths;
    record->lengths = p.new_lengths;
    record->fingerprint = expect->fingerprint;
    p.record = std::move(record);
  }
  // Reserve from the back of the free list without taking them yet: pages [size - reserved -
  // needed, size - reserved) belong to this call until commit or abort. Calls on a cache run one
  // at a time, so no other plan interleaves.
  std::size_t next = free_.size() - static_cast<std::size_t>(reserved_);
  reserved_ += needed;
  p.plan.page_indptr.push_back(0);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    auto it = sequences_.find(ids[i]);
    if (it != sequences_.end())
      p.plan.page_indices.insert(p.plan.page_indices.end(), it->second.pages.begin(),
                                 it->second.pages.end());
    std::vector<std::int32_t> mine;
    for (std::int64_t k = 0; k < need[i]; ++k) mine.push_back(free_[--next]);
    p.plan.page_indices.insert(p.plan.page_indices.end(), mine.begin(), mine.end());
    p.new_pages.push_back(std::move(mine));
    p.plan.page_indptr.push_back(static_cast<std::int32_t>(p.plan.page_indices.size()));
    p.plan.seq_lens.push_back(static_cast<std::int32_t>(p.new_lengths[i]));
  }
  p.plan.q_indptr.push_back(0);
  for (std::size_t i = 0; i < ids.size(); ++i)
    p.plan.q_indptr.push_back(p.plan.q_indptr.back() + static_cast<std::int32_t>(fresh[i]));
  return p;
}

void KvCache::commit(PendingAppend& p) {
  std::lock_guard lock(mu_);
  std::int64_t taken = 0;
  for (std::size_t i = 0; i < p.ids.size(); ++i) {
    Sequence& s = sequences_[p.ids[i]];
    if (s.lengths.empty()) s.lengths.assign(static_cast<std::size_t>(config_.layers), 0);
    for (std::int32_t page : p.new_pages[i]) {
      s.pages.push_back(page);
      refs_[static_cast<std::size_t>(page)] = 1;
      ++taken;
    }
    s.lengths[static_cast<std::size_t>(p.layer)] = p.new_lengths[i];
    if (p.record && s.last.empty()) s.last.resize(static_cast<std::size_t>(config_.layers));
    if (!s.last.empty()) s.last[static_cast<std::size_t>(p.layer)] = p.record;
  }
  // The reserved pages were the last `taken` of the free list's unreserved part, which is its
  // end: no other plan runs between this call's plan and its commit.
  free_.resize(free_.size() - static_cast<std::size_t>(taken));
  reserved_ -= taken;
}

void KvCache::abort(PendingAppend& p) {
  std::lock_guard lock(mu_);
  std::int64_t taken = 0;
  for (const auto& pages : p.new_pages) taken += static_cast<std::int64_t>(pages.size());
  reserved_ -= taken;
}

Result<std::int64_t> KvCache::release(const std::vector<std::string>& ids) {
  std::lock_guard lock(mu_);
  std::set<std::string> seen;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (!sequences_.count(ids[i])) {
      return not_found("sequence_ids[" + str(static_cast<std::int64_t>(i)) + "]: no sequence \"" +
                       ids[i] + "\" in kv cache " + handle_);
    }
    if (!seen.insert(ids[i]).second) {
      return invalid_argument("sequence_ids[" + str(static_cast<std::int64_t>(i)) + "]: \"" +
                              ids[i] + "\" appears twice");
    }
  }
  std::int64_t freed = 0;
  for (const std::string& id : ids) {
    auto it = sequences_.find(id);
    for (std::int32_t page : it->second.pages)
      if (--refs_[static_cast<std::size_t>(page)] == 0) {
        free_.push_back(page);
        ++freed;
      }
    sequences_.erase(it);
  }
  return freed;
}

Result<std::int64_t> KvCache::fork(const std::string& from, const std::string& to,
                                   KvSequenceSummary* out) {
  std::unique_lock lock(mu_);
  auto src = sequences_.find(from);
  if (src == sequences_.end())
    return not_found("source_id: no sequence \"" + from + "\" in kv cache " + handle_);
  if (to.empty()) return invalid_argument("new_id: expected a sequence id, got an empty string");
  if (sequences_.count(to)) {
    return invalid_argument("new_id: sequence \"" + to + "\" already exists in kv cache " +
                            handle_ + " (release it first)");
  }
  // Forks take pages from the back of the free list, where pending appends reserve theirs: the
  // cache's order never runs a fork while an append is pending.
  if (reserved_ != 0)
    return internal_error("kv cache " + handle_ + ": a fork while an append is pending");
  const std::int64_t ps = config_.page_size;
  const std::int64_t shortest =
      *std::min_element(src->second.lengths.begin(), src->second.lengths.end());
  // Pages every layer has filled are never written again: shared. The rest are copied.
  const std::size_t shared = static_cast<std::size_t>(
      std::min<std::int64_t>(shortest / ps, static_cast<std::int64_t>(src->second.pages.size())));
  const std::int64_t copies = static_cast<std::int64_t>(src->second.pages.size() - shared);
  if (copies > static_cast<std::int64_t>(free_.size()) - reserved_) {
    return resource_exhausted("kv cache " + handle_ + ": the fork needs " + str(copies) +
                              " pages, " + capacity_words());
  }
  Sequence fork;
  fork.lengths = src->second.lengths;
  fork.pages.assign(src->second.pages.begin(),
                    src->second.pages.begin() + static_cast<std::ptrdiff_t>(shared));
  std::vector<std::pair<std::int32_t, std::int32_t>> copy;  // (from page, to page)
  for (std::size_t i = shared; i < src->second.pages.size(); ++i) {
    const std::int32_t page = free_.back();
    free_.pop_back();
    copy.emplace_back(src->second.pages[i], page);
    fork.pages.push_back(page);
  }
  // The copies, page by page through the host (a fork copies at most a page or two per layer).
  const Status copied = copy_pages(copy);
  if (!copied.ok()) {
    for (const auto& c : copy) free_.push_back(c.second);
    return copied;
  }
  for (std::size_t i = 0; i < shared; ++i) ++refs_[static_cast<std::size_t>(fork.pages[i])];
  for (const auto& c : copy) refs_[static_cast<std::size_t>(c.second)] = 1;
  if (out) {
    out->id = to;
    out->lengths = fork.lengths;
    out->pages = static_cast<std::int64_t>(fork.pages.size());
    out->shared_pages = static_cast<std::int64_t>(shared);
  }
  sequences_.emplace(to, std::move(fork));
  return copies;
}

Status KvCache::copy_pages(const std::vector<std::pair<std::int32_t, std::int32_t>>& copies) {
  const std::size_t page_bytes =
      static_cast<std::size_t>(config_.heads_kv * config_.page_size * config_.head_dim) *
      config_.storage_element_size();
  if (config_.fp8()) {  // each page's scales, of every layer and pool, go with its codes
    const std::size_t row = static_cast<std::size_t>(config_.heads_kv) * sizeof(float);
    std::vector<unsigned char> scales(row);
    for (std::size_t pool = 0; pool < 2 * static_cast<std::size_t>(config_.layers); ++pool)
      for (const auto& [a, b] : copies) {
        const std::size_t base =
            config_.pools_bytes() + pool * static_cast<std::size_t>(config_.pages) * row;
        ATTN_RETURN_IF_ERROR(
            owner_->read(scales.data(), data_, base + static_cast<std::size_t>(a) * row, row));
        ATTN_RETURN_IF_ERROR(
            owner_->write(data_, base + static_cast<std::size_t>(b) * row, scales.data(), row));
      }
  }
  std::vector<unsigned char> buf(page_bytes);
  for (int l = 0; l < config_.layers; ++l) {
    const std::size_t layer_base = 2 * static_cast<std::size_t>(l) * config_.pool_bytes();
    for (std::size_t pool = 0; pool < 2; ++pool)
      for (const auto& [a, b] : copies) {
        const std::size_t base = layer_base + pool * config_.pool_bytes();
        ATTN_RETURN_IF_ERROR(owner_->read(
            buf.data(), data_, base + static_cast<std::size_t>(a) * page_bytes, page_bytes));
        ATTN_RETURN_IF_ERROR(owner_->write(data_, base + static_cast<std::size_t>(b) * page_bytes,
                                           buf.data(), page_bytes));
      }
  }
  return Status::Ok();
}

Result<KvCache::Truncated> KvCache::truncate(const std::string& id, std::int64_t length) {
  std::lock_guard lock(mu_);
  auto it = sequences_.find(id);
  if (it == sequences_.end())
    return not_found("sequence_id: no sequence \"" + id + "\" in kv cache " + handle_);
  Sequence& seq = it->second;
  const std::int64_t longest = *std::max_element(seq.lengths.begin(), seq.lengths.end());
  if (length < 0 || length > longest) {
    return invalid_argument("length: expected 0.." + str(longest) + " (sequence \"" + id +
                            "\"'s longest layer), got " + str(length));
  }
  // Truncations take pages from the back of the free list, where pending appends reserve theirs:
  // the cache's order never runs one while an append is pending.
  if (reserved_ != 0)
    return internal_error("kv cache " + handle_ + ": a truncation while an append is pending");
  const std::int64_t ps = config_.page_size;
  const std::size_t keep = static_cast<std::size_t>(
      std::min<std::int64_t>(pages_for(length, ps), static_cast<std::int64_t>(seq.pages.size())));
  // Pages some layer writes again after the cut: from the one holding the shortest layer's next
  // token on. Those another sequence holds too (a fork shared them when they were full) are
  // copied for this sequence first; the others are its own already.
  const std::int64_t shortest =
      std::min(length, *std::min_element(seq.lengths.begin(), seq.lengths.end()));
  std::vector<std::size_t> shared_written;  // indices in the table
  for (std::size_t i = static_cast<std::size_t>(shortest / ps); i < keep; ++i)
    if (refs_[static_cast<std::size_t>(seq.pages[i])] > 1) shared_written.push_back(i);
  // Copies go to free pages, then to the pages the cut drops that this sequence alone holds (no
  // page is needed beyond what the cut gives back).
  std::vector<std::int32_t> targets;
  for (std::size_t i = 0; i < free_.size() && targets.size() < shared_written.size(); ++i)
    targets.push_back(free_[free_.size() - 1 - i]);
  const std::size_t from_free = targets.size();
  std::set<std::int32_t> reused;  // dropped pages that become copies
  for (std::size_t i = keep; i < seq.pages.size() && targets.size() < shared_written.size(); ++i)
    if (refs_[static_cast<std::size_t>(seq.pages[i])] == 1) {
      targets.push_back(seq.pages[i]);
      reused.insert(seq.pages[i]);
    }
  if (targets.size() < shared_written.size()) {
    return resource_exhausted("kv cache " + handle_ + ": the cut lands inside a page shared with " +
                              "another sequence, which needs a copy: " + capacity_words());
  }
  std::vector<std::pair<std::int32_t, std::int32_t>> copy;  // (from page, to page)
  for (std::size_t c = 0; c < shared_written.size(); ++c)
    copy.emplace_back(seq.pages[shared_written[c]], targets[c]);
  // A copy that fails (a device fault) leaves the bookkeeping as it was.
  ATTN_RETURN_IF_ERROR(copy_pages(copy));

  Truncated out;
  free_.resize(free_.size() - from_free);
  for (std::size_t c = 0; c < copy.size(); ++c) {
    --refs_[static_cast<std::size_t>(copy[c].first)];  // still held by another sequence
    refs_[static_cast<std::size_t>(copy[c].second)] = 1;
    seq.pages[shared_written[c]] = copy[c].second;
  }
  for (std::size_t i = keep; i < seq.pages.size(); ++i) {
    const std::int32_t page = seq.pages[i];
    if (reused.count(page)) continue;  // now one of the copies, still this sequence's
    if (--refs_[static_cast<std::size_t>(page)] == 0) {
      free_.push_back(page);
      ++out.freed_pages;
    }
  }
  seq.pages.resize(keep);
  for (std::int64_t& len : seq.lengths) len = std::min(len, length);
  seq.last.clear();
  out.copied_pages = static_cast<std::int64_t>(copy.size());
  out.sequence.id = id;
  out.sequence.lengths = seq.lengths;
  out.sequence.pages = static_cast<std::int64_t>(seq.pages.size());
  for (std::int32_t page : seq.pages)
    out.sequence.shared_pages += refs_[static_cast<std::size_t>(page)] > 1;
  return out;
}

Status KvCache::read(const std::string& id, int layer, bool dequantize, Contents* out) const {
  std::vector<std::int32_t> pages;
  std::int64_t len = 0;
  {
    std::lock_guard lock(mu_);
    auto it = sequences_.find(id);
    if (it == sequences_.end())
      return not_found("sequence_id: no sequence \"" + id + "\" in kv cache " + handle_);
    pages = it->second.pages;
    len = it->second.lengths[static_cast<std::size_t>(layer)];
  }
  const std::int64_t hkv = config_.heads_kv, ps = config_.page_size, d = config_.head_dim;
  const std::int64_t used = (len + ps - 1) / ps;  // the sequence's pages at this layer
  const std::size_t es = config_.storage_element_size(), row = static_cast<std::size_t>(d) * es;
  const std::size_t page_bytes = static_cast<std::size_t>(hkv * ps) * row;
  out->shape = {len, hkv, d};
  out->fp8 = config_.fp8() && !dequantize;
  out->k.assign(static_cast<std::size_t>(len * hkv) * row, 0);
  out->v.assign(out->k.size(), 0);
  std::vector<float> scales[2];
  if (config_.fp8()) {
    const std::size_t srow = static_cast<std::size_t>(hkv) * sizeof(float);
    for (std::size_t pool = 0; pool < 2; ++pool) {
      scales[pool].resize(static_cast<std::size_t>(used * hkv));
      const std::size_t base =
          config_.pools_bytes() + (2 * static_cast<std::size_t>(layer) + pool) *
                                      static_cast<std::size_t>(config_.pages) * srow;
      for (std::int64_t p = 0; p < used; ++p)
        ATTN_RETURN_IF_ERROR(owner_->read(
            scales[pool].data() + p * hkv, data_,
            base + static_cast<std::size_t>(pages[static_cast<std::size_t>(p)]) * srow, srow));
    }
  }
  std::vector<unsigned char> buf(page_bytes);
  const std::size_t layer_base = 2 * static_cast<std::size_t>(layer) * config_.pool_bytes();
  for (std::size_t pool = 0; pool < 2; ++pool) {
    std::vector<unsigned char>& dst = pool == 0 ? out->k : out->v;
    for (std::int64_t p0 = 0; p0 < len; p0 += ps) {
      const std::size_t page = static_cast<std::size_t>(pages[static_cast<std::size_t>(p0 / ps)]);
      ATTN_RETURN_IF_ERROR(
          owner_->read(buf.data(), data_,
                       layer_base + pool * config_.pool_bytes() + page * page_bytes, page_bytes));
      // Page [Hkv, page_size, D] -> rows [len, Hkv, D].
      for (std::int64_t t = 0; t < std::min(ps, len - p0); ++t)
        for (std::int64_t h = 0; h < hkv; ++h)
          std::copy_n(buf.data() + static_cast<std::size_t>(h * ps + t) * row, row,
                      dst.data() + static_cast<std::size_t>((p0 + t) * hkv + h) * row);
    }
  }
  if (out->fp8) {
    out->scales_shape = {used, hkv};
    out->k_scales = std::move(scales[0]);
    out->v_scales = std::move(scales[1]);
  } else if (config_.fp8()) {  // dequantized: code x its page's scale, in the cache's dtype
    const std::size_t es16 = element_size(config_.dtype);
    for (std::size_t pool = 0; pool < 2; ++pool) {
      std::vector<unsigned char>& dst = pool == 0 ? out->k : out->v;
      std::vector<unsigned char> wide(dst.size() * es16);
      std::vector<float> x(static_cast<std::size_t>(d));
      for (std::int64_t t = 0; t < len; ++t)
        for (std::int64_t h = 0; h < hkv; ++h) {
          const std::size_t at = static_cast<std::size_t>((t * hkv + h) * d);
          dequantize_fp8_e4m3(dst.data() + at, d,
                              scales[pool][static_cast<std::size_t>(t / ps * hkv + h)], x.data());
          for (std::int64_t c = 0; c < d; ++c)
            store_from_float(wide.data(), config_.dtype, at + static_cast<std::size_t>(c),
                             x[static_cast<std::size_t>(c)]);
        }
      dst = std::move(wide);
    }
  }
  return Status::Ok();
}

KvCacheSummary KvCache::summary(bool with_sequences) const {
  std::lock_guard lock(mu_);
  KvCacheSummary s;
  s.pages_free = static_cast<std::int64_t>(free_.size()) - reserved_;
  s.pages_used = config_.pages - s.pages_free;
  s.sequences = static_cast<std::int64_t>(sequences_.size());
  std::set<const AppliedCall*> records;  // shared by the sequences of one call: counted once
  for (const auto& [id, seq] : sequences_)
    for (const auto& r : seq.last)
      if (r && records.insert(r.get()).second)
        s.replay_bytes += static_cast<std::int64_t>(r->bytes());
  for (const auto& [id, seq] : sequences_) {
    const std::int64_t longest = *std::max_element(seq.lengths.begin(), seq.lengths.end());
    s.pages_unshared += pages_for(longest, config_.page_size);
    if (!with_sequences) continue;
    KvSequenceSummary q;
    q.id = id;
    q.lengths = seq.lengths;
    q.pages = static_cast<std::int64_t>(seq.pages.size());
    for (std::int32_t page : seq.pages) q.shared_pages += refs_[static_cast<std::size_t>(page)] > 1;
    s.sequence_list.push_back(std::move(q));
  }
  return s;
}

KvCacheStore::KvCacheStore(std::vector<Executor*> executors, TensorStore* quota,
                           TensorStoreOptions options)
    : executors_(std::move(executors)), quota_(quota), options_(options) {}

KvCacheStore::~KvCacheStore() {
  std::map<std::string, Entry> entries;
  {
    std::lock_guard lock(mu_);
    entries.swap(entries_);
  }
}

void KvCacheStore::released(const KvCache& c) { quota_->unreserve(c.bytes(), c.executor()); }

void KvCacheStore::drop_expired() {
  std::vector<std::shared_ptr<KvCache>> expired;  // freed outside the lock
  std::lock_guard lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  for (auto it = entries_.begin(); it != entries_.end();) {
    if (it->second.expires <= now) {
      expired.push_back(std::move(it->second.cache));
      it = entries_.erase(it);
    } else {
      ++it;
    }
  }
}

Result<std::shared_ptr<KvCache>> KvCacheStore::create(const KvCacheConfig& config,
                                                      std::int64_t ttl_ms, std::size_t executor) {
  if (ttl_ms < 0) return invalid_argument("ttl_ms: expected >= 0, got " + str(ttl_ms));
  drop_expired();
  ATTN_RETURN_IF_ERROR(quota_->reserve(config.bytes(), executor, "config.capacity_tokens"));
  std::shared_ptr<KvCache> c(new KvCache());
  c->store_ = this;  // from here on the destructor gives the quota back
  c->handle_ = new_handle();
  c->config_ = config;
  c->executor_ = executor;
  c->owner_ = executors_[executor];
  c->ttl_ = ttl_ms == 0 ? options_.default_ttl
                        : std::min(std::chrono::milliseconds(ttl_ms), options_.max_ttl);
  auto p = c->owner_->allocate(config.bytes());
  if (!p.ok()) return resource_exhausted("config.capacity_tokens: " + p.status().message());
  c->data_ = *p;
  if (config.fp8()) {
    // Every page's scale slots: the client's fixed scales, or 0 (computed on append).
    const std::size_t per_pool = static_cast<std::size_t>(config.pages * config.heads_kv);
    std::vector<float> scales(2 * static_cast<std::size_t>(config.layers) * per_pool, 0.0f);
    if (config.fixed_scales())
      for (std::size_t l = 0; l < static_cast<std::size_t>(config.layers); ++l)
        for (std::size_t pool = 0; pool < 2; ++pool) {
          const std::vector<float>& fixed =
              pool == 0 ? config.fixed_k_scales : config.fixed_v_scales;
          const std::size_t hkv = static_cast<std::size_t>(config.heads_kv);
          for (std::size_t i = 0; i < per_pool; ++i)
            scales[(2 * l + pool) * per_pool + i] = fixed[l * hkv + i % hkv];
        }
    ATTN_RETURN_IF_ERROR(c->owner_->write(c->data_, config.pools_bytes(), scales.data(),
                                          scales.size() * sizeof(float)));
  }
  c->refs_.assign(static_cast<std::size_t>(config.pages), 0);
  // Pages are taken from the back: page 0 first.
  for (std::int64_t i = config.pages - 1; i >= 0; --i)
    c->free_.push_back(static_cast<std::int32_t>(i));
  std::lock_guard lock(mu_);
  entries_[c->handle_] = {c, std::chrono::steady_clock::now() + c->ttl_};
  return c;
}

Result<std::shared_ptr<KvCache>> KvCacheStore::find(const std::string& handle,
                                                    const std::string& field) {
  drop_expired();  // every cache's TTL, not only this one's: an abandoned cache frees its memory
  std::shared_ptr<KvCache> expired;  // freed after the lock
  std::unique_lock lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  auto it = entries_.find(handle);
  if (it == entries_.end() || it->second.expires <= now) {
    if (it != entries_.end()) {
      expired = std::move(it->second.cache);
      entries_.erase(it);
    }
    lock.unlock();
    return not_found(field + ": no kv cache \"" + handle +
                     "\" on this server (never created here, deleted, or "
                     "expired; a cache lives on the replica its info names)");
  }
  it->second.expires = now + it->second.cache->ttl();
  return it->second.cache;
}

Result<std::size_t> KvCacheStore::erase(const std::string& handle) {
  std::shared_ptr<KvCache> gone;
  {
    std::lock_guard lock(mu_);
    auto it = entries_.find(handle);
    if (it == entries_.end() || it->second.expires <= std::chrono::steady_clock::now()) {
      return not_found("handle: no kv cache \"" + handle +
                       "\" on this server (never created here, deleted, or expired)");
    }
    gone = std::move(it->second.cache);
    entries_.erase(it);
  }
  return gone->bytes();
}

std::vector<KvCacheStore::Listing> KvCacheStore::list() {
  drop_expired();
  std::vector<Listing> out;
  std::lock_guard lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  const auto wall = std::chrono::system_clock::now();
  for (const auto& [handle, e] : entries_)
    out.push_back({e.cache, wall + std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                       e.expires - now)});
  return out;
}

std::chrono::system_clock::time_point KvCacheStore::expires(const KvCache& c) const {
  std::lock_guard lock(mu_);
  auto it = entries_.find(c.handle());
  const auto now = std::chrono::steady_clock::now();
  const auto left = it == entries_.end() ? c.ttl() : it->second.expires - now;
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(left);
}

}  // namespace attn::server
