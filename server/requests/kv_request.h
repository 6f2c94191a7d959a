// Decode and Prefill requests to kernel-library arguments, checked against their cache: every
// field checked (a Status naming it otherwise), the request's tensors viewed in place, the
// outputs allocated in the response, the variant chosen for the cache's device. The plan (pages,
// lengths) comes later, on the cache's worker, in the cache's order.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "attn/registry.h"
#include "attn/v1/attn.pb.h"
#include "attn/wire.h"
#include "requests/op_request.h"
#include "rpc/call_context.h"
#include "state/kv_cache.h"

namespace attn::server {

// A Decode or Prefill call's arguments; its tensors (q and the new K/V: inline, resident, shared
// memory or CUDA IPC, decoded as every op's are) in the base.
template <class Args>
struct KvRequest : RequestTensors {
  Args args;  // its index arrays bound to `placeholder` until the plan replaces them
  const Variant<Args>* variant = nullptr;
  PagedPlan placeholder;
  // expected_lengths given: what the call states (its lengths, fingerprint and record size),
  // judged on the cache's worker when it is planned.
  std::optional<Expectation> expectation;
};

// Binds a plan's index arrays (pages, lengths) into the op's arguments.
inline void bind_plan(const PagedPlan& plan, PagedDecodeArgs& a) { plan.bind(a.seqs); }
inline void bind_plan(const PagedPlan& plan, PagedPrefillArgs& a) { plan.bind(a); }

// The kernel-library ops the KV-cache RPCs run (Decode, Prefill): what the cache check at
// CreateKvCache and the warm-up go through, so that a new one is listed here once.
using PagedOpArgs = std::tuple<PagedDecodeArgs, PagedPrefillArgs>;
template <class F>
void for_each_paged_op(F&& f) {
  std::apply([&](const auto&... args) { (f(OpDesc<std::decay_t<decltype(args)>>{}), ...); },
             PagedOpArgs{});
}

// A paged op's arguments for `plan`'s sequences in `cache`, given its tensors (views with no data
// when only probing what the variants take), scale 1: what the cache check at CreateKvCache and
// the warm-up build for both ops.
template <class Args>
Args paged_call(const PagedKvLayer& cache, const TensorView& q, const TensorView& k_new,
                const TensorView& v_new, const TensorView& o, const PagedPlan& plan) {
  Args a;
  a.q = q;
  a.k_new = k_new;
  a.v_new = v_new;
  a.o = o;
  a.cache = cache;
  a.scale = 1.0f;
  bind_plan(plan, a);
  return a;
}

// `fresh`: the new tokens of each sequence (Decode: one each; Prefill: prefill_lens).
Result<KvRequest<PagedDecodeArgs>> parse_kv_request(const v1::DecodeRequest& req,
                                                    v1::DecodeResponse* resp, const KvCache& cache,
                                                    const std::vector<std::int64_t>& fresh,
                                                    const RequestContext& ctx,
                                                    const CallContext& call);
Result<KvRequest<PagedPrefillArgs>> parse_kv_request(
    const v1::PrefillRequest& req, v1::PrefillResponse* resp, const KvCache& cache,
    const std::vector<std::int64_t>& fresh, const RequestContext& ctx, const CallContext& call);

// expected_lengths: empty, or one per sequence, each 0..2^31-1 (a length a cache can hold).
Status check_expected_lengths(const google::protobuf::RepeatedField<std::int64_t>& expected,
                              int sequences);

// Prefill's `lens`: one per sequence, each 1..2^31-1, their sum below 2^31.
Result<std::vector<std::int64_t>> prefill_lens(const v1::PrefillRequest& req);

// The layer against the cache's layers; sequence ids: at least one, none empty, none twice.
Status check_layer(const KvCache& c, std::int64_t layer);
Status check_ids(const google::protobuf::RepeatedPtrField<std::string>& ids);

}  // namespace attn::server
