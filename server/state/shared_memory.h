// Shared memory regions (--shared-memory system): a client on the same host registers a POSIX
// shared-memory object it made; op inputs then name bytes in it and outputs are written into it,
// so the bytes move at memory speed instead of through gRPC.
//
// The server never maps a region: it keeps the object's file descriptor (opened at registration)
// and reads and writes through it with pread/pwrite. A client may shrink, unlink or rewrite its
// object at any moment without faulting the server: a shrunk object answers a short read, which
// fails the call with a status naming the region; an unlinked one stays readable through the open
// descriptor until the region is unregistered; a rewritten one yields whatever bytes were there.
// Regions belong to an owner (the caller's token; one owner when the server has no token) and
// count against the resident-tensor quota.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "attn/status.h"
#include "attn/v1/attn.pb.h"
#include "state/cuda_ipc.h"

namespace attn::server {

class TensorStore;

struct SharedMemoryOptions {
  bool system = false;  // POSIX shared memory
  bool cuda = false;    // CUDA IPC
};

// "system", "cuda", "system,cuda" or empty (off), or why not.
Result<SharedMemoryOptions> parse_shared_memory_flag(const std::string& flag);

struct SharedMemoryRegion {
  SharedMemoryRegion() = default;
  SharedMemoryRegion(const SharedMemoryRegion&) = delete;
  SharedMemoryRegion& operator=(const SharedMemoryRegion&) = delete;
  ~SharedMemoryRegion();

  std::string owner;
  std::string name;
  std::string key;
  std::int64_t offset = 0;  // into the object
  std::int64_t bytes = 0;
  int fd = -1;  // SYSTEM
  v1::SharedMemoryKind kind = v1::SHARED_MEMORY_KIND_SYSTEM;
  CudaIpcMapping cuda;  // CUDA: the exporter's allocation, mapped here

  bool on_device() const { return kind == v1::SHARED_MEMORY_KIND_CUDA; }

  void describe(v1::SharedMemoryRegionInfo* out) const;
};

// Host buffers that shared-memory inputs are read into and outputs staged in, reused across
// calls: a fresh 16 MB buffer costs its page faults and the kernel's zeroing (~1/3 of the time
// of reading 50 MB of inputs on the CPU backend). Up to kMaxPooledBytes stay idle between calls.
class StagingPool {
 public:
  static constexpr std::size_t kMaxPooledBytes = std::size_t{256} << 20;
  struct Block {
    std::unique_ptr<unsigned char[]> data;
    std::size_t capacity = 0;
  };
  // A buffer of at least `bytes`, not zeroed.
  Block take(std::size_t bytes);
  void give_back(Block b);

 private:
  std::mutex mu_;
  std::vector<Block> idle_;
  std::size_t idle_bytes_ = 0;
};

// A staging buffer held by a call, returned to its pool when dropped.
class StagingBuffer {
 public:
  StagingBuffer(std::shared_ptr<StagingPool> pool, std::size_t bytes)
      : pool_(std::move(pool)), block_(pool_->take(bytes)) {}
  StagingBuffer(StagingBuffer&&) noexcept = default;
  StagingBuffer& operator=(StagingBuffer&&) noexcept = default;
  ~StagingBuffer() {
    if (pool_ && block_.data) pool_->give_back(std::move(block_));
  }
  unsigned char* get() const { return block_.data.get(); }

 private:
  std::shared_ptr<StagingPool> pool_;
  StagingPool::Block block_;
};

class SharedMemoryRegistry {
 public:
  // `store` (may be null) is charged each region's bytes while it is registered; CUDA regions may
  // live on `cuda_devices` (the ordinals this server serves).
  SharedMemoryRegistry(SharedMemoryOptions options, TensorStore* store,
                       std::vector<int> cuda_devices = {});
  ~SharedMemoryRegistry();

  const SharedMemoryOptions& options() const { return options_; }

  Result<std::shared_ptr<SharedMemoryRegion>> add(const std::string& owner,
                                                  const v1::RegisterSharedMemoryRequest& req);
  // Forgets `name` (empty: all of `owner`'s); returns how many went. Calls in flight keep theirs.
  Result<int> remove(const std::string& owner, const std::string& name);
  // `owner`'s region `name`, or null.
  std::shared_ptr<SharedMemoryRegion> find(const std::string& owner, const std::string& name);
  std::vector<std::shared_ptr<SharedMemoryRegion>> list(const std::string& owner,
                                                        const std::string& name);
  // `owner`'s region named by `ref`, with `ref`'s byte range checked against it and the tensor's
  // `need` bytes: NOT_FOUND for an unknown region (another owner's included), INVALID_ARGUMENT
  // for a range outside it. Errors name `field`.
  struct Slice {
    std::shared_ptr<SharedMemoryRegion> region;
    std::int64_t offset = 0;  // into the object
    std::int64_t bytes = 0;
  };
  Result<Slice> resolve(const std::string& owner, const v1::SharedMemoryRef& ref, std::int64_t need,
                        const std::string& field);
  // Copies the slice into `dst` / `src` into the slice, through the descriptor. A region shrunk
  // under the slice: FAILED_PRECONDITION naming the region and `field`.
  Status read(const Slice& s, void* dst, const std::string& field);
  Status write(const Slice& s, const void* src, const std::string& field);

  StagingBuffer staging(std::size_t bytes) { return StagingBuffer(pool_, bytes); }

  std::uint64_t bytes_read() const { return read_.load(std::memory_order_relaxed); }
  std::uint64_t bytes_written() const { return written_.load(std::memory_order_relaxed); }

 private:
  Result<std::shared_ptr<SharedMemoryRegion>> open_cuda(const v1::RegisterSharedMemoryRequest& req);

  SharedMemoryOptions options_;
  TensorStore* store_;
  std::vector<int> cuda_devices_;
  std::mutex mu_;
  std::map<std::string, std::map<std::string, std::shared_ptr<SharedMemoryRegion>>> by_owner_;
  std::atomic<std::uint64_t> read_{0}, written_{0};
  std::shared_ptr<StagingPool> pool_ = std::make_shared<StagingPool>();
};

}  // namespace attn::server
