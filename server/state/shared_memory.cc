#include "state/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

#include "state/tensor_store.h"

namespace attn::server {
namespace {

// Most regions one owner may hold: each holds a descriptor.
constexpr std::size_t kMaxRegionsPerOwner = 256;

bool valid_name(const std::string& n) {
  if (n.empty() || n.size() > 128) return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
      return false;
  return true;
}

std::string quoted(const std::string& s) { return "\"" + s + "\""; }

}  // namespace

Result<SharedMemoryOptions> parse_shared_memory_flag(const std::string& flag) {
  SharedMemoryOptions o;
  std::stringstream in(flag);
  std::string part;
  while (std::getline(in, part, ',')) {
    if (part == "system") {
      o.system = true;
    } else if (part == "cuda") {
      o.cuda = true;
    } else if (!part.empty()) {
      return invalid_argument(
          "--shared-memory: expected \"system\", \"cuda\" or both, comma-separated, got \"" + part +
          "\"");
    }
  }
  return o;
}

StagingPool::Block StagingPool::take(std::size_t bytes) {
  bytes = std::max<std::size_t>(bytes, 1);
  {
    std::lock_guard lock(mu_);
    // The smallest idle block that holds `bytes` without wasting more than half of itself.
    std::size_t best = idle_.size();
    for (std::size_t i = 0; i < idle_.size(); ++i)
      if (idle_[i].capacity >= bytes && idle_[i].capacity / 2 <= bytes &&
          (best == idle_.size() || idle_[i].capacity < idle_[best].capacity))
        best = i;
    if (best < idle_.size()) {
      Block b = std::move(idle_[best]);
      idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(best));
      idle_bytes_ -= b.capacity;
      return b;
    }
  }
  return Block{std::unique_ptr<unsigned char[]>(new unsigned char[bytes]), bytes};
}

void StagingPool::give_back(Block b) {
  std::lock_guard lock(mu_);
  if (b.capacity > kMaxPooledBytes) return;
  while (!idle_.empty() && idle_bytes_ + b.capacity > kMaxPooledBytes) {  // the oldest go first
    idle_bytes_ -= idle_.front().capacity;
    idle_.erase(idle_.begin());
  }
  idle_bytes_ += b.capacity;
  idle_.push_back(std::move(b));
}

SharedMemoryRegion::~SharedMemoryRegion() {
  if (fd >= 0) ::close(fd);
  close_cuda_ipc(cuda);
}

void SharedMemoryRegion::describe(v1::SharedMemoryRegionInfo* out) const {
  out->set_name(name);
  out->set_kind(kind);
  out->set_device_id(on_device() ? cuda.device : 0);
  out->set_key(key);
  out->set_offset(offset);
  out->set_bytes(bytes);
}

SharedMemoryRegistry::SharedMemoryRegistry(SharedMemoryOptions options, TensorStore* store,
                                           std::vector<int> cuda_devices)
    : options_(options), store_(store), cuda_devices_(std::move(cuda_devices)) {}

SharedMemoryRegistry::~SharedMemoryRegistry() {
  if (!store_) return;
  for (auto& [owner, regions] : by_owner_)
    for (auto& [name, r] : regions) store_->unreserve_unplaced(static_cast<std::size_t>(r->bytes));
}

Result<std::shared_ptr<SharedMemoryRegion>> SharedMemoryRegistry::open_cuda(
    const v1::RegisterSharedMemoryRequest& req) {
  bool served = false;
  for (int d : cuda_devices_) served |= d == req.device_id();
  if (!served) {
    std::string list;
    for (int d : cuda_devices_) list += (list.empty() ? "cuda:" : ", cuda:") + std::to_string(d);
    return failed_precondition(
        "device_id: this server does not serve cuda:" + std::to_string(req.device_id()) +
        (list.empty() ? std::string(" (it serves no GPU)") : " (it serves " + list + ")"));
  }
  ATTN_ASSIGN_OR_RETURN(mapping, open_cuda_ipc(req.cuda_ipc_handle(), req.device_id()));
  auto region = std::make_shared<SharedMemoryRegion>();
  region->kind = v1::SHARED_MEMORY_KIND_CUDA;
  region->cuda = mapping;  // closed with the region
  if (req.offset() > static_cast<std::int64_t>(mapping.bytes) ||
      req.bytes() > static_cast<std::int64_t>(mapping.bytes) - req.offset()) {
    return invalid_argument("offset, bytes: the exported allocation holds " +
                            std::to_string(mapping.bytes) + " bytes, the region asks for " +
                            std::to_string(req.bytes()) + " from offset " +
                            std::to_string(req.offset()));
  }
  return region;
}

