#include "requests/kv_request.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <string>

#include "requests/kv_fingerprint.h"
#include "state/memory_budget.h"

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

Status check_expected_lengths(const google::protobuf::RepeatedField<std::int64_t>& expected,
                              int sequences) {
  if (expected.empty()) return Status::Ok();
  if (expected.size() != sequences) {
    return invalid_argument("expected_lengths: expected one length per sequence (" +
                            str(sequences) + ", or none), got " + str(expected.size()));
  }
  for (int i = 0; i < expected.size(); ++i)
    if (expected[i] < 0 || expected[i] > std::numeric_limits<std::int32_t>::max()) {
      return invalid_argument("expected_lengths[" + str(i) +
                              "]: expected a length 0..2^31-1, got " + str(expected[i]));
    }
  return Status::Ok();
}

namespace {

// Where a tensor in device memory lives, for refusals.
std::string device_of(int executor, const RequestContext& ctx) {
  const int ordinal = ctx.executor_cuda_ordinals[static_cast<std::size_t>(executor)];
  return ordinal >= 0 ? "cuda:" + str(ordinal) : "the CPU";
}

// An input of the cache's dtype and shape [rows, heads, D], from any source (any_input); one in a
// device's memory must be on the cache's device.
Result<wire::DecodedTensor> kv_input(const v1::Tensor& t, bool present, const char* field,
                                     const KvCache& c, std::int64_t rows, std::int64_t heads,
                                     const RequestContext& ctx, const CallContext& call,
                                     RequestTensors& held) {
  const std::string f(field);
  ATTN_ASSIGN_OR_RETURN(d, any_input(t, present, field, ctx, call, held));
  if (held.executor >= 0 && ctx.executor_devices[static_cast<std::size_t>(held.executor)] !=
                                ctx.executor_devices[c.executor()]) {
    return failed_precondition(f + ": lives on " + device_of(held.executor, ctx) +
                               ", the cache on " + c.owner().device().label() +
                               "; send it inline, through host shared memory or from the cache's "
                               "device");
  }
  const KvCacheConfig& cfg = c.config();
  if (d.view.dtype != cfg.dtype) {
    return invalid_argument(f + ".dtype: expected " + std::string(dtype_name(cfg.dtype)) +
                            " (the cache's), got " + std::string(dtype_name(d.view.dtype)));
  }
  const std::string want =
      heads > 0 ? "[" + str(rows) + ", " + str(heads) + ", " + str(cfg.head_dim) + "]"
                : "[" + str(rows) + ", Hq (a multiple of " + str(cfg.heads_kv) + "), " +
                      str(cfg.head_dim) + "]";
  const Shape& s = d.view.shape;
  const bool ok = s.size() == 3 && s[0] == rows && s[2] == cfg.head_dim &&
                  (heads > 0 ? s[1] == heads : s[1] % cfg.heads_kv == 0);
  if (!ok) return invalid_argument(f + ".shape: expected " + want + ", got " + shape_to_string(s));
  return d;
}

// An output of a Decode or Prefill call: in the region its output_shm entry names (shm_output:
// one in a device's memory must be on the cache's device), else inline in the response.
Result<TensorView> kv_output(DType dtype, const Shape& shape, v1::Tensor* out, const char* field,
                             const v1::SharedMemoryRef* to_shm, const KvCache& c,
                             const RequestContext& ctx, const CallContext& call,
                             RequestTensors& held) {
  if (!to_shm || to_shm->region().empty()) {
    ATTN_RETURN_IF_ERROR(call.hold_more(
        static_cast<std::size_t>(element_count(shape)) * element_size(dtype), field));
    return wire::prepare_output(dtype, shape, out);
  }
  // Pinned by the region (a CUDA one) or by the inputs: the cache's device only.
  RequestTensors pinned;
  ATTN_ASSIGN_OR_RETURN(view, shm_output(dtype, shape, out, *to_shm, field, ctx, call, pinned));
  if (pinned.executor >= 0 && ctx.executor_devices[static_cast<std::size_t>(pinned.executor)] !=
                                  ctx.executor_devices[c.executor()]) {
    return failed_precondition(std::string("output_shm (") + field + "): region \"" +
                               to_shm->region() + "\" lives on " + device_of(pinned.executor, ctx) +
                               ", the cache on " + c.owner().device().label() +
                               "; name a region on the cache's device or in host shared memory");
  }
  for (auto& b : pinned.shm_buffers) held.shm_buffers.push_back(std::move(b));
  for (auto& o : pinned.shm_outputs) held.shm_outputs.push_back(std::move(o));
  for (auto& r : pinned.shm_regions) held.shm_regions.push_back(std::move(r));
  return view;
}

// Where Decode and Prefill requests differ: the names of their K/V fields, their mask, and
// Prefill's count of new tokens per sequence.
template <class Request>
struct KvFields;

template <>
struct KvFields<v1::DecodeRequest> {
  static constexpr const char* kK = "k_new";
  static constexpr const char* kV = "v_new";
  static const v1::Tensor& k(const v1::DecodeRequest& r) { return r.k_new(); }
  static const v1::Tensor& v(const v1::DecodeRequest& r) { return r.v_new(); }
  static bool has_k(const v1::DecodeRequest& r) { return r.has_k_new(); }
  static bool has_v(const v1::DecodeRequest& r) { return r.has_v_new(); }
  // Prefill's one-token case: each new token sits at the end of its sequence, so the causal mask
  // lets it see every key, or (window_left) the last window_left + 1 of them.
  static AttentionMask mask(const v1::DecodeRequest& r) {
    return AttentionMask{true, r.has_window_left() ? r.window_left() : -1, -1};
  }
  static void set_new_tokens(const std::vector<std::int64_t>&, PagedDecodeArgs&) {}
};

template <>
struct KvFields<v1::PrefillRequest> {
  static constexpr const char* kK = "k";
  static constexpr const char* kV = "v";
  static const v1::Tensor& k(const v1::PrefillRequest& r) { return r.k(); }
  static const v1::Tensor& v(const v1::PrefillRequest& r) { return r.v(); }
  static bool has_k(const v1::PrefillRequest& r) { return r.has_k(); }
  static bool has_v(const v1::PrefillRequest& r) { return r.has_v(); }
  // Causal unless asked otherwise: each new token sees the cache and the new tokens up to itself,
  // within its window (unset sides: unbounded, -1).
  static AttentionMask mask(const v1::PrefillRequest& r) {
    return AttentionMask{!r.non_causal(), r.has_window_left() ? r.window_left() : -1,
                         r.has_window_right() ? r.window_right() : -1};
  }
  static void set_new_tokens(const std::vector<std::int64_t>& fresh, PagedPrefillArgs& a) {
    a.max_new_tokens = *std::max_element(fresh.begin(), fresh.end());
  }
};

template <class Args, class Request, class Response>
Result<KvRequest<Args>> parse_request(const Request& req, Response* resp, const KvCache& cache,
                                      const std::vector<std::int64_t>& fresh,
                                      const RequestContext& ctx, const CallContext& call) {
  ATTN_RETURN_IF_ERROR(check_layer(cache, req.layer()));
  ATTN_RETURN_IF_ERROR(check_ids(req.sequence_ids()));
  if (fresh.size() != static_cast<std::size_t>(req.sequence_ids_size())) {
    return invalid_argument("lens: expected one count per sequence (" +
                            str(req.sequence_ids_size()) + "), got " +
                            str(static_cast<std::int64_t>(fresh.size())));
  }
  ATTN_RETURN_IF_ERROR(check_expected_lengths(req.expected_lengths(), req.sequence_ids_size()));
  ATTN_RETURN_IF_ERROR(check_output_refs(req.output_shm(), req.return_lse() ? 2 : 1));
  std::int64_t rows = 0;
  for (auto f : fresh) rows += f;
  KvRequest<Args> out;
  ATTN_ASSIGN_OR_RETURN(q, kv_input(req.q(), req.has_q(), "q", cache, rows, 0, ctx, call, out));
  using Fields = KvFields<Request>;
  const std::int64_t hkv = cache.config().heads_kv;
  ATTN_ASSIGN_OR_RETURN(k, kv_input(Fields::k(req), Fields::has_k(req), Fields::kK, cache, rows,
                                    hkv, ctx, call, out));
  ATTN_ASSIGN_OR_RETURN(v, kv_input(Fields::v(req), Fields::has_v(req), Fields::kV, cache, rows,
                                    hkv, ctx, call, out));
  if (!std::isfinite(req.scale())) {
    return invalid_argument("scale: expected a finite number (0 for 1/sqrt(D)), got " +
                            std::to_string(req.scale()));
  }
  // Windows, soft cap and sinks: checked here, before the call is queued, so a refused call
  // never reaches the cache (nothing appended).
  const AttentionMask mask = Fields::mask(req);
  ATTN_RETURN_IF_ERROR(check_attention_options(mask.window_left, mask.window_right, req.softcap()));
  ATTN_ASSIGN_OR_RETURN(sinks,
                        sinks_input(req.sinks(), req.has_sinks(), q.view.dim(1), ctx, call, out));
  if (out.executor >= 0 && ctx.executor_devices[static_cast<std::size_t>(out.executor)] !=
                               ctx.executor_devices[cache.executor()]) {
    return failed_precondition("sinks: lives on " + device_of(out.executor, ctx) +
                               ", the cache on " + cache.owner().device().label() +
                               "; send them inline, through host shared memory or from the cache's "
                               "device");
  }
  Args& a = out.args;
  a.q = q.view;
  a.k_new = k.view;
  a.v_new = v.view;
  a.cache = cache.layer(req.layer());
  a.scale = resolve_attention_scale(req.scale(), cache.config().head_dim);
  // The plan comes on the worker, in the cache's order; variants are chosen now, on its shape.
  out.placeholder = PagedPlan::placeholder(static_cast<std::int64_t>(fresh.size()));
  bind_plan(out.placeholder, a);
  a.mask = mask;
  a.softcap = req.softcap();
  a.sinks = sinks;
  Fields::set_new_tokens(fresh, a);
  // The outputs: in registered shared memory where output_shm names a region (one on a device
  // must be the cache's), else the response's bytes, charged to the call (the server's memory
  // bound) before they exist.
  ATTN_ASSIGN_OR_RETURN(o, kv_output(cache.config().dtype, q.view.shape, resp->mutable_o(), "o",
                                     output_ref(req.output_shm(), 0), cache, ctx, call, out));
  a.o = o;
  if (req.return_lse()) {
    ATTN_ASSIGN_OR_RETURN(
        lse, kv_output(DType::kFloat32, {rows, q.view.dim(1)}, resp->mutable_lse(), "lse",
                       output_ref(req.output_shm(), 1), cache, ctx, call, out));
    a.lse = lse;
  }
  ATTN_ASSIGN_OR_RETURN(variant,
                        ctx.registry->of<Args>().select(a, req.kernel(), cache.owner().target()));
  out.variant = variant;
  if (!req.expected_lengths().empty()) {
    const std::vector<std::string> ids(req.sequence_ids().begin(), req.sequence_ids().end());
    KvCallIdentity identity{OpDesc<Args>::kName, req.layer(),       &ids, &fresh, req.return_lse(),
                            req.return_values(), variant->info.name};
    ATTN_ASSIGN_OR_RETURN(fingerprint, kv_fingerprint(identity, a, cache.owner()));
    Expectation e;
    e.lengths.assign(req.expected_lengths().begin(), req.expected_lengths().end());
    e.fingerprint = fingerprint;
    // What its record will hold: the bytes of o and lse (wherever they were sent), the ids.
    e.record_bytes = a.o.bytes() + a.lse.bytes() + 256;
    for (const std::string& id : ids) e.record_bytes += id.size() + 48;
    out.expectation = std::move(e);
  }
  out.inputs.push_back(std::move(q));
  out.inputs.push_back(std::move(k));
  out.inputs.push_back(std::move(v));
  return out;
}

}  // namespace

Result<KvRequest<PagedDecodeArgs>> parse_kv_request(const v1::DecodeRequest& req,
                                                    v1::DecodeResponse* resp, const KvCache& cache,
                                                    const std::vector<std::int64_t>& fresh,
                                                    const RequestContext& ctx,
                                                    const CallContext& call) {
  return parse_request<PagedDecodeArgs>(req, resp, cache, fresh, ctx, call);
}

Result<KvRequest<PagedPrefillArgs>> parse_kv_request(
    const v1::PrefillRequest& req, v1::PrefillResponse* resp, const KvCache& cache,
    const std::vector<std::int64_t>& fresh, const RequestContext& ctx, const CallContext& call) {
  return parse_request<PagedPrefillArgs>(req, resp, cache, fresh, ctx, call);
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
