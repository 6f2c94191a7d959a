#include "kv_decode.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <string>

#include "memory_budget.h"

namespace attn::server {
namespace {

std::string str(std::int64_t v) { return std::to_string(v); }

}  // namespace

Status check_layer(const KvCache& c, std::int64_t layer) {
  if (layer < 0 || layer >= c.config().layers) {
    return invalid_argument("layer: expected 0.." + str(c.config().layers - 1) +
                            " (the cache has " + str(c.config().layers) + " layers), got " +
                            str(layer));
  }
  return Status::Ok();
}

Status check_ids(const google::protobuf::RepeatedPtrField<std::string>& ids) {
  if (ids.empty())
    return invalid_argument("sequence_ids: expected at least one sequence, got none");
  std::set<std::string> seen;
  for (int i = 0; i < ids.size(); ++i) {
    if (ids[i].empty())
      return invalid_argument("sequence_ids[" + str(i) + "]: expected a sequence id, got \"\"");
    if (!seen.insert(ids[i]).second) {
      return invalid_argument("sequence_ids[" + str(i) + "]: \"" + ids[i] +
                              "\" appears twice in one call");
    }
  }
  return Status::Ok();
}

namespace {

// An inline tensor of the cache's dtype and shape [rows, heads, D].
Result<wire::DecodedTensor> kv_input(const v1::Tensor& t, bool present, const std::string& field,
                                     const KvCache& c, std::int64_t rows, std::int64_t heads,
                                     const wire::TensorLimits& limits) {
  if (!present) return invalid_argument(field + ": expected a tensor, got none");
  if (!t.handle().empty())
    return invalid_argument(field + ".handle: KV-cache calls take inline tensors, got a handle");
  ATTN_ASSIGN_OR_RETURN(d, wire::decode_tensor(t, field, limits));
  const KvCacheConfig& cfg = c.config();
  if (d.view.dtype != cfg.dtype) {
    return invalid_argument(field + ".dtype: expected " + std::string(dtype_name(cfg.dtype)) +
                            " (the cache's), got " + std::string(dtype_name(d.view.dtype)));
  }
  const std::string want =
      heads > 0 ? "[" + str(rows) + ", " + str(heads) + ", " + str(cfg.head_dim) + "]"
                : "[" + str(rows) + ", Hq (a multiple of " + str(cfg.heads_kv) + "), " +
                      str(cfg.head_dim) + "]";
  const Shape& s = d.view.shape;
  const bool ok = s.size() == 3 && s[0] == rows && s[2] == cfg.head_dim &&
                  (heads > 0 ? s[1] == heads : s[1] % cfg.heads_kv == 0);
  if (!ok)
    return invalid_argument(field + ".shape: expected " + want + ", got " + shape_to_string(s));
  return d;
}

template <class Args, class Request, class Response>
Result<KvRequest<Args>> decode_request(const Request& req, Response* resp, const KvCache& cache,
                                       const std::vector<std::int64_t>& fresh,
                                       const Registry& registry, const wire::TensorLimits& limits) {
  ATTN_RETURN_IF_ERROR(check_layer(cache, req.layer()));
  ATTN_RETURN_IF_ERROR(check_ids(req.sequence_ids()));
  if (fresh.size() != static_cast<std::size_t>(req.sequence_ids_size())) {
    return invalid_argument("lens: expected one count per sequence (" +
                            str(req.sequence_ids_size()) + "), got " +
                            str(static_cast<std::int64_t>(fresh.size())));
  }
  std::int64_t rows = 0;
  for (auto f : fresh) rows += f;
  ATTN_ASSIGN_OR_RETURN(q, kv_input(req.q(), req.has_q(), "q", cache, rows, 0, limits));
  constexpr bool kDecode = std::is_same_v<Args, PagedDecodeArgs>;
  const auto& k_msg = [&]() -> const v1::Tensor& {
    if constexpr (kDecode)
      return req.k_new();
    else
      return req.k();
  }();
  const auto& v_msg = [&]() -> const v1::Tensor& {
    if constexpr (kDecode)
      return req.v_new();
    else
      return req.v();
  }();
  const bool has_k = [&] {
    if constexpr (kDecode)
      return req.has_k_new();
    else
      return req.has_k();
  }();
  const bool has_v = [&] {
    if constexpr (kDecode)
      return req.has_v_new();
    else
      return req.has_v();
  }();
  const std::int64_t hkv = cache.config().heads_kv;
  ATTN_ASSIGN_OR_RETURN(k,
                        kv_input(k_msg, has_k, kDecode ? "k_new" : "k", cache, rows, hkv, limits));
  ATTN_ASSIGN_OR_RETURN(v,
                        kv_input(v_msg, has_v, kDecode ? "v_new" : "v", cache, rows, hkv, limits));
  if (!std::isfinite(req.scale())) {
    return invalid_argument("scale: expected a finite number (0 for 1/sqrt(D)), got " +
                            std::to_string(req.scale()));
  }
  KvRequest<Args> out;
  Args& a = out.args;
  a.q = q.view;
  a.k_new = k.view;
  a.v_new = v.view;
  a.cache = cache.layer(req.layer());
  a.scale = resolve_attention_scale(req.scale(), cache.config().head_dim);
  // The plan comes on the worker, in the cache's order; variants are chosen now, on its shape.
  out.placeholder = PagedPlan::placeholder(static_cast<std::int64_t>(fresh.size()));
  if constexpr (kDecode) {
    out.placeholder.bind(a.seqs);
  } else {
    out.placeholder.bind(a);
  }
  bool causal = false;
  if constexpr (!kDecode) {
    causal = a.causal = !req.non_causal();
    a.max_new_tokens = *std::max_element(fresh.begin(), fresh.end());
  }
  // The response's bytes, charged to the call (the server's memory bound) before they exist.
  if (MemoryHold* hold = current_call_hold()) {
    const std::size_t o_bytes = static_cast<std::size_t>(element_count(q.view.shape)) *
                                element_size(cache.config().dtype);
    ATTN_RETURN_IF_ERROR(hold->add(o_bytes, "o"));
    if (req.return_lse())
      ATTN_RETURN_IF_ERROR(hold->add(static_cast<std::size_t>(rows * q.view.dim(1)) * 4, "lse"));
  }
  a.o = wire::prepare_output(cache.config().dtype, q.view.shape, resp->mutable_o());
  if (req.return_lse())
    a.lse = wire::prepare_output(DType::kFloat32, {rows, q.view.dim(1)}, resp->mutable_lse());
  ATTN_ASSIGN_OR_RETURN(variant,
                        registry.of<Args>().select(a, req.kernel(), cache.owner().target()));
  out.variant = variant;
  out.causal = causal;
  out.inputs.push_back(std::move(q));
  out.inputs.push_back(std::move(k));
  out.inputs.push_back(std::move(v));
  return out;
}

}  // namespace

Result<KvRequest<PagedDecodeArgs>> decode_kv_request(const v1::DecodeRequest& req,
                                                     v1::DecodeResponse* resp, const KvCache& cache,
                                                     const std::vector<std::int64_t>& fresh,
                                                     const Registry& registry,
                                                     const wire::TensorLimits& limits) {
  return decode_request<PagedDecodeArgs>(req, resp, cache, fresh, registry, limits);
}

Result<KvRequest<PagedPrefillArgs>> decode_kv_request(const v1::PrefillRequest& req,
                                                      v1::PrefillResponse* resp,
                                                      const KvCache& cache,
                                                      const std::vector<std::int64_t>& fresh,
                                                      const Registry& registry,
                                                      const wire::TensorLimits& limits) {
  return decode_request<PagedPrefillArgs>(req, resp, cache, fresh, registry, limits);
}

Result<std::vector<std::int64_t>> prefill_lens(const v1::PrefillRequest& req) {
  std::vector<std::int64_t> fresh(req.lens().begin(), req.lens().end());
  if (fresh.size() != static_cast<std::size_t>(req.sequence_ids_size())) {
    return invalid_argument("lens: expected one count per sequence (" +
                            str(req.sequence_ids_size()) + "), got " +
                            str(static_cast<std::int64_t>(fresh.size())));
  }
  std::int64_t total = 0;
  for (std::size_t i = 0; i < fresh.size(); ++i) {
    if (fresh[i] < 1 || fresh[i] > std::numeric_limits<std::int32_t>::max()) {
      return invalid_argument("lens[" + str(static_cast<std::int64_t>(i)) +
                              "]: expected 1..2^31-1 new tokens, got " + str(fresh[i]));
    }
    total += fresh[i];
    if (total > std::numeric_limits<std::int32_t>::max())
      return invalid_argument("lens: expected a sum below 2^31");
  }
  return fresh;
}

}  // namespace attn::server