Result<std::shared_ptr<SharedMemoryRegion>> SharedMemoryRegistry::add(
    const std::string& owner, const v1::RegisterSharedMemoryRequest& req) {
  const bool cuda = req.kind() == v1::SHARED_MEMORY_KIND_CUDA;
  if (!cuda && req.kind() != v1::SHARED_MEMORY_KIND_SYSTEM) {
    return invalid_argument(
        "kind: expected SHARED_MEMORY_KIND_SYSTEM or SHARED_MEMORY_KIND_CUDA, got " +
        v1::SharedMemoryKind_Name(req.kind()));
  }
  if (cuda && !options_.cuda) {
    return failed_precondition(
        "kind: CUDA shared memory is off on this server (start it with --shared-memory cuda)");
  }
  if (!cuda && !options_.system) {
    return failed_precondition(
        "kind: system shared memory is off on this server (start it with --shared-memory system)");
  }
  if (!valid_name(req.name())) {
    return invalid_argument("name: expected 1-128 characters of [A-Za-z0-9._-], got " +
                            quoted(req.name()));
  }
  if (req.offset() < 0 || req.bytes() <= 0) {
    return invalid_argument("offset, bytes: expected offset >= 0 and bytes >= 1, got " +
                            std::to_string(req.offset()) + " and " + std::to_string(req.bytes()));
  }
  std::shared_ptr<SharedMemoryRegion> region;
  std::string key;
  if (cuda) {
    ATTN_ASSIGN_OR_RETURN(r, open_cuda(req));
    region = std::move(r);
    key = "cuda:" + std::to_string(req.device_id());
  } else {
    key = req.key();
    if (!key.empty() && key.front() == '/') key = key.substr(1);
    if (!valid_name(key)) {
      return invalid_argument(
          "key: expected a POSIX shared-memory name (\"/name\", 1-128 characters of "
          "[A-Za-z0-9._-] after the '/'), got " +
          quoted(req.key()));
    }
    key = "/" + key;
    // glibc's shm_open adds O_NOFOLLOW and O_CLOEXEC.
    const int fd = ::shm_open(key.c_str(), O_RDWR, 0);
    if (fd < 0) {
      const int e = errno;
      const std::string why = std::strerror(e);
      if (e == ENOENT)
        return not_found("key: no shared-memory object " + quoted(key) + " on the server's host");
      return failed_precondition("key: the server cannot open " + quoted(key) +
                                 " for reading and writing: " + why);
    }
    region = std::make_shared<SharedMemoryRegion>();
    region->fd = fd;
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      return failed_precondition("key: " + quoted(key) +
                                 " is not a shared-memory object the server can use");
    }
    if (req.offset() > st.st_size || req.bytes() > st.st_size - req.offset()) {
      return invalid_argument("offset, bytes: " + quoted(key) + " holds " +
                              std::to_string(st.st_size) + " bytes, the region asks for " +
                              std::to_string(req.bytes()) + " from offset " +
                              std::to_string(req.offset()));
    }
  }
  region->owner = owner;
  region->name = req.name();
  region->key = key;
  region->offset = req.offset();
  region->bytes = req.bytes();

  std::lock_guard lock(mu_);
  auto& mine = by_owner_[owner];
  if (mine.count(req.name())) {
    return failed_precondition("name: a region named " + quoted(req.name()) +
                               " is registered already; unregister it first");
  }
  if (mine.size() >= kMaxRegionsPerOwner) {
    return resource_exhausted("name: " + std::to_string(kMaxRegionsPerOwner) +
                              " regions are registered already, the most one caller may hold");
  }
  if (store_)
    ATTN_RETURN_IF_ERROR(store_->reserve_unplaced(static_cast<std::size_t>(req.bytes()), "bytes"));
  mine[req.name()] = region;
  return region;
}

Result<int> SharedMemoryRegistry::remove(const std::string& owner, const std::string& name) {
  std::vector<std::shared_ptr<SharedMemoryRegion>> gone;  // closed after the lock
  {
    std::lock_guard lock(mu_);
    auto it = by_owner_.find(owner);
    if (!name.empty()) {
      auto r = it == by_owner_.end() ? decltype(it->second.end()){} : it->second.find(name);
      if (it == by_owner_.end() || r == it->second.end()) {
        return not_found("name: no shared-memory region named " + quoted(name) +
                         " is registered by this caller");
      }
      gone.push_back(std::move(r->second));
      it->second.erase(r);
    } else if (it != by_owner_.end()) {
      for (auto& [n, r] : it->second) gone.push_back(std::move(r));
      it->second.clear();
    }
    if (it != by_owner_.end() && it->second.empty()) by_owner_.erase(it);
  }
  if (store_)
    for (const auto& r : gone) store_->unreserve_unplaced(static_cast<std::size_t>(r->bytes));
  return static_cast<int>(gone.size());
}

