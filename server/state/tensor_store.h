// Resident tensors: buffers kept in a device's memory under a handle, with a time to live and a
// per-server memory quota. Ops read them in place and may leave their outputs here.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "attn/executor.h"
#include "attn/status.h"
#include "attn/tensor.h"

namespace attn::server {

class TensorStore;

struct ResidentTensor {
  ResidentTensor() = default;
  ResidentTensor(const ResidentTensor&) = delete;
  ResidentTensor& operator=(const ResidentTensor&) = delete;
  ~ResidentTensor();

  std::string handle;
  DType dtype = DType::kFloat32;
  Shape shape;
  std::size_t bytes = 0;
  std::size_t executor = 0;  // index into the server's executors: the device holding it
  Executor* owner = nullptr;
  void* data = nullptr;
  std::chrono::milliseconds ttl{0};
  TensorStore* store = nullptr;

  TensorView view() const { return {dtype, shape, data, owner->resident_kind()}; }
};

class MemoryBudget;

struct TensorStoreOptions {
  std::size_t quota_bytes = std::size_t{8} << 30;
  // Tensors and KV caches on a device whose resident memory is the host's (the CPU backend) are
  // charged here too, beside calls' bytes, so that no mix of the two passes the process's bound.
  MemoryBudget* host_budget = nullptr;
  std::chrono::milliseconds default_ttl{10 * 60 * 1000};
  std::chrono::milliseconds max_ttl{24 * 60 * 60 * 1000};
};

class TensorStore {
 public:
  TensorStore(std::vector<Executor*> executors, TensorStoreOptions options);
  ~TensorStore();

  // Reserves quota and device memory on `executor` for a tensor that is not yet visible: it
  // becomes findable once published. Dropping it unpublished frees everything.
  Result<std::shared_ptr<ResidentTensor>> create(DType dtype, const Shape& shape,
                                                 std::int64_t ttl_ms, std::size_t executor,
                                                 const std::string& field);
  void publish(const std::shared_ptr<ResidentTensor>& t);
  // Quota for other device state (KV caches) on `executor`: RESOURCE_EXHAUSTED naming `field`
  // when the bytes would exceed it. unreserve gives it back.
  Status reserve(std::size_t bytes, std::size_t executor, const std::string& field);
  // Called (with no lock held) before a tensor is refused for the quota, so that other state
  // whose time to live has passed (KV caches) gives its memory back first.
  void set_reclaim(std::function<void()> reclaim) { reclaim_ = std::move(reclaim); }
  void unreserve(std::size_t bytes, std::size_t executor);
  // Quota for what lives on no device of the server (registered shared-memory regions, which
  // are the client's memory): counted in the quota only.
  Status reserve_unplaced(std::size_t bytes, const std::string& field);
  void unreserve_unplaced(std::size_t bytes);
  // Whether `executor`'s resident memory is charged to the host budget, and the charge.
  bool on_host(std::size_t executor) const;
  Status take_host(std::size_t bytes, std::size_t executor, const std::string& field);

  // The tensor, its lifetime renewed; NOT_FOUND (naming `field`) when unknown or expired.
  Result<std::shared_ptr<ResidentTensor>> find(const std::string& handle, const std::string& field);
  // Forgets the handle; the memory goes once no call in flight holds the tensor.
  Result<std::size_t> erase(const std::string& handle);

  struct Listing {
    std::shared_ptr<ResidentTensor> tensor;
    std::chrono::system_clock::time_point expires;
  };
  std::vector<Listing> list();
  std::size_t used_bytes() const;
  std::size_t quota_bytes() const { return options_.quota_bytes; }
  std::chrono::system_clock::time_point expires(const ResidentTensor& t) const;
  // The executor with the fewest resident bytes among `candidates`.
  std::size_t least_used(const std::vector<std::size_t>& candidates) const;

 private:
  friend struct ResidentTensor;
  void released(const ResidentTensor& t);

  struct Entry {
    std::shared_ptr<ResidentTensor> tensor;
    std::chrono::steady_clock::time_point expires;
  };
  std::vector<Executor*> executors_;
  TensorStoreOptions options_;
  mutable std::mutex mu_;
  std::map<std::string, Entry> entries_;
  std::size_t used_ = 0;  // reserved bytes, published or not
  std::vector<std::size_t> used_by_executor_;
  std::function<void()> reclaim_;
};

}  // namespace attn::server
