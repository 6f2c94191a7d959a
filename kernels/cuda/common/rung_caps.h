// What a CUDA rung takes, as data (RungCaps): its dtypes, head dims, GQA groups, options and
// architecture. The rung's checks read it (attention_problem, paged_problem and the check_*
// helpers below refuse what it does not take, naming the field, what it takes and what came),
// register.cu builds the registry entry from it (dtypes, minimum compute capability for `auto`
// and ListKernels' availability) and ListKernels' limits text is generated from it
// (limits_text), so the words cannot drift from the checks.
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

#include "attn/dtype.h"
#include "attn/ops.h"
#include "attn/status.h"
#include "head_dims.cuh"

namespace attn::cuda {

// Options beyond plain (causal) attention a rung takes; it refuses the rest by name.
enum AttentionFeature : unsigned { kPlainOnly = 0, kTakesWindow = 1, kTakesSoftcap = 2, kTakesSinks = 4 };
inline constexpr unsigned kAllFeatures = kTakesWindow | kTakesSoftcap | kTakesSinks;

// A set of query heads per key/value head: bit g - 1 for g.
using GroupSet = unsigned;

struct RungCaps {
  DType dtypes[3] = {};  // in the order ListKernels shows them
  int dtype_count = 0;
  HeadDimSet head_dims = 0;          // 0: the op has no head dim
  HeadDimSet float32_head_dims = 0;  // float32's, where a subset of head_dims; else head_dims
  GroupSet groups = 0;               // 0: any (or the op has none)
  unsigned features = kPlainOnly;    // AttentionFeature bits
  bool one_query_row = false;        // Sq = 1 only (decoding)
  unsigned page_sizes = 0;           // bit k: 2^k keys a page; 0: any page size
  bool hopper_only = false;          // supports() refuses other GPUs (wgmma, TMA)
  bool fp8_pages = false;            // KV ops: reads float8 e4m3 pages too
  int min_arch = 0;                  // the registry's minimum compute capability; 0: any
  const char* more = "";             // the rest of its limits, in words (sizes, alignment)

  constexpr RungCaps with_dtypes(std::initializer_list<DType> ts) const {
    RungCaps c = *this;
    c.dtype_count = 0;
    for (DType t : ts) c.dtypes[c.dtype_count++] = t;
    return c;
  }
  constexpr RungCaps with_head_dims(HeadDimSet s) const {
    RungCaps c = *this;
    c.head_dims = s;
    return c;
  }
  constexpr RungCaps with_float32_head_dims(HeadDimSet s) const {
    RungCaps c = *this;
    c.float32_head_dims = s;
    return c;
  }
  constexpr RungCaps with_groups(std::initializer_list<int> gs) const {
    RungCaps c = *this;
    c.groups = 0;
    for (int g : gs) c.groups |= 1u << (g - 1);
    return c;
  }
  constexpr RungCaps with_groups_up_to(int max) const {
    RungCaps c = *this;
    c.groups = max >= 32 ? ~0u : (1u << max) - 1;
    return c;
  }
  constexpr RungCaps with_features(unsigned f) const {
    RungCaps c = *this;
    c.features = f;
    return c;
  }
  constexpr RungCaps decoding() const {
    RungCaps c = *this;
    c.one_query_row = true;
    return c;
  }
  constexpr RungCaps with_page_sizes(std::initializer_list<int> sizes) const {
    RungCaps c = *this;
    c.page_sizes = 0;
    for (int s : sizes) {
      int k = 0;
      while ((1 << k) != s) ++k;  // powers of two only
      c.page_sizes |= 1u << k;
    }
    return c;
  }
  constexpr RungCaps with_fp8_pages() const {
    RungCaps c = *this;
    c.fp8_pages = true;
    return c;
  }
  constexpr RungCaps on_hopper_only() const {
    RungCaps c = *this;
    c.hopper_only = true;
    return c;
  }
  constexpr RungCaps with_min_arch(int cc) const {
    RungCaps c = *this;
    c.min_arch = cc;
    return c;
  }
  constexpr RungCaps with_more(const char* words) const {
    RungCaps c = *this;
    c.more = words;
    return c;
  }

  std::vector<DType> dtype_list() const { return {dtypes, dtypes + dtype_count}; }
  constexpr bool takes(DType t) const {
    for (int k = 0; k < dtype_count; ++k)
      if (dtypes[k] == t) return true;
    return false;
  }
  constexpr HeadDimSet head_dims_for(DType t) const {
    return t == DType::kFloat32 && float32_head_dims ? float32_head_dims : head_dims;
  }
  constexpr bool takes_group(long long g) const {
    return groups == 0 || (g >= 1 && g <= 32 && (groups >> (g - 1) & 1u));
  }
  constexpr bool takes_page_size(long long s) const {
    if (page_sizes == 0) return true;
    for (int k = 0; k < 32; ++k)
      if ((page_sizes >> k & 1u) && (1ll << k) == s) return true;
    return false;
  }
};

// In words, as ListKernels shows them and refusals name them: "bfloat16, float16"; "1, 2, 4 or
// 8" and "1 to 16"; "16, 32, 64, 128".
std::string dtypes_text(const RungCaps& caps);
std::string groups_text(GroupSet groups);
std::string page_sizes_text(unsigned page_sizes);

// The limits of a rung of `op` beyond its dtypes, in words, from its capabilities.
std::string limits_text(const RungCaps& caps, Op op);

// The checks every rung makes the same way; each returns INVALID_ARGUMENT naming `field`, the
// rung, what it takes and what came. `dtype`: the input's; `head_dim` in that dtype; `group`:
// query heads per key/value head.
Status check_dtype(const RungCaps& caps, DType dtype, const char* field, const char* name);
Status check_head_dim(const RungCaps& caps, DType dtype, long long head_dim, const char* field,
                      const char* name);
Status check_group(const RungCaps& caps, long long group, const char* field, const char* name);
Status check_options(const RungCaps& caps, bool window, float softcap, bool sinks, const char* name);
Status check_query_rows(const RungCaps& caps, long long len_q, const char* field, const char* name);
Status check_page_size(const RungCaps& caps, long long page_size, const char* name);
// FAILED_PRECONDITION off Hopper for a hopper_only rung (the device of the calling thread).
Status check_arch(const RungCaps& caps, const char* name);

}  // namespace attn::cuda