std::shared_ptr<SharedMemoryRegion> SharedMemoryRegistry::find(const std::string& owner,
                                                               const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = by_owner_.find(owner);
  if (it == by_owner_.end()) return nullptr;
  auto r = it->second.find(name);
  return r == it->second.end() ? nullptr : r->second;
}

std::vector<std::shared_ptr<SharedMemoryRegion>> SharedMemoryRegistry::list(
    const std::string& owner, const std::string& name) {
  std::vector<std::shared_ptr<SharedMemoryRegion>> out;
  std::lock_guard lock(mu_);
  auto it = by_owner_.find(owner);
  if (it == by_owner_.end()) return out;
  for (const auto& [n, r] : it->second)
    if (name.empty() || n == name) out.push_back(r);
  return out;
}

Result<SharedMemoryRegistry::Slice> SharedMemoryRegistry::resolve(const std::string& owner,
                                                                  const v1::SharedMemoryRef& ref,
                                                                  std::int64_t need,
                                                                  const std::string& field) {
  Slice s;
  {
    std::lock_guard lock(mu_);
    auto it = by_owner_.find(owner);
    if (it != by_owner_.end()) {
      auto r = it->second.find(ref.region());
      if (r != it->second.end()) s.region = r->second;
    }
  }
  if (!s.region) {
    return not_found(field + ".shm.region: no shared-memory region named " + quoted(ref.region()) +
                     " is registered by this caller (RegisterSharedMemory)");
  }
  if (ref.bytes() != 0 && ref.bytes() != need) {
    return invalid_argument(field + ".shm.bytes: the tensor's dtype and shape take " +
                            std::to_string(need) + " bytes, the request says " +
                            std::to_string(ref.bytes()));
  }
  if (ref.offset() < 0 || ref.offset() > s.region->bytes || need > s.region->bytes - ref.offset()) {
    return invalid_argument(field + ".shm: " + std::to_string(need) + " bytes from offset " +
                            std::to_string(ref.offset()) + " do not fit in region " +
                            quoted(ref.region()) + " of " + std::to_string(s.region->bytes) +
                            " bytes");
  }
  s.offset = s.region->offset + ref.offset();
  s.bytes = need;
  return s;
}

Status SharedMemoryRegistry::read(const Slice& s, void* dst, const std::string& field) {
  auto* out = static_cast<char*>(dst);
  std::int64_t done = 0;
  while (done < s.bytes) {
    const ssize_t n = ::pread(s.region->fd, out + done, static_cast<std::size_t>(s.bytes - done),
                              s.offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      struct stat st {};
      const long long size =
          ::fstat(s.region->fd, &st) == 0 ? static_cast<long long>(st.st_size) : -1;
      return failed_precondition(field + ".shm: region " + quoted(s.region->name) + " (" +
                                 s.region->key + ") ends at byte " + std::to_string(size) +
                                 " now, before the " + std::to_string(s.bytes) +
                                 " bytes from object offset " + std::to_string(s.offset) +
                                 " the input needs: was it truncated after registration?" +
                                 (n < 0 ? std::string(" (") + std::strerror(errno) + ")" : ""));
    }
    done += n;
  }
  read_.fetch_add(static_cast<std::uint64_t>(s.bytes), std::memory_order_relaxed);
  return Status::Ok();
}

Status SharedMemoryRegistry::write(const Slice& s, const void* src, const std::string& field) {
  // pwrite past the end would grow the object again: a region shrunk under the slice is refused
  // (a shrink racing this check grows it back to what was registered, no more).
  struct stat st {};
  if (::fstat(s.region->fd, &st) != 0 || st.st_size < s.offset + s.bytes) {
    return failed_precondition(
        field + ": region " + quoted(s.region->name) + " (" + s.region->key + ") ends at byte " +
        std::to_string(static_cast<long long>(st.st_size)) + " now, before the " +
        std::to_string(s.bytes) + " bytes from object offset " + std::to_string(s.offset) +
        " the output needs: was it truncated after registration?");
  }
  const auto* in = static_cast<const char*>(src);
  std::int64_t done = 0;
  while (done < s.bytes) {
    const ssize_t n = ::pwrite(s.region->fd, in + done, static_cast<std::size_t>(s.bytes - done),
                               s.offset + done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return failed_precondition(field + ": writing region " + quoted(s.region->name) + " (" +
                                 s.region->key +
                                 ") failed: " + (n < 0 ? std::strerror(errno) : "nothing written"));
    }
    done += n;
  }
  written_.fetch_add(static_cast<std::uint64_t>(s.bytes), std::memory_order_relaxed);
  return Status::Ok();
}

}  // namespace attn::server
