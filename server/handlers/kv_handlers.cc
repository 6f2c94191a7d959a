// The KV-cache half of AttnService: CreateKvCache .. ReadKv. Requests are checked on the gRPC
// thread against the cache's configuration; everything that reads or changes a cache's
// sequences runs as a job on the cache's state (Placement::state), so calls on one cache happen
// in arrival order and calls on different caches run freely.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <set>

#include "handlers/attn_service.h"
#include "handlers/handler_support.h"
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

void AttnService::set_advertise_address(const std::string& address) {
  std::lock_guard lock(advertise_mu_);
  advertise_address_ = address;
}

void AttnService::describe(const KvCache& c, bool with_sequences, v1::KvCacheInfo* out) const {
  const KvCacheConfig& cfg = c.config();
  out->set_handle(c.handle());
  v1::KvCacheConfig* conf = out->mutable_config();
  conf->set_layers(cfg.layers);
  conf->set_kv_heads(cfg.heads_kv);
  conf->set_head_dim(cfg.head_dim);
  conf->set_dtype(wire::to_proto(cfg.dtype));
  conf->set_page_size(cfg.page_size);
  conf->set_capacity_tokens(cfg.capacity_tokens());
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
  out->set_expires_unix_ms(unix_ms(config_.kv_caches->expires(c)));
  for (const auto& q : s.sequence_list) fill_sequence(q, out->add_sequences());
}

// Finds the cache a request names; refusals name `field`.
Result<std::shared_ptr<KvCache>> AttnService::find_cache(const std::string& handle,
                                                         const std::string& field) {
  if (!config_.kv_caches) return failed_precondition(field + ": this server keeps no KV caches");
  return config_.kv_caches->find(handle, field);
}

Placement AttnService::placement_of(const KvCache& c) const {
  Placement p;
  p.backend = c.owner().target().backend;
  p.device = scheduler_.device_of(c.executor());
  p.state = &c;
  return p;
}

// Whether some paged variant on `target` can take a cache of `cfg` (checked at creation, so a
// cache is not placed where no kernel can serve it).
Status AttnService::kv_servable(const KvCacheConfig& cfg, const Target& target) const {
  const PagedKvLayer cache{cfg.dtype,    cfg.pages, cfg.heads_kv, cfg.page_size,
                           cfg.head_dim, nullptr,   nullptr,      MemoryKind::kHost};
  // One token of one sequence, as many query heads as KV heads (every variant takes group 1).
  const TensorView q{cfg.dtype, {1, cfg.heads_kv, cfg.head_dim}, nullptr, MemoryKind::kHost};
  const PagedPlan plan = PagedPlan::placeholder(1);
  ATTN_RETURN_IF_ERROR(registry_.of<PagedDecodeArgs>()
                           .select(paged_call<PagedDecodeArgs>(cache, q, q, q, q, plan), "", target)
                           .status());
  return registry_.of<PagedPrefillArgs>()
      .select(paged_call<PagedPrefillArgs>(cache, q, q, q, q, plan), "", target)
      .status();
}

