#include "state/tensor_store.h"

#include <cstdio>
#include <random>

#include "state/memory_budget.h"

namespace attn::server {
namespace {

// 128 random bits: a handle cannot be guessed from another.
std::string new_handle() {
  static thread_local std::random_device device;
  char buf[40];
  std::snprintf(buf, sizeof buf, "t-%08x%08x%08x%08x", device(), device(), device(), device());
  return buf;
}

}  // namespace

ResidentTensor::~ResidentTensor() {
  if (data && owner) owner->deallocate(data);
  if (store) store->released(*this);
}

TensorStore::TensorStore(std::vector<Executor*> executors, TensorStoreOptions options)
    : executors_(std::move(executors)),
      options_(options),
      used_by_executor_(executors_.size(), 0) {}

TensorStore::~TensorStore() {
  std::map<std::string, Entry> entries;
  {
    std::lock_guard lock(mu_);
    entries.swap(entries_);
  }
  entries.clear();  // tensors free their memory (calls in flight are over by now)
}

void TensorStore::released(const ResidentTensor& t) {
  {
    std::lock_guard lock(mu_);
    used_ -= t.bytes;
    used_by_executor_[t.executor] -= t.bytes;
  }
  if (on_host(t.executor)) options_.host_budget->give_back_resident(t.bytes);
}

Result<std::shared_ptr<ResidentTensor>> TensorStore::create(DType dtype, const Shape& shape,
                                                            std::int64_t ttl_ms,
                                                            std::size_t executor,
                                                            const std::string& field) {
  if (ttl_ms < 0)
    return invalid_argument(field + ".ttl_ms: expected >= 0, got " + std::to_string(ttl_ms));
  const auto count = checked_element_count(shape, field + ".shape");
  ATTN_RETURN_IF_ERROR(count.status());
  const std::size_t bytes = static_cast<std::size_t>(*count) * element_size(dtype);
  std::vector<std::shared_ptr<ResidentTensor>> expired;  // freed outside the lock
  {
    std::lock_guard lock(mu_);
    const auto now = std::chrono::steady_clock::now();
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (it->second.expires <= now) {
        expired.push_back(std::move(it->second.tensor));
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }
  expired.clear();
  if (reclaim_) {
    bool over = false;
    {
      std::lock_guard lock(mu_);
      over = used_ + bytes > options_.quota_bytes;
    }
    if (over) reclaim_();
  }
  {
    std::lock_guard lock(mu_);
    if (used_ + bytes > options_.quota_bytes) {
      return resource_exhausted(field + ": " + std::to_string(bytes) +
                                " bytes would take the server's resident "
                                "tensors to " +
                                std::to_string(used_ + bytes) + " bytes, over its quota of " +
                                std::to_string(options_.quota_bytes) +
                                "; delete some (DeleteTensor) or wait "
                                "for them to expire");
    }
    used_ += bytes;
    used_by_executor_[executor] += bytes;
  }
  if (Status held = take_host(bytes, executor, field); !held.ok()) {
    std::lock_guard lock(mu_);
    used_ -= bytes;
    used_by_executor_[executor] -= bytes;
    return held;
  }
  auto t = std::make_shared<ResidentTensor>();
  t->store = this;  // from here on the destructor gives the quota back
  t->dtype = dtype;
  t->shape = shape;
  t->bytes = bytes;
  t->executor = executor;
  t->owner = executors_[executor];
  t->ttl = ttl_ms == 0 ? options_.default_ttl
                       : std::min(std::chrono::milliseconds(ttl_ms), options_.max_ttl);
  t->handle = new_handle();
  auto p = t->owner->allocate(bytes);
  if (!p.ok()) return resource_exhausted(field + ": " + p.status().message());
  t->data = *p;
  return t;
}

bool TensorStore::on_host(std::size_t executor) const {
  return options_.host_budget && executors_[executor]->resident_kind() == MemoryKind::kHost;
}

Status TensorStore::take_host(std::size_t bytes, std::size_t executor, const std::string& field) {
  if (!on_host(executor)) return Status::Ok();
  return options_.host_budget->take_resident(bytes, field + " (held in host memory)");
}

Status TensorStore::reserve(std::size_t bytes, std::size_t executor, const std::string& field) {
  std::unique_lock lock(mu_);
  if (used_ + bytes > options_.quota_bytes) {
    return resource_exhausted(field + ": " + std::to_string(bytes) +
                              " bytes would take the server's device state "
                              "(resident tensors and KV caches) to " +
                              std::to_string(used_ + bytes) + " bytes, over its quota of " +
                              std::to_string(options_.quota_bytes) +
                              "; delete some or wait for them to expire");
  }
  used_ += bytes;
  used_by_executor_[executor] += bytes;
  lock.unlock();
  if (Status held = take_host(bytes, executor, field); !held.ok()) {
    lock.lock();
    used_ -= bytes;
    used_by_executor_[executor] -= bytes;
    return held;
  }
  return Status::Ok();
}

Status TensorStore::reserve_unplaced(std::size_t bytes, const std::string& field) {
  std::lock_guard lock(mu_);
  if (used_ + bytes > options_.quota_bytes) {
    return resource_exhausted(field + ": " + std::to_string(bytes) +
                              " bytes would take the server's state "
                              "(resident tensors, KV caches and shared-memory regions) to " +
                              std::to_string(used_ + bytes) + " bytes, over its quota of " +
                              std::to_string(options_.quota_bytes) + "; free some first");
  }
  used_ += bytes;
  return Status::Ok();
}

void TensorStore::unreserve_unplaced(std::size_t bytes) {
  std::lock_guard lock(mu_);
  used_ -= bytes;
}

void TensorStore::unreserve(std::size_t bytes, std::size_t executor) {
  {
    std::lock_guard lock(mu_);
    used_ -= bytes;
    used_by_executor_[executor] -= bytes;
  }
  if (on_host(executor)) options_.host_budget->give_back_resident(bytes);
}

void TensorStore::publish(const std::shared_ptr<ResidentTensor>& t) {
  std::lock_guard lock(mu_);
  entries_[t->handle] = {t, std::chrono::steady_clock::now() + t->ttl};
}

Result<std::shared_ptr<ResidentTensor>> TensorStore::find(const std::string& handle,
                                                          const std::string& field) {
  std::shared_ptr<ResidentTensor> expired;  // freed after the lock: its destructor takes it
  std::unique_lock lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  auto it = entries_.find(handle);
  if (it == entries_.end() || it->second.expires <= now) {
    if (it != entries_.end()) {
      expired = std::move(it->second.tensor);
      entries_.erase(it);
    }
    lock.unlock();
    return not_found(field + ": no resident tensor \"" + handle +
                     "\" (never stored, deleted, or expired)");
  }
  it->second.expires = now + it->second.tensor->ttl;
  return it->second.tensor;
}

Result<std::size_t> TensorStore::erase(const std::string& handle) {
  std::shared_ptr<ResidentTensor> gone;
  {
    std::lock_guard lock(mu_);
    auto it = entries_.find(handle);
    if (it == entries_.end() || it->second.expires <= std::chrono::steady_clock::now()) {
      return not_found("handle: no resident tensor \"" + handle +
                       "\" (never stored, deleted, or expired)");
    }
    gone = std::move(it->second.tensor);
    entries_.erase(it);
  }
  return gone->bytes;
}

std::vector<TensorStore::Listing> TensorStore::list() {
  std::vector<Listing> out;
  std::lock_guard lock(mu_);
  const auto now = std::chrono::steady_clock::now();
  const auto wall = std::chrono::system_clock::now();
  for (const auto& [handle, e] : entries_) {
    if (e.expires <= now) continue;
    out.push_back({e.tensor, wall + std::chrono::duration_cast<std::chrono::system_clock::duration>(
                                        e.expires - now)});
  }
  return out;
}

std::size_t TensorStore::used_bytes() const {
  std::lock_guard lock(mu_);
  return used_;
}

std::chrono::system_clock::time_point TensorStore::expires(const ResidentTensor& t) const {
  std::lock_guard lock(mu_);
  auto it = entries_.find(t.handle);
  const auto now = std::chrono::steady_clock::now();
  const auto left = it == entries_.end() ? t.ttl : it->second.expires - now;
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(left);
}

std::size_t TensorStore::least_used(const std::vector<std::size_t>& candidates) const {
  std::lock_guard lock(mu_);
  std::size_t best = candidates.front();
  for (std::size_t c : candidates)
    if (used_by_executor_[c] < used_by_executor_[best]) best = c;
  return best;
}

}  // namespace attn::server
