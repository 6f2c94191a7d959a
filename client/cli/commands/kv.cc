// `attn kv create|describe|list|delete`: KV caches by hand (JSON with --json).
#include <cstdio>
#include <iostream>
#include <memory>
#include <vector>

#include "attn/wire.h"
#include "commands.h"
#include "output.h"

namespace attn::cli {
namespace {

// Flags of every kv subcommand; `handle` and `replica` are shared by those that take them.
struct KvFlags {
  std::string dtype = "bfloat16", device, handle, replica;
  std::int64_t ttl_ms = 0;
  int layers = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  std::int64_t capacity = 0;
};

// One line for the cache, then one per sequence.
void print_cache(const v1::KvCacheInfo& x) {
  std::printf(
      "%s on %s (%s): %d layers, Hkv %d, D %d, %s, page %d; pages %lld used / %lld total, "
      "%.1f MiB, %lld sequences\n",
      x.handle().c_str(), x.replica().c_str(), x.device().c_str(), x.config().layers(),
      x.config().kv_heads(), x.config().head_dim(), v1::DType_Name(x.config().dtype()).c_str(),
      x.config().page_size(), static_cast<long long>(x.pages_used()),
      static_cast<long long>(x.pages_total()), x.bytes() / 1048576.0,
      static_cast<long long>(x.sequence_count()));
  for (const auto& q : x.sequences()) {
    std::string lengths;
    for (auto n : q.lengths()) {
      if (!lengths.empty()) lengths += ',';
      lengths += std::to_string(n);
    }
    std::printf("  %s: lengths %s, %lld pages (%lld shared)\n", q.id().c_str(), lengths.c_str(),
                static_cast<long long>(q.pages()), static_cast<long long>(q.shared_pages()));
  }
}

int run_create(const KvFlags& f, const Session& session) {
  auto dt = parse_dtype(f.dtype);
  if (!dt) return fail(invalid_argument("--dtype: expected float32, float16 or bfloat16"));
  v1::KvCacheConfig config;
  config.set_layers(f.layers);
  config.set_kv_heads(f.kv_heads);
  config.set_head_dim(f.head_dim);
  config.set_dtype(wire::to_proto(*dt));
  config.set_page_size(f.page_size);
  config.set_capacity_tokens(f.capacity);
  auto r = session.client.create_kv_cache(config, f.ttl_ms, f.device);
  if (!r.ok()) return call_failed(r.status());
  if (session.flags.json) return print_json(*r);
  print_cache(*r);
  return 0;
}

int run_describe(const KvFlags& f, const Session& session) {
  auto r = session.client.describe_kv_cache(f.handle);
  if (!r.ok()) return call_failed(r.status());
  if (session.flags.json) return print_json(*r);
  print_cache(*r);
  return 0;
}

int run_list(const KvFlags& f, const Session& session) {
  auto r = session.client.list_kv_caches(f.replica);
  if (!r.ok()) return call_failed(r.status());
  if (session.flags.json) return print_json(*r);
  for (const auto& x : r->caches()) print_cache(x);
  std::printf("%d caches; %.1f MiB used of a %.1f MiB quota (tensors and caches)\n",
              r->caches_size(), r->used_bytes() / 1048576.0, r->quota_bytes() / 1048576.0);
  return 0;
}

int run_delete(const KvFlags& f, const Session& session) {
  auto r = session.client.delete_kv_cache(f.handle);
  if (!r.ok()) return call_failed(r.status());
  if (session.flags.json)
    return std::printf("{\"freed_bytes\": %lld}\n", static_cast<long long>(*r)), 0;
  std::printf("freed %lld bytes\n", static_cast<long long>(*r));
  return 0;
}

void add_replica_flag(CLI::App* cmd, KvFlags& f) {
  cmd->add_option("--replica", f.replica,
                  "the server holding the cache (its KvCacheInfo.replica); "
                  "default: --server");
}

CLI::App* add_create(CLI::App* kv, KvFlags& f) {
  auto* cmd = kv->add_subcommand("create", "make a cache; prints its handle and replica");
  cmd->add_option("--layers", f.layers, "model layers")->required();
  cmd->add_option("--kv-heads", f.kv_heads, "key/value heads")->required();
  cmd->add_option("--head-dim", f.head_dim, "head dimension")->required();
  cmd->add_option("--capacity", f.capacity, "tokens over all sequences")->required();
  cmd->add_option("--dtype", f.dtype, "float32, float16 or bfloat16")->capture_default_str();
  cmd->add_option("--page-size", f.page_size, "tokens per page (0: the server's default)");
  cmd->add_option("--ttl-ms", f.ttl_ms,
                  "kept this long after its last use (0: the server's default)");
  cmd->add_option("--device", f.device, "e.g. cuda:1 (default: the server picks)");
  return cmd;
}

CLI::App* add_describe(CLI::App* kv, KvFlags& f) {
  auto* cmd = kv->add_subcommand("describe", "pages, bytes and each sequence's lengths");
  cmd->add_option("handle", f.handle, "the cache's handle")->required();
  add_replica_flag(cmd, f);
  return cmd;
}

CLI::App* add_list(CLI::App* kv, KvFlags& f) {
  auto* cmd = kv->add_subcommand("list", "the caches of one server");
  add_replica_flag(cmd, f);
  return cmd;
}

CLI::App* add_delete(CLI::App* kv, KvFlags& f) {
  auto* cmd = kv->add_subcommand("delete", "drop a cache");
  cmd->add_option("handle", f.handle, "the cache's handle")->required();
  add_replica_flag(cmd, f);
  return cmd;
}

}  // namespace

Subcommand add_kv(CLI::App& app) {
  auto f = std::make_shared<KvFlags>();
  auto* kv = app.add_subcommand("kv", "KV caches: create, describe, list, delete");
  kv->require_subcommand(1);
  // In the order `attn kv --help` lists them.
  struct Action {
    CLI::App* cmd;
    int (*run)(const KvFlags&, const Session&);
  };
  const std::vector<Action> actions = {{add_create(kv, *f), run_create},
                                       {add_describe(kv, *f), run_describe},
                                       {add_list(kv, *f), run_list},
                                       {add_delete(kv, *f), run_delete}};
  return {kv, [f, actions](const Session& session) {
            // A cache on another replica than --server: its calls go there.
            if (!f->handle.empty() && !f->replica.empty())
              session.client.set_kv_cache_replica(f->handle, f->replica);
            for (const Action& a : actions)
              if (a.cmd->parsed()) return a.run(*f, session);
            return 0;
          }};
}

}  // namespace attn::cli