grpc::ServerUnaryReactor* AttnService::CreateKvCache(CallContext& call,
                                                     const v1::CreateKvCacheRequest* req,
                                                     v1::CreateKvCacheResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto created = [&]() -> Result<std::shared_ptr<KvCache>> {
    if (!config_.kv_caches)
      return failed_precondition("CreateKvCache: this server keeps no KV caches");
    const v1::KvCacheConfig& c = req->config();
    KvCacheConfig cfg;
    cfg.layers = c.layers();
    cfg.heads_kv = c.kv_heads();
    cfg.head_dim = c.head_dim();
    cfg.page_size = c.page_size() == 0 ? 16 : c.page_size();
    ATTN_ASSIGN_OR_RETURN(dtype, wire::dtype_from_proto(c.dtype(), "config.dtype"));
    cfg.dtype = dtype;
    ATTN_RETURN_IF_ERROR(check_kv_config(cfg, c.capacity_tokens(), config_.limits.max_elements));
    cfg.pages = (c.capacity_tokens() + cfg.page_size - 1) / cfg.page_size;
    ATTN_ASSIGN_OR_RETURN(executor, place(req->device()));
    const auto& executors = scheduler_.executors();
    Status servable = kv_servable(cfg, executors[executor]->target());
    if (!servable.ok() && req->device().empty()) {
      // No kernel of the serving device takes this configuration: the CPU, which takes any, holds
      // it.
      for (std::size_t i = 0; i < executors.size(); ++i)
        if (executors[i]->target().backend == Backend::kCpu) {
          spdlog::warn(
              "kv cache: {} cannot serve {} layers x {} heads x D {} {} pages of {} ({}); placing "
              "it on the CPU",
              executors[executor]->device().label(), cfg.layers, cfg.heads_kv, cfg.head_dim,
              dtype_name(cfg.dtype), cfg.page_size, servable.message());
          executor = i;
          servable = Status::Ok();
          break;
        }
    }
    if (!servable.ok())
      return invalid_argument("config: " + executors[executor]->device().label() +
                              " cannot serve it: " + servable.message());
    return config_.kv_caches->create(cfg, req->ttl_ms(), executor);
  }();
  if (created.ok()) {
    describe(**created, false, resp->mutable_cache());
    spdlog::info("kv cache {} created on {}: {} bytes", (*created)->handle(),
                 (*created)->owner().device().label(), (*created)->bytes());
  }
  finish(call, reactor, "", created.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::DescribeKvCache(CallContext& call,
                                                       const v1::DescribeKvCacheRequest* req,
                                                       v1::DescribeKvCacheResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto c = find_cache(req->handle(), "handle");
  if (c.ok()) describe(**c, true, resp->mutable_cache());
  finish(call, reactor, "", c.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::ListKvCaches(CallContext& call,
                                                    const v1::ListKvCachesRequest*,
                                                    v1::ListKvCachesResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  if (config_.kv_caches)
    for (const auto& l : config_.kv_caches->list()) {
      v1::KvCacheInfo* info = resp->add_caches();
      describe(*l.cache, false, info);
      info->set_expires_unix_ms(unix_ms(l.expires));
    }
  if (config_.store) {
    resp->set_used_bytes(static_cast<std::int64_t>(config_.store->used_bytes()));
    resp->set_quota_bytes(static_cast<std::int64_t>(config_.store->quota_bytes()));
  }
  finish(call, reactor, "", Status::Ok(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::DeleteKvCache(CallContext& call,
                                                     const v1::DeleteKvCacheRequest* req,
                                                     v1::DeleteKvCacheResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  Result<std::size_t> freed =
      config_.kv_caches ? config_.kv_caches->erase(req->handle())
                        : Result<std::size_t>(
                              failed_precondition("DeleteKvCache: this server keeps no KV caches"));
  if (freed.ok()) resp->set_freed_bytes(static_cast<std::int64_t>(*freed));
  finish(call, reactor, "", freed.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::ReleaseSequences(CallContext& call,
                                                        const v1::ReleaseSequencesRequest* req,
                                                        v1::ReleaseSequencesResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto c = find_cache(req->cache(), "cache");
  Status valid = c.status();
  if (valid.ok()) valid = check_ids(req->sequence_ids());
  if (!valid.ok()) {
    finish(call, reactor, "", valid, nullptr, 0);
    return reactor;
  }
  std::shared_ptr<KvCache> cache = std::move(c).value();
  submit(call, reactor, "", placement_of(*cache), [=, this, &call](Executor&, std::int64_t) {
    auto freed = cache->release({req->sequence_ids().begin(), req->sequence_ids().end()});
    if (freed.ok()) resp->set_freed_pages(*freed);
    finish(call, reactor, "", freed.status(), nullptr, 0);
  });
  return reactor;
}

grpc::ServerUnaryReactor* AttnService::ForkSequence(CallContext& call,
                                                    const v1::ForkSequenceRequest* req,
                                                    v1::ForkSequenceResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  auto c = find_cache(req->cache(), "cache");
  if (!c.ok()) {
    finish(call, reactor, "", c.status(), nullptr, 0);
    return reactor;
  }
  std::shared_ptr<KvCache> cache = std::move(c).value();
  submit(call, reactor, "", placement_of(*cache), [=, this, &call](Executor&, std::int64_t) {
    KvSequenceSummary s;
    auto copied = cache->fork(req->source_id(), req->new_id(), &s);
    if (copied.ok()) {
      fill_sequence(s, resp->mutable_sequence());
      resp->set_copied_pages(*copied);
    }
    device_faulted(cache->owner(), call.op(),
                   copied.status());  // the copies ran on the cache's executor
    finish(call, reactor, "", copied.status(), nullptr, 0);
  });
  return reactor;
}

// A merged decode plans each member's sequences as its call alone would (the same bits as
// unbatched): it is told where each member's sequences start. Prefill's plan needs no such help.
namespace {
void mark_members(PagedDecodeArgs& merged, const std::vector<std::int32_t>& members_at) {
  merged.merged_calls_host = members_at.data();
  merged.merged_calls = static_cast<std::int64_t>(members_at.size()) - 1;
}
void mark_members(PagedPrefillArgs&, const std::vector<std::int32_t>&) {}
}  // namespace

// One Decode or Prefill call, from its checks to its response; a BatchMember, so that calls on
// the same cache and layer waiting together share one launch.
template <class Args, class Response>
class KvCall final : public BatchMember {
 public:
  AttnService* service = nullptr;
  const CallContext* call = nullptr;  // the gate's, alive until the call finishes
  grpc::ServerUnaryReactor* reactor = nullptr;
  Response* resp = nullptr;
  bool return_values = false, create_missing = false;
  std::shared_ptr<KvCache> cache;
  int layer = 0;
  std::vector<std::string> ids;
  std::vector<std::int64_t> fresh;
  RequestTensors tensors;  // what keeps q and the new K/V's views valid
  Args args;
  const Variant<Args>* variant = nullptr;
  std::string key;
  PagedPlan placeholder;  // the arrays' shapes while the variant is chosen

  const char* op() const { return OpDesc<Args>::kName; }
  // Finishes the call with an error (a refusal, a drop from the queue).
  void fail(const Status& s) {
    service->finish(*call, reactor, variant ? variant->info.name : "", s, nullptr, 0);
  }
  const std::string& batch_key() const override { return key; }

  bool joins(const std::vector<const BatchMember*>& batch) const override {
    for (const BatchMember* m : batch)
      for (const std::string& id : static_cast<const KvCall*>(m)->ids)
        if (std::find(ids.begin(), ids.end(), id) != ids.end())
          return false;  // must see the other's append
    return true;
  }

  // Alone: plan, run, commit.
  void run_alone(Executor& executor, std::int64_t queue_ns) {
    auto pending = plan();
    if (!pending.ok()) return fail(pending.status());
    run_planned(executor, *pending, queue_ns);
  }

  // Runs this call alone on its plan, then commits it (or gives its pages back).
  void run_planned(Executor& executor, KvCache::PendingAppend& pending, std::int64_t queue_ns) {
    bind(pending, args);
    ExecTimings t;
    const Status status = executor.execute(make_call(*variant, args), t);
    if (!status.ok()) {
      cache->abort(pending);
      return failed_to_run(executor, status);
    }
    cache->commit(pending);
    succeed(executor, pending, t, queue_ns, 1);
  }

  // Together: each member planned (one that cannot be, fails alone), their rows packed into one
  // call, run once, the rows handed back.
  void run_together(Executor& executor, const std::vector<Merged>& members) override {
    std::vector<KvCall*> live;
    std::vector<std::int64_t> waits;
    std::vector<KvCache::PendingAppend> plans;
    for (const Merged& m : members) {
      auto* member = static_cast<KvCall*>(m.member);
      auto p = member->plan();
      if (!p.ok()) {
        member->fail(p.status());
        continue;
      }
      live.push_back(member);
      waits.push_back(m.queue_ns);
      plans.push_back(std::move(p).value());
    }
    if (live.empty()) return;
    if (live.size() == 1) {  // the others failed: run it as it would have run alone
      return live.front()->run_planned(executor, plans.front(), waits.front());
    }
    // The union: rows of every member in order, one plan over all their sequences.
    const KvCall& first = *live.front();
    std::int64_t rows = 0;
    for (KvCall* c : live) rows += c->args.q.dim(0);
    const std::int64_t hq = first.args.q.dim(1), hkv = first.args.k_new.dim(1),
                       d = first.args.q.dim(2);
    const DType dt = first.args.q.dtype;
    Tensor q(dt, {rows, hq, d}), k(dt, {rows, hkv, d}), v(dt, {rows, hkv, d}), o(dt, {rows, hq, d});
    Tensor lse = first.args.lse.empty() ? Tensor() : Tensor(DType::kFloat32, {rows, hq});
    PagedPlan merged{{0}, {}, {}, {0}};
    std::vector<std::int32_t> members_at{0};  // each member's first sequence
    std::size_t q_at = 0, kv_at = 0;
    // Members on other layers than the first: one view of every layer, pages renumbered into it.
    bool layers_differ = false;
    for (KvCall* c : live) layers_differ |= c->layer != first.layer;
    for (std::size_t i = 0; i < live.size(); ++i) {
      const Args& a = live[i]->args;
      std::memcpy(static_cast<char*>(q.data()) + q_at, a.q.data, a.q.bytes());
      std::memcpy(static_cast<char*>(k.data()) + kv_at, a.k_new.data, a.k_new.bytes());
      std::memcpy(static_cast<char*>(v.data()) + kv_at, a.v_new.data, a.v_new.bytes());
      q_at += a.q.bytes();
      kv_at += a.k_new.bytes();
      const PagedPlan& p = plans[i].plan;
      for (std::size_t s = 0; s + 1 < p.page_indptr.size(); ++s) {
        merged.page_indptr.push_back(merged.page_indptr.back() + p.page_indptr[s + 1] -
                                     p.page_indptr[s]);
        merged.q_indptr.push_back(merged.q_indptr.back() + p.q_indptr[s + 1] - p.q_indptr[s]);
      }
      const std::int32_t offset = layers_differ ? cache->layer_page_offset(live[i]->layer) : 0;
      for (std::int32_t page : p.page_indices) merged.page_indices.push_back(page + offset);
      merged.seq_lens.insert(merged.seq_lens.end(), p.seq_lens.begin(), p.seq_lens.end());
      members_at.push_back(static_cast<std::int32_t>(merged.seq_lens.size()));
    }
    Args all = first.args;
    if (layers_differ) all.cache = cache->all_layers();
    all.q = q.view();
    all.k_new = k.view();
    all.v_new = v.view();
    all.o = o.view();
    all.lse = lse.numel() > 0 && !first.args.lse.empty() ? lse.view() : TensorView{};
    bind_plan(merged, all);
    mark_members(all, members_at);
    ExecTimings t;
    const Status status = executor.execute(make_call(*variant, all), t);
    if (!status.ok()) {
      for (std::size_t i = live.size(); i-- > 0;) live[i]->cache->abort(plans[i]);
      for (KvCall* c : live) c->failed_to_run(executor, status);
      return;
    }
    if (service->config_.metrics) service->config_.metrics->record_batch(op(), live.size());
    std::size_t o_at = 0, lse_at = 0;
    for (std::size_t i = 0; i < live.size(); ++i) {
      KvCall& c = *live[i];
      c.cache->commit(plans[i]);
      std::memcpy(c.args.o.data, static_cast<const char*>(o.data()) + o_at, c.args.o.bytes());
      o_at += c.args.o.bytes();
      if (!c.args.lse.empty()) {
        std::memcpy(c.args.lse.data, static_cast<const char*>(lse.data()) + lse_at,
                    c.args.lse.bytes());
        lse_at += c.args.lse.bytes();
      }
      c.bind(plans[i], c.args);  // for its own cost
      c.succeed(executor, plans[i], t, waits[i], static_cast<int>(live.size()));
    }
  }

 private:
  Result<KvCache::PendingAppend> plan() {
    return cache->plan_append(layer, ids, fresh, create_missing);
  }

  void bind(const KvCache::PendingAppend& p, Args& a) const { bind_plan(p.plan, a); }

  void failed_to_run(Executor& executor, const Status& s) {
    service->device_faulted(executor, variant->info.name, s);
    fail(s);
  }

  void succeed(Executor& executor, const KvCache::PendingAppend& p, const ExecTimings& t,
               std::int64_t queue_ns, int batched) {
    for (auto len : p.new_lengths) resp->add_lengths(len);
    if (return_values) {
      wire::convert_to_values(resp->mutable_o());
      if (resp->has_lse()) wire::convert_to_values(resp->mutable_lse());
    }
    v1::Timings* timings = resp->mutable_timings();
    fill_timings(timings, variant->info.name, executor, queue_ns, t, cost_of(args), batched,
                 call->start);
    service->finish(*call, reactor, variant->info.name, Status::Ok(), timings,
                    resp->ByteSizeLong());
  }
};

// Decode and Prefill: checked on this thread, then queued on the cache's state. `fresh` is
// each sequence's new-token count.
template <class Args, class Request, class Response>
grpc::ServerUnaryReactor* AttnService::serve_kv(CallContext& call, const Request* req,
                                                Response* resp, std::vector<std::int64_t> fresh,
                                                bool create_missing) {
  const char* op = call.op();
  auto kv = std::make_shared<KvCall<Args, Response>>();
  kv->service = this;
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
    ATTN_ASSIGN_OR_RETURN(r, parse_kv_request(*req, resp, *cache, kv->fresh, requests_, call));
    if (config_.metrics && !r.shm_buffers.empty())
      config_.metrics->record_shared_memory(op, r.shm_bytes_in(), 0);
    kv->tensors = std::move(static_cast<RequestTensors&>(r));
    kv->args = r.args;
    kv->placeholder = std::move(r.placeholder);  // its arrays keep their storage: args stay valid
    kv->variant = r.variant;
    // Calls merge when one launch can serve them all: the same cache, variant, query heads,
    // scale, mask and outputs; any layers (one view of all of them), where its page numbers fit.
    // Inputs in host memory only: the merged call gathers them with memcpy.
    const Args& a = kv->args;
    if (a.q.memory != MemoryKind::kHost || a.k_new.memory != MemoryKind::kHost ||
        a.v_new.memory != MemoryKind::kHost)
      return Status::Ok();
    char key[256];
    std::snprintf(key, sizeof key, "%s %p %d %s %lld %a %d %d", op,
                  static_cast<const void*>(cache.get()),
                  cache->config().layers_fit_one_view() ? -1 : kv->layer,
                  r.variant->info.name.c_str(), static_cast<long long>(kv->args.q.dim(1)),
                  static_cast<double>(kv->args.scale), r.causal ? 1 : 0, req->return_lse() ? 1 : 0);
    kv->key = key;
    return Status::Ok();
  }();
  if (!prepared.ok()) {
    finish(call, kv->reactor, "", prepared, nullptr, 0);
    return kv->reactor;
  }
  const VariantInfo* variant = &kv->variant->info;
  Placement placement = placement_of(*kv->cache);
  placement.inline_when_idle = variant->backend == Backend::kCpu && tiny(cost_of(kv->args));
  Scheduler::Job job;
  job.abandoned = [&call] { return call_abandoned(call); };
  job.drop = [kv](const Status& why) { kv->fail(why); };
  job.run = [kv](Executor& executor, std::int64_t queue_ns) { kv->run_alone(executor, queue_ns); };
  job.batch = kv;
  const Status queued = scheduler_.submit(placement, std::move(job));
  if (!queued.ok()) kv->fail(queued);
  return kv->reactor;
}

grpc::ServerUnaryReactor* AttnService::Decode(CallContext& call, const v1::DecodeRequest* req,
                                              v1::DecodeResponse* resp) {
  return serve_kv<PagedDecodeArgs>(
      call, req, resp,
      std::vector<std::int64_t>(static_cast<std::size_t>(req->sequence_ids_size()), 1), false);
}

grpc::ServerUnaryReactor* AttnService::Prefill(CallContext& call, const v1::PrefillRequest* req,
                                               v1::PrefillResponse* resp) {
  auto fresh = prefill_lens(*req);
  if (!fresh.ok()) {
    auto* reactor = call.grpc->DefaultReactor();
    finish(call, reactor, "", fresh.status(), nullptr, 0);
    return reactor;
  }
  return serve_kv<PagedPrefillArgs>(call, req, resp, std::move(fresh).value(), true);
}

// The header, then K's bytes and V's, from a copy gathered on the cache's worker (in order with
// the cache's other calls).
class ReadKvReactor final : public grpc::ServerWriteReactor<v1::ReadKvResponse> {
 public:
  ReadKvReactor(AttnService& service, const CallContext& call, std::shared_ptr<KvCache> cache,
                const v1::ReadKvRequest& req, std::size_t chunk_bytes)
      : service_(service), cache_(std::move(cache)), chunk_bytes_(chunk_bytes) {
    Scheduler::Job job;
    job.abandoned = [&call] {
      return call.grpc->IsCancelled()
                 ? cancelled("the caller cancelled the call while it waited in the queue")
                 : Status::Ok();
    };
    job.drop = [this](const Status& why) { Finish(wire::to_grpc(why)); };
    job.run = [this, id = req.sequence_id(), layer = req.layer()](Executor&, std::int64_t) {
      Shape shape;
      const Status s = cache_->read(id, layer, &shape, &k_, &v_);
      if (!s.ok()) {
        service_.device_faulted(cache_->owner(), "read_kv", s);
        return Finish(wire::to_grpc(s));
      }
      v1::ReadKvHeader* h = msg_.mutable_header();
      h->set_dtype(wire::to_proto(cache_->config().dtype));
      h->mutable_shape()->Assign(shape.begin(), shape.end());
      StartWrite(&msg_);
    };
    const Status queued = service.scheduler_.submit(service.placement_of(*cache_), std::move(job));
    if (!queued.ok()) Finish(wire::to_grpc(queued));
  }
  void OnWriteDone(bool ok) override {
    if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
    const std::size_t total = k_.size() + v_.size();
    if (sent_ == total) return Finish(grpc::Status::OK);
    // A chunk never straddles K and V.
    const bool in_k = sent_ < k_.size();
    const std::vector<unsigned char>& src = in_k ? k_ : v_;
    const std::size_t at = in_k ? sent_ : sent_ - k_.size();
    const std::size_t n = std::min(chunk_bytes_, src.size() - at);
    msg_.set_chunk(src.data() + at, n);
    sent_ += n;
    StartWrite(&msg_);
  }
  void OnDone() override { delete this; }

 private:
  AttnService& service_;
  std::shared_ptr<KvCache> cache_;
  std::size_t chunk_bytes_;
  std::vector<unsigned char> k_, v_;
  std::size_t sent_ = 0;
  v1::ReadKvResponse msg_;
};

grpc::ServerWriteReactor<v1::ReadKvResponse>* AttnService::ReadKv(CallContext& call,
                                                                  const v1::ReadKvRequest* req) {
  using Base = grpc::ServerWriteReactor<v1::ReadKvResponse>;
  if (req->chunk_bytes() < 0 || req->chunk_bytes() > config_.max_message_bytes / 2) {
    return new Refused<Base>(invalid_argument("chunk_bytes: expected 0 (1 MiB) to " +
                                              str(config_.max_message_bytes / 2) + ", got " +
                                              str(req->chunk_bytes())));
  }
  auto c = find_cache(req->cache(), "cache");
  if (!c.ok()) return new Refused<Base>(c.status());
  if (Status s = check_layer(**c, req->layer()); !s.ok()) return new Refused<Base>(s);
  const std::size_t chunk =
      req->chunk_bytes() == 0 ? std::size_t{1} << 20 : static_cast<std::size_t>(req->chunk_bytes());
  return new ReadKvReactor(*this, call, std::move(c).value(), *req, chunk);
}

}  // namespace attn::server
