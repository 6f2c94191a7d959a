// The registry: for each op, its named variants ("matmul/cpu_blocked", later "matmul/03_smem_tiled"),
// their backend and capabilities, and how to pick one for a given input.
#pragma once

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "attn/dtype.h"
#include "attn/ops.h"
#include "attn/status.h"

namespace attn {

enum class Backend : std::uint8_t { kCpu, kCuda };
const char* backend_name(Backend b);  // "cpu", "cuda"

class Stream;

// What a variant is and what it can take, as ListKernels shows it.
struct VariantInfo {
  std::string name;  // "op/variant"
  Op op = Op::kMatmul;
  Backend backend = Backend::kCpu;
  std::vector<DType> dtypes;
  std::string limits;       // in words, beyond the dtypes
  std::string description;  // one line
  // Among supported variants `auto` picks the highest priority (the fastest for the input).
  int priority = 0;
  // Minimum compute capability (major*10+minor) on CUDA; 0 means any.
  int min_compute_capability = 0;
};

template <class Args>
struct Variant {
  VariantInfo info;
  // Explains why this variant cannot take `args` (dtype, head dim, size, ...), or Ok.
  std::function<Status(const Args&)> supports;
  // Runs on `stream`; the views in `args` are in the stream's memory.
  std::function<Status(const Args&, Stream&)> run;
  // Optional: how good this variant is for these arguments (higher is faster), for variants
  // whose best range depends on the shape; info.priority when unset.
  std::function<int(const Args&)> rank;

  int rank_for(const Args& args) const { return rank ? rank(args) : info.priority; }
};

using MatmulVariant = Variant<MatmulArgs>;
using SoftmaxVariant = Variant<SoftmaxArgs>;
using AttentionVariant = Variant<AttentionArgs>;

// What a backend offers to selection: which backend it is and its compute capability.
struct Target {
  Backend backend = Backend::kCpu;
  int compute_capability = 0;  // major*10+minor on CUDA
};

// Whether `info` can run on `target` at all (backend and architecture), with the reason if not.
Status available_on(const VariantInfo& info, const Target& target);

template <class Args>
class OpRegistry {
 public:
  void add(Variant<Args> v) { variants_.push_back(std::move(v)); }
  const std::vector<Variant<Args>>& variants() const { return variants_; }
  const Variant<Args>* find(std::string_view name) const {
    for (const auto& v : variants_)
      if (v.info.name == name) return &v;
    return nullptr;
  }

  // `requested` empty: the highest-priority variant available on `target` that supports `args`.
  // Otherwise that variant, or INVALID_ARGUMENT naming the reason: an unknown name, a variant of
  // another backend or architecture, or arguments it cannot take.
  Result<const Variant<Args>*> select(const Args& args, std::string_view requested,
                                      const Target& target) const;

 private:
  std::vector<Variant<Args>> variants_;
};

// All variants of all ops, filled by each backend's register function.
struct Registry {
  OpRegistry<MatmulArgs> matmul;
  OpRegistry<SoftmaxArgs> softmax;
  OpRegistry<AttentionArgs> attention;

  std::vector<const VariantInfo*> all() const;
};

// The registry with every backend compiled into this build (CPU always; CUDA when built with it).
const Registry& default_registry();

}  // namespace attn
