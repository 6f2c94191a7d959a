#include "rung_caps.h"

#include "../hopper/tensor_map.h"

namespace attn::cuda {

namespace {

std::string join(const std::vector<std::string>& parts, const char* sep) {
  std::string out;
  for (const auto& p : parts) out += (out.empty() ? "" : sep) + p;
  return out;
}

Status refuse(const char* field, const char* name, const std::string& takes, const std::string& got) {
  return invalid_argument(std::string(field) + ": " + name + " takes " + takes + ", got " + got);
}

}  // namespace

std::string dtypes_text(const RungCaps& caps) {
  std::vector<std::string> names;
  for (int k = 0; k < caps.dtype_count; ++k) names.emplace_back(dtype_name(caps.dtypes[k]));
  return join(names, ", ");
}

std::string groups_text(GroupSet groups) {
  std::vector<int> gs;
  for (int g = 1; g <= 32; ++g)
    if (groups >> (g - 1) & 1u) gs.push_back(g);
  if (gs.empty()) return "any number of";
  if (gs.size() >= 4 && gs.back() - gs.front() + 1 == static_cast<int>(gs.size()))
    return std::to_string(gs.front()) + " to " + std::to_string(gs.back());
  std::string out;
  for (std::size_t k = 0; k < gs.size(); ++k)
    out += (k == 0 ? "" : k + 1 == gs.size() ? " or " : ", ") + std::to_string(gs[k]);
  return out;
}

std::string page_sizes_text(unsigned page_sizes) {
  std::vector<std::string> sizes;
  for (int k = 0; k < 32; ++k)
    if (page_sizes >> k & 1u) sizes.push_back(std::to_string(1ll << k));
  return join(sizes, ", ");
}

std::string limits_text(const RungCaps& caps, Op op) {
  std::vector<std::string> parts;
  if (caps.hopper_only || caps.min_arch >= 90) parts.emplace_back("Hopper (sm_90)");
  if (caps.one_query_row) parts.emplace_back("Sq = 1 (decoding)");
  if (caps.head_dims) {
    const HeadDimSet f32 = caps.takes(DType::kFloat32) ? caps.head_dims_for(DType::kFloat32) : caps.head_dims;
    std::string dims = "head dims " + head_dims_text(f32);
    if (f32 != caps.head_dims) dims += " (" + head_dims_text(caps.head_dims & ~f32) + " in 16-bit types)";
    parts.push_back(dims);
  }
  if (caps.groups) parts.push_back(groups_text(caps.groups) + " query heads per key/value head");
  if (op == Op::kPagedDecode || op == Op::kPagedPrefill)
    parts.push_back(caps.page_sizes ? "page sizes " + page_sizes_text(caps.page_sizes) : "any page size");
  if (*caps.more) parts.emplace_back(caps.more);
  if (caps.fp8_pages) parts.emplace_back("float8 e4m3 K/V pages");
  std::vector<std::string> options;
  if (caps.features & kTakesWindow) options.emplace_back("sliding windows");
  if (caps.features & kTakesSoftcap) options.emplace_back("soft caps");
  if (caps.features & kTakesSinks) options.emplace_back("attention sinks");
  if (!options.empty()) parts.push_back(join(options, ", "));
  return join(parts, "; ");
}

Status check_dtype(const RungCaps& caps, DType dtype, const char* field, const char* name) {
  if (caps.takes(dtype)) return Status::Ok();
  return refuse(field, name, dtypes_text(caps), std::string(dtype_name(dtype)));
}

Status check_head_dim(const RungCaps& caps, DType dtype, long long head_dim, const char* field,
                      const char* name) {
  const HeadDimSet dims = caps.head_dims_for(dtype);
  if (takes_head_dim(dims, head_dim)) return Status::Ok();
  const bool narrower = dims != caps.head_dims && takes_head_dim(caps.head_dims, head_dim);
  return refuse(field, name,
                "head dims " + head_dims_text(dims) + (narrower ? " in " + std::string(dtype_name(dtype)) : ""),
                std::to_string(head_dim));
}

Status check_group(const RungCaps& caps, long long group, const char* field, const char* name) {
  if (caps.takes_group(group)) return Status::Ok();
  return refuse(field, name, groups_text(caps.groups) + " query heads per key/value head", std::to_string(group));
}

Status check_options(const RungCaps& caps, bool window, float softcap, bool sinks, const char* name) {
  if (window && !(caps.features & kTakesWindow))
    return invalid_argument(std::string("window_left: ") + name + " takes no sliding window");
  if (softcap > 0.0f && !(caps.features & kTakesSoftcap))
    return invalid_argument(std::string("softcap: ") + name + " takes no soft cap");
  if (sinks && !(caps.features & kTakesSinks))
    return invalid_argument(std::string("sinks: ") + name + " takes no attention sinks");
  return Status::Ok();
}

Status check_query_rows(const RungCaps& caps, long long len_q, const char* field, const char* name) {
  if (!caps.one_query_row || len_q == 1) return Status::Ok();
  return refuse(field, name, "one query row per head (decoding)", std::to_string(len_q));
}

Status check_page_size(const RungCaps& caps, long long page_size, const char* name) {
  if (caps.takes_page_size(page_size)) return Status::Ok();
  return refuse("cache.page_size", name, "page sizes " + page_sizes_text(caps.page_sizes), std::to_string(page_size));
}

Status check_arch(const RungCaps& caps, const char* name) {
  return caps.hopper_only ? hopper::require_hopper(name) : Status::Ok();
}

}  // namespace attn::cuda
