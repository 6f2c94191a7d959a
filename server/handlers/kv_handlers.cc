// The KV caches: CreateKvCache .. ReadKv. Requests are checked on the gRPC
// thread against the cache's configuration; everything that reads or changes a cache's
// sequences runs as a job on the cache's state (Placement::state), so calls on one cache happen
// in arrival order and calls on different caches run freely.
#include "handlers/kv_handlers.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <optional>
#include <set>

#include "handlers/handler_support.h"
#include "handlers/merged_launch.h"
#include "requests/kv_request.h"
#include "state/kv_cache.h"

namespace attn::server {
namespace {

using Clock = std::chrono::steady_clock;

std::string str(std::int64_t v) { return std::to_string(v); }

void fill_sequence(const KvSequenceSummary& s, v1::KvSequenceInfo* out) {
  out->set_id(s.id);
  out->mutable_lengths()->Assign(s.lengths.begin(), s.lengths.end());
  out->set_pages(s.pages);
  out->set_shared_pages(s.shared_pages);
}

}  // namespace

void KvHandlers::set_advertise_address(const std::string& address) {
  std::lock_guard lock(advertise_mu_);
  advertise_address_ = address;
}

void KvHandlers::describe(const KvCache& c, bool with_sequences, v1::KvCacheInfo* out) const {
  const KvCacheConfig& cfg = c.config();
  out->set_handle(c.handle());
  v1::KvCacheConfig* conf = out->mutable_config();
  conf->set_layers(cfg.layers);
  conf->set_kv_heads(cfg.heads_kv);
  conf->set_head_dim(cfg.head_dim);
  conf->set_dtype(wire::to_proto(cfg.dtype));
  conf->set_page_size(cfg.page_size);
  conf->set_capacity_tokens(cfg.capacity_tokens());
  if (cfg.fp8()) conf->set_kv_storage(v1::D_TYPE_FLOAT8_E4M3);
  out->set_device(c.owner().device().label());
  {
    std::lock_guard lock(advertise_mu_);
    out->set_replica(advertise_address_);
  }
  const KvCacheSummary s = c.summary(with_sequences);
  out->set_pages_total(cfg.pages);
  out->set_pages_used(s.pages_used);
  out->set_pages_free(s.pages_free);
  out->set_bytes(static_cast<std::int64_t>(c.bytes()));
  out->set_sequence_count(s.sequences);
  out->set_pages_unshared(s.pages_unshared);
  out->set_replay_bytes(s.replay_bytes);
  out->set_expires_unix_ms(unix_ms(core_.config.kv_caches->expires(c)));
  for (const auto& q : s.sequence_list) fill_sequence(q, out->add_sequences());
}

// Finds the cache a request names; refusals name `field`.
Result<std::shared_ptr<KvCache>> KvHandlers::find_cache(const std::string& handle,
                                                        const std::string& field) const {
  if (!core_.config.kv_caches)
    return failed_precondition(field + ": this server keeps no KV caches");
  return core_.config.kv_caches->find(handle, field);
}

Placement placement_of(const Scheduler& scheduler, const KvCache& c) {
  Placement p;
  p.backend = c.owner().target().backend;
  p.device = scheduler.device_of(c.executor());
  p.state = &c;
  return p;
}

// Whether some paged variant on `target` can take a cache of `cfg` (checked at creation, so a
// cache is not placed where no kernel can serve it).
Status KvHandlers::kv_servable(const KvCacheConfig& cfg, const Target& target) const {
  PagedKvLayer cache{cfg.dtype,    cfg.pages, cfg.heads_kv, cfg.page_size,
                     cfg.head_dim, nullptr,   nullptr,      MemoryKind::kHost};
  float no_scales = 0.0f;  // the checks look at the pointers' presence only
  if (cfg.fp8()) {
    cache.storage = KvStorage::kFloat8E4M3;
    cache.k_scales = cache.v_scales = &no_scales;
    cache.fixed_scales = cfg.fixed_scales();
  }
  // One token of one sequence, as many query heads as KV heads (every variant takes group 1).
  const TensorView q{cfg.dtype, {1, cfg.heads_kv, cfg.head_dim}, nullptr, MemoryKind::kHost};
  const PagedPlan plan = PagedPlan::placeholder(1);
  Status servable = Status::Ok();
  for_each_paged_op([&](auto desc) {
    using Args = typename decltype(desc)::Args;
    if (servable.ok())
      servable = core_.registry.of<Args>()
                     .select(paged_call<Args>(cache, q, q, q, q, plan), "", target)
                     .status();
  });
  return servable;
}

grpc::ServerUnaryReactor* KvHandlers::CreateKvCache(CallContext& call,
                                                    const v1::CreateKvCacheRequest* req,
                                                    v1::CreateKvCacheResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto created = [&]() -> Result<std::shared_ptr<KvCache>> {
    if (!core_.config.kv_caches)
      return failed_precondition("CreateKvCache: this server keeps no KV caches");
    const v1::KvCacheConfig& c = req->config();
    KvCacheConfig cfg;
    cfg.layers = c.layers();
    cfg.heads_kv = c.kv_heads();
    cfg.head_dim = c.head_dim();
    cfg.page_size = c.page_size() == 0 ? 16 : c.page_size();
    ATTN_ASSIGN_OR_RETURN(dtype, wire::dtype_from_proto(c.dtype(), "config.dtype"));
    cfg.dtype = dtype;
    if (c.kv_storage() == v1::D_TYPE_FLOAT8_E4M3) {
      cfg.storage = KvStorage::kFloat8E4M3;
    } else if (c.kv_storage() != v1::D_TYPE_UNSPECIFIED && c.kv_storage() != c.dtype()) {
      const std::string got = v1::DType_IsValid(c.kv_storage())
                                  ? v1::DType_Name(c.kv_storage())
                                  : std::to_string(static_cast<int>(c.kv_storage()));
      return invalid_argument(
          "config.kv_storage: expected D_TYPE_UNSPECIFIED or config.dtype (stored in the "
          "cache's dtype) or D_TYPE_FLOAT8_E4M3, got " +
          got);
    }
    cfg.fixed_k_scales.assign(c.k_scales().begin(), c.k_scales().end());
    cfg.fixed_v_scales.assign(c.v_scales().begin(), c.v_scales().end());
    ATTN_RETURN_IF_ERROR(
        check_kv_config(cfg, c.capacity_tokens(), core_.config.limits.max_elements));
    cfg.pages = (c.capacity_tokens() + cfg.page_size - 1) / cfg.page_size;
    ATTN_ASSIGN_OR_RETURN(executor, core_.place(req->device()));
    const auto& executors = core_.scheduler.executors();
    Status servable = kv_servable(cfg, executors[executor]->target());
    if (!servable.ok() && req->device().empty()) {
      // No kernel of the serving device takes this configuration: the CPU, which takes any, holds
      // it.
      for (std::size_t i = 0; i < executors.size(); ++i)
        if (executors[i]->target().backend == Backend::kCpu) {
          spdlog::warn(
              "kv cache: {} cannot serve {} layers x {} heads x D {} {} ({} storage) pages of {} "
              "({}); placing "
              "it on the CPU",
              executors[executor]->device().label(), cfg.layers, cfg.heads_kv, cfg.head_dim,
              dtype_name(cfg.dtype), kv_storage_name(cfg.storage), cfg.page_size,
              servable.message());
          executor = i;
          servable = Status::Ok();
          break;
        }
    }
    if (!servable.ok())
      return invalid_argument("config: " + executors[executor]->device().label() +
                              " cannot serve it: " + servable.message());
    return core_.config.kv_caches->create(cfg, req->ttl_ms(), executor);
  }();
  if (created.ok()) {
    describe(**created, false, resp->mutable_cache());
    spdlog::info("kv cache {} created on {}: {} bytes", (*created)->handle(),
                 (*created)->owner().device().label(), (*created)->bytes());
  }
  core_.finish(call, reactor, "", created.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* KvHandlers::DescribeKvCache(CallContext& call,
                                                      const v1::DescribeKvCacheRequest* req,
                                                      v1::DescribeKvCacheResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto c = find_cache(req->handle(), "handle");
  if (c.ok()) describe(**c, true, resp->mutable_cache());
  core_.finish(call, reactor, "", c.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* KvHandlers::ListKvCaches(CallContext& call,
                                                   const v1::ListKvCachesRequest*,
                                                   v1::ListKvCachesResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  if (core_.config.kv_caches)
    for (const auto& l : core_.config.kv_caches->list()) {
      v1::KvCacheInfo* info = resp->add_caches();
      describe(*l.cache, false, info);
      info->set_expires_unix_ms(unix_ms(l.expires));
    }
  if (core_.config.store) {
    resp->set_used_bytes(static_cast<std::int64_t>(core_.config.store->used_bytes()));
    resp->set_quota_bytes(static_cast<std::int64_t>(core_.config.store->quota_bytes()));
  }
  core_.finish(call, reactor, "", Status::Ok(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* KvHandlers::DeleteKvCache(CallContext& call,
                                                    const v1::DeleteKvCacheRequest* req,
                                                    v1::DeleteKvCacheResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  Result<std::size_t> freed = core_.config.kv_caches
                                  ? core_.config.kv_caches->erase(req->handle())
                                  : Result<std::size_t>(failed_precondition(
                                        "DeleteKvCache: this server keeps no KV caches"));
  if (freed.ok()) resp->set_freed_bytes(static_cast<std::int64_t>(*freed));
  core_.finish(call, reactor, "", freed.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* KvHandlers::ReleaseSequences(CallContext& call,
                                                       const v1::ReleaseSequencesRequest* req,
                                                       v1::ReleaseSequencesResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto c = find_cache(req->cache(), "cache");
  Status valid = c.status();
  if (valid.ok()) valid = check_ids(req->sequence_ids());
  if (!valid.ok()) {
    core_.finish(call, reactor, "", valid, nullptr, 0);
    return reactor;
  }
  std::shared_ptr<KvCache> cache = std::move(c).value();
  core_.submit(
      call, reactor, "", placement_of(core_.scheduler, *cache),
      [=, this, &call](Executor&, std::int64_t) {
        auto freed = cache->release({req->sequence_ids().begin(), req->sequence_ids().end()});
        if (freed.ok()) resp->set_freed_pages(*freed);
        core_.finish(call, reactor, "", freed.status(), nullptr, 0);
      });
  return reactor;
}

grpc::ServerUnaryReactor* KvHandlers::ForkSequence(CallContext& call,
                                                   const v1::ForkSequenceRequest* req,
                                                   v1::ForkSequenceResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto c = find_cache(req->cache(), "cache");
  if (!c.ok()) {
    core_.finish(call, reactor, "", c.status(), nullptr, 0);
    return reactor;
  }
  std::shared_ptr<KvCache> cache = std::move(c).value();
  core_.submit(call, reactor, "", placement_of(core_.scheduler, *cache),
               [=, this, &call](Executor&, std::int64_t) {
                 KvSequenceSummary s;
                 auto copied = cache->fork(req->source_id(), req->new_id(), &s);
                 if (copied.ok()) {
                   fill_sequence(s, resp->mutable_sequence());
                   resp->set_copied_pages(*copied);
                 }
                 core_.device_faulted(cache->owner(), call.op(),
                                      copied.status());  // the copies ran on the cache's executor
                 core_.finish(call, reactor, "", copied.status(), nullptr, 0);
               });
  return reactor;
}

// In the cache's order like an append: a Decode or Prefill queued before it sees the whole
// sequence, one queued after it the cut one.
grpc::ServerUnaryReactor* KvHandlers::TruncateSequence(CallContext& call,
                                                       const v1::TruncateSequenceRequest* req,
                                                       v1::TruncateSequenceResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto c = find_cache(req->cache(), "cache");
  if (!c.ok()) {
    core_.finish(call, reactor, "", c.status(), nullptr, 0);
    return reactor;
  }
  std::shared_ptr<KvCache> cache = std::move(c).value();
  core_.submit(call, reactor, "", placement_of(core_.scheduler, *cache),
               [=, this, &call](Executor&, std::int64_t) {
                 auto cut = cache->truncate(req->sequence_id(), req->length());
                 if (cut.ok()) {
                   fill_sequence(cut->sequence, resp->mutable_sequence());
                   resp->set_freed_pages(cut->freed_pages);
                   resp->set_copied_pages(cut->copied_pages);
                 }
                 // A copy of a shared page ran on the cache's executor.
                 core_.device_faulted(cache->owner(), call.op(), cut.status());
                 core_.finish(call, reactor, "", cut.status(), nullptr, 0);
               });
  return reactor;
}

// How Decode or Prefill calls waiting together share a launch (merged_launch.h): their rows
// stack along axis 0 and one plan covers every call's sequences.
template <class A>
struct KvMerging {
  using Args = A;
  static constexpr int kAxis = 0;  // [rows, heads, D]
  static constexpr std::array kInputs{&Args::q, &Args::k_new, &Args::v_new};
  static constexpr std::array kOutputs{&Args::o, &Args::lse};
  struct Union {
    PagedPlan plan{{0}, {}, {}, {0}};
    std::vector<std::int32_t> members_at{0};  // each call's first sequence in the plan
  };

  // Calls merge when one launch can serve them all: the same cache, variant, query heads, scale,
  // mask (causal, window), soft cap, sinks (their values: the union runs with the first call's)
  // and outputs; any layers (one view of all of them), where its page numbers fit. Inputs and
  // outputs in host memory only (an output bound for a host region is staged there): the merged
  // launch gathers and scatters them with memcpy.
  static std::string key(const Args& a, const Variant<Args>& variant, const KvCache& cache,
                         int layer) {
    if (a.q.memory != MemoryKind::kHost || a.k_new.memory != MemoryKind::kHost ||
        a.v_new.memory != MemoryKind::kHost ||
        (!a.sinks.empty() && a.sinks.memory != MemoryKind::kHost) ||
        a.o.memory != MemoryKind::kHost || (!a.lse.empty() && a.lse.memory != MemoryKind::kHost))
      return "";
    char key[256];
    std::snprintf(key, sizeof key, "%s %p %d %s %lld %a %d %lld %lld %d %a", OpDesc<Args>::kName,
                  static_cast<const void*>(&cache),
                  cache.config().layers_fit_one_view() ? -1 : layer, variant.info.name.c_str(),
                  static_cast<long long>(a.q.dim(1)), static_cast<double>(a.scale),
                  a.mask.causal ? 1 : 0, static_cast<long long>(a.mask.window_left),
                  static_cast<long long>(a.mask.window_right), a.lse.empty() ? 0 : 1,
                  static_cast<double>(a.softcap));
    return key + sinks_key(a.sinks);
  }
  static TensorView rows(const TensorView& v) { return v; }
  // One plan over the calls' planned sequences, in order; calls on other layers than the first
  // see one view of every layer, their pages renumbered into it.
  template <class Call>
  static Result<const Variant<Args>*> unite(const std::vector<Call*>& calls, Args& all, Union& u,
                                            const Registry&, const Target&) {
    const Call& first = *calls.front();
    bool layers_differ = false;
    for (const Call* c : calls) layers_differ |= c->layer != first.layer;
    for (const Call* c : calls) {
      const PagedPlan& p = c->pending->plan;
      for (std::size_t s = 0; s + 1 < p.page_indptr.size(); ++s) {
        u.plan.page_indptr.push_back(u.plan.page_indptr.back() + p.page_indptr[s + 1] -
                                     p.page_indptr[s]);
        u.plan.q_indptr.push_back(u.plan.q_indptr.back() + p.q_indptr[s + 1] - p.q_indptr[s]);
      }
      const std::int32_t offset = layers_differ ? first.cache->layer_page_offset(c->layer) : 0;
      for (std::int32_t page : p.page_indices) u.plan.page_indices.push_back(page + offset);
      u.plan.seq_lens.insert(u.plan.seq_lens.end(), p.seq_lens.begin(), p.seq_lens.end());
      u.members_at.push_back(static_cast<std::int32_t>(u.plan.seq_lens.size()));
    }
    if (layers_differ) all.cache = first.cache->all_layers();
    bind_plan(u.plan, all);
    mark_members(all, u.members_at);
    return first.request.variant;
  }

 private:
  // A merged decode plans each call's sequences as its call alone would (the same bits as
  // unbatched): it is told where each call's sequences start. Prefill's plan needs no such help.
  static void mark_members(PagedDecodeArgs& merged, const std::vector<std::int32_t>& members_at) {
    merged.merged_calls_host = members_at.data();
    merged.merged_calls = static_cast<std::int64_t>(members_at.size()) - 1;
  }
  static void mark_members(PagedPrefillArgs&, const std::vector<std::int32_t>&) {}
};

// One Decode or Prefill call, from its checks to its response; a BatchMember, so that calls on
// the same cache and layer waiting together share one launch.
template <class Args, class Response>
class KvCall final : public BatchMember {
 public:
  const ServiceCore* core = nullptr;
  const CallContext* call = nullptr;  // the gate's, alive until the call finishes
  grpc::ServerUnaryReactor* reactor = nullptr;
  Response* resp = nullptr;
  bool return_values = false, create_missing = false;
  std::shared_ptr<KvCache> cache;
  int layer = 0;
  std::vector<std::string> ids;
  std::vector<std::int64_t> fresh;
  // Its arguments and variant; q and the new K/V decoded in place (what keeps their views valid).
  KvRequest<Args> request;
  std::string key;
  std::optional<KvCache::PendingAppend> pending;  // its pages and lengths, once planned

  // Finishes the call with an error (a refusal, a drop from the queue).
  void fail(const Status& s) {
    core->finish(*call, reactor, request.variant ? request.variant->info.name : "", s, nullptr, 0);
  }
  const std::string& batch_key() const override { return key; }

  bool joins(const std::vector<const BatchMember*>& batch) const override {
    for (const BatchMember* m : batch)
      for (const std::string& id : static_cast<const KvCall*>(m)->ids)
        if (std::find(ids.begin(), ids.end(), id) != ids.end())
          return false;  // must see the other's append
    return true;
  }

  // Alone: planned (unless a batch planned it already), run, committed (or its pages given back);
  // a repeat is answered from its record.
  void run_alone(Executor& executor, std::int64_t queue_ns) {
    if (!pending) {
      if (Status planned = plan(); !planned.ok()) return fail(planned);
    }
    if (pending->repeat_of) return replay(executor, queue_ns);
    bind_plan(pending->plan, request.args);
    ExecTimings t;
    t.prepare_ns = plan_ns;
    const Status status = executor.execute(make_call(*request.variant, request.args), t);
    if (!status.ok()) {
      core->device_faulted(executor, request.variant->info.name, status);
      undo_together();
      return fail(status);
    }
    ran_together(executor, t, queue_ns, 1, request.variant->info);
  }

  // Together: each call planned and judged on its own (one that cannot be planned fails alone, a
  // repeat is answered alone from its record), then one launch for the others.
  void run_together(Executor& executor, const std::vector<Merged>& members) override {
    std::vector<KvCall*> live;
    std::vector<std::int64_t> waits;
    for (const Merged& m : members) {
      auto* member = static_cast<KvCall*>(m.member);
      if (Status planned = member->plan(); !planned.ok()) {
        member->fail(planned);
        continue;
      }
      if (member->pending->repeat_of) {
        member->replay(executor, m.queue_ns);
        continue;
      }
      live.push_back(member);
      waits.push_back(m.queue_ns);
    }
    if (live.empty()) return;
    if (live.size() == 1) return live.front()->run_alone(executor, waits.front());
    run_merged<KvMerging<Args>>(*core, executor, live, waits);
  }

  std::int64_t plan_ns = 0;  // host time planning its pages

  // Its part in a launch (merged_launch.h): the launch failed (its pages go back), or ran (its
  // appends are committed, its rows answered).
  const Args& launch_args() const { return request.args; }
  void undo_together() { cache->abort(*pending); }
  void ran_together(Executor& executor, const ExecTimings& launched, std::int64_t queue_ns,
                    int batched, const VariantInfo& ran) {
    ExecTimings t = launched;
    if (batched > 1) t.prepare_ns += plan_ns;           // alone, run_alone counted it
    bind_plan(pending->plan, request.args);             // for its own cost
    if (AppliedCall* record = pending->record.get()) {  // kept for a repeat: the outputs' bytes
      Status kept = keep_output(executor, request.args.o, resp->o(), &record->o);
      record->has_lse = resp->has_lse();
      if (kept.ok() && record->has_lse)
        kept = keep_output(executor, request.args.lse, resp->lse(), &record->lse);
      record->variant = ran.name;
      if (!kept.ok()) {
        core->device_faulted(executor, ran.name, kept);
        return undo_or_commit(kept, batched);
      }
    }
    // Outputs bound for host regions, written before the append is committed: one that cannot be
    // written (the object shrunk under it) fails the call with nothing appended, unless it shared
    // a launch (the calls' pages are committed in order).
    if (Status written = deliver(); !written.ok()) return undo_or_commit(written, batched);
    for (auto len : pending->new_lengths) resp->add_lengths(len);
    if (return_values) {  // inline outputs only: those in a region have no bytes here
      if (!resp->o().has_shm()) wire::convert_to_values(resp->mutable_o());
      if (resp->has_lse() && !resp->lse().has_shm()) wire::convert_to_values(resp->mutable_lse());
    }
    cache->commit(*pending);
    v1::Timings* timings = resp->mutable_timings();
    fill_timings(timings, ran.name, executor, queue_ns, t, cost_of(request.args), batched,
                 call->start);
    core->finish(*call, reactor, ran.name, Status::Ok(), timings, resp->ByteSizeLong());
  }

 private:
  Status plan() {
    const auto begin = Clock::now();
    auto p = cache->plan_append(layer, ids, fresh, create_missing,
                                request.expectation ? &*request.expectation : nullptr);
    if (!p.ok()) return p.status();
    pending = std::move(p).value();
    plan_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - begin).count();
    return Status::Ok();
  }

  // A host output's bytes (inline in `sent`, or staged at `view` for a host region) or a device
  // one's (a CUDA region, read back through `executor`) into `kept`: dtype, shape and data.
  static Status keep_output(Executor& executor, const TensorView& view, const v1::Tensor& sent,
                            v1::Tensor* kept) {
    kept->set_dtype(wire::to_proto(view.dtype));
    kept->mutable_shape()->Assign(view.shape.begin(), view.shape.end());
    if (!sent.has_shm()) {
      kept->set_data(sent.data());
      return Status::Ok();
    }
    std::string* bytes = kept->mutable_data();
    bytes->resize(view.bytes());
    if (view.memory == MemoryKind::kHost) {
      std::memcpy(bytes->data(), view.data, view.bytes());
      return Status::Ok();
    }
    return executor.read(bytes->data(), view.data, 0, view.bytes());
  }

  // The call failed after its kernel ran: alone, its pages go back (nothing appended); in a shared
  // launch the append stands (later calls' pages were planned after its own) and the failure says
  // so.
  void undo_or_commit(const Status& why, int batched) {
    if (batched <= 1) {
      cache->abort(*pending);
      return fail(why);
    }
    cache->commit(*pending);
    fail(Status(why.code(),
                why.message() +
                    " (the call shared a launch: its tokens were appended; a repeat with "
                    "expected_lengths answers from its record)"));
  }

  // Writes the outputs staged for host regions.
  Status deliver() {
    if (request.shm_outputs.empty()) return Status::Ok();
    std::size_t written = 0;
    ATTN_RETURN_IF_ERROR(write_shm_outputs(*core->config.shm, request, &written));
    if (core->config.metrics) core->config.metrics->record_shared_memory(call->op(), 0, written);
    return Status::Ok();
  }

  // A recorded output into this call's response: into the region its output_shm names (host:
  // written through the registry; device: copied in place through `executor`), else inline.
  Status replay_output(Executor& executor, const v1::Tensor& kept, const TensorView& view,
                       v1::Tensor* out) {
    if (!out->has_shm()) {
      *out = kept;
      if (return_values) wire::convert_to_values(out);
      return Status::Ok();
    }
    if (kept.data().size() != view.bytes())
      return internal_error("replay: the record's output is not the size of this call's");
    if (view.memory != MemoryKind::kHost)
      return executor.write(view.data, 0, kept.data().data(), view.bytes());
    for (const auto& o : request.shm_outputs)
      if (o.data == view.data) {
        ATTN_RETURN_IF_ERROR(core->config.shm->write(o.slice, kept.data().data(), o.field));
        if (core->config.metrics)
          core->config.metrics->record_shared_memory(call->op(), 0,
                                                     static_cast<std::size_t>(o.slice.bytes));
        return Status::Ok();
      }
    return internal_error("replay: no staged region for an output in shared memory");
  }

  // A repeat of the last applied call on its sequences: that call's response, bit for bit (its
  // outputs written into the regions this call names), and nothing appended; its own timings (no
  // kernel ran, no cost).
  void replay(Executor& executor, std::int64_t queue_ns) {
    const AppliedCall& r = *pending->repeat_of;
    Status replayed = replay_output(executor, r.o, request.args.o, resp->mutable_o());
    if (replayed.ok() && r.has_lse)
      replayed = replay_output(executor, r.lse, request.args.lse, resp->mutable_lse());
    if (!replayed.ok()) return fail(replayed);
    if (!r.has_lse) resp->clear_lse();
    resp->mutable_lengths()->Assign(r.lengths.begin(), r.lengths.end());
    resp->set_replayed(true);
    v1::Timings* timings = resp->mutable_timings();
    fill_timings(timings, r.variant, executor, queue_ns, ExecTimings{}, OpCost{}, 1, call->start);
    if (core->config.metrics) core->config.metrics->record_replay(call->op());
    spdlog::info(
        "{}: a repeat of the call applied to {} sequence(s) from \"{}\" (expected length "
        "{}) at layer {} of kv cache {} (fingerprint {}): answered from its record, "
        "nothing appended ({})",
        call->op(), r.ids.size(), r.ids.front(), r.expected.front(), layer, cache->handle(),
        short_hex(r.fingerprint), call->peer());
    core->finish(*call, reactor, r.variant, Status::Ok(), timings, resp->ByteSizeLong());
  }
};

// Decode and Prefill: checked on this thread, then queued on the cache's state. `fresh` is
// each sequence's new-token count.
template <class Args, class Request, class Response>
grpc::ServerUnaryReactor* KvHandlers::serve_kv(CallContext& call, const Request* req,
                                               Response* resp, std::vector<std::int64_t> fresh,
                                               bool create_missing) {
  const char* op = call.op();
  auto kv = std::make_shared<KvCall<Args, Response>>();
  kv->core = &core_;
  kv->call = &call;
  kv->reactor = call.grpc->DefaultReactor();
  kv->resp = resp;
  kv->return_values = req->return_values();
  kv->create_missing = create_missing;
  kv->layer = req->layer();
  kv->ids.assign(req->sequence_ids().begin(), req->sequence_ids().end());
  kv->fresh = std::move(fresh);
  auto prepared = [&]() -> Status {
    ATTN_ASSIGN_OR_RETURN(cache, find_cache(req->cache(), "cache"));
    kv->cache = cache;
    ATTN_ASSIGN_OR_RETURN(r, parse_kv_request(*req, resp, *cache, kv->fresh, core_.requests, call));
    if (core_.config.metrics && !r.shm_buffers.empty())
      core_.config.metrics->record_shared_memory(op, r.shm_bytes_in(), 0);
    // Moved, the placeholder's arrays keep their storage: the arguments' views stay valid.
    kv->request = std::move(r);
    kv->key = KvMerging<Args>::key(kv->request.args, *kv->request.variant, *cache, kv->layer);
    return Status::Ok();
  }();
  if (!prepared.ok()) {
    core_.finish(call, kv->reactor, "", prepared, nullptr, 0);
    return kv->reactor;
  }
  const VariantInfo* variant = &kv->request.variant->info;
  Placement placement = placement_of(core_.scheduler, *kv->cache);
  placement.inline_when_idle = variant->backend == Backend::kCpu && tiny(cost_of(kv->request.args));
  Scheduler::Job job;
  job.abandoned = [&call] { return call_abandoned(call); };
  job.drop = [kv](const Status& why) { kv->fail(why); };
  job.run = [kv](Executor& executor, std::int64_t queue_ns) { kv->run_alone(executor, queue_ns); };
  job.batch = kv;
  resp->mutable_timings()->set_receive_ns(call.receive_ns());
  resp->mutable_timings()->set_parse_ns(call.parse_ns());
  const Status queued = core_.scheduler.submit(placement, std::move(job));
  if (!queued.ok()) kv->fail(queued);
  return kv->reactor;
}

grpc::ServerUnaryReactor* KvHandlers::Decode(CallContext& call, const v1::DecodeRequest* req,
                                             v1::DecodeResponse* resp) {
  return serve_kv<PagedDecodeArgs>(
      call, req, resp,
      std::vector<std::int64_t>(static_cast<std::size_t>(req->sequence_ids_size()), 1), false);
}

grpc::ServerUnaryReactor* KvHandlers::Prefill(CallContext& call, const v1::PrefillRequest* req,
                                              v1::PrefillResponse* resp) {
  auto fresh = prefill_lens(*req);
  if (!fresh.ok()) {
    auto* reactor = call.grpc->DefaultReactor();
    core_.finish(call, reactor, "", fresh.status(), nullptr, 0);
    return reactor;
  }
  return serve_kv<PagedPrefillArgs>(call, req, resp, std::move(fresh).value(), true);
}

// The header, then K's bytes and V's, from a copy gathered on the cache's worker (in order with
// the cache's other calls).
class ReadKvReactor final : public grpc::ServerWriteReactor<v1::ReadKvResponse> {
 public:
  ReadKvReactor(const ServiceCore& core, const CallContext& call, std::shared_ptr<KvCache> cache,
                const v1::ReadKvRequest& req, std::size_t chunk_bytes)
      : core_(core), cache_(std::move(cache)), chunk_bytes_(chunk_bytes) {
    Scheduler::Job job;
    job.abandoned = [&call] {
      return call.grpc->IsCancelled()
                 ? cancelled("the caller cancelled the call while it waited in the queue")
                 : Status::Ok();
    };
    job.drop = [this](const Status& why) { Finish(wire::to_grpc(why)); };
    job.run = [this, id = req.sequence_id(), layer = req.layer(),
               dequantize = req.form() == v1::READ_KV_FORM_DEQUANTIZED](Executor&, std::int64_t) {
      const Status s = cache_->read(id, layer, dequantize, &kv_);
      if (!s.ok()) {
        core_.device_faulted(cache_->owner(), "read_kv", s);
        return Finish(wire::to_grpc(s));
      }
      v1::ReadKvHeader* h = msg_.mutable_header();
      h->set_dtype(kv_.fp8 ? v1::D_TYPE_FLOAT8_E4M3 : wire::to_proto(cache_->config().dtype));
      h->mutable_shape()->Assign(kv_.shape.begin(), kv_.shape.end());
      h->set_page_size(cache_->config().page_size);
      if (kv_.fp8)
        h->mutable_scales_shape()->Assign(kv_.scales_shape.begin(), kv_.scales_shape.end());
      parts_ = {{kv_.k.data(), kv_.k.size()},
                {kv_.v.data(), kv_.v.size()},
                {kv_.k_scales.data(), kv_.k_scales.size() * sizeof(float)},
                {kv_.v_scales.data(), kv_.v_scales.size() * sizeof(float)}};
      StartWrite(&msg_);
    };
    const Status queued =
        core.scheduler.submit(placement_of(core.scheduler, *cache_), std::move(job));
    if (!queued.ok()) Finish(wire::to_grpc(queued));
  }
  void OnWriteDone(bool ok) override {
    if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
    // A chunk never straddles two parts (K, V, and float8's K and V scales).
    while (part_ < parts_.size() && sent_ == parts_[part_].second) ++part_, sent_ = 0;
    if (part_ == parts_.size()) return Finish(grpc::Status::OK);
    const auto& [data, size] = parts_[part_];
    const std::size_t n = std::min(chunk_bytes_, size - sent_);
    msg_.set_chunk(static_cast<const char*>(data) + sent_, n);
    sent_ += n;
    StartWrite(&msg_);
  }
  void OnDone() override { delete this; }

 private:
  const ServiceCore& core_;
  std::shared_ptr<KvCache> cache_;
  std::size_t chunk_bytes_;
  KvCache::Contents kv_;
  std::vector<std::pair<const void*, std::size_t>> parts_;  // into kv_
  std::size_t part_ = 0, sent_ = 0;                         // sent_: of parts_[part_]
  v1::ReadKvResponse msg_;
};

grpc::ServerWriteReactor<v1::ReadKvResponse>* KvHandlers::ReadKv(CallContext& call,
                                                                 const v1::ReadKvRequest* req) {
  using Base = grpc::ServerWriteReactor<v1::ReadKvResponse>;
  if (req->chunk_bytes() < 0 || req->chunk_bytes() > core_.config.max_message_bytes / 2) {
    return new Refused<Base>(invalid_argument("chunk_bytes: expected 0 (1 MiB) to " +
                                              str(core_.config.max_message_bytes / 2) + ", got " +
                                              str(req->chunk_bytes())));
  }
  if (req->form() != v1::READ_KV_FORM_UNSPECIFIED && req->form() != v1::READ_KV_FORM_STORED &&
      req->form() != v1::READ_KV_FORM_DEQUANTIZED) {
    return new Refused<Base>(
        invalid_argument("form: expected READ_KV_FORM_UNSPECIFIED, READ_KV_FORM_STORED or "
                         "READ_KV_FORM_DEQUANTIZED, got " +
                         str(static_cast<std::int64_t>(req->form()))));
  }
  auto c = find_cache(req->cache(), "cache");
  if (!c.ok()) return new Refused<Base>(c.status());
  if (Status s = check_layer(**c, req->layer()); !s.ok()) return new Refused<Base>(s);
  const std::size_t chunk =
      req->chunk_bytes() == 0 ? std::size_t{1} << 20 : static_cast<std::size_t>(req->chunk_bytes());
  return new ReadKvReactor(core_, call, std::move(c).value(), *req, chunk);
}

}  // namespace attn::server
