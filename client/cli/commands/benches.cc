// `attn bench-rpc` and `attn decode-bench`: the load generators' flags. What they do is in
// ../bench_rpc.cc and ../decode_bench.cc.
#include <memory>

#include "../bench_rpc.h"
#include "../decode_bench.h"
#include "commands.h"

namespace attn::cli {

Subcommand add_bench_rpc(CLI::App& app) {
  auto o = std::make_shared<BenchRpcOptions>();
  auto* cmd = app.add_subcommand("bench-rpc",
                                 "load generator: concurrent clients, latency percentiles, "
                                 "the server's breakdown, and a gRPC echo baseline");
  cmd->add_option("--clients", o->clients, "concurrent clients")->capture_default_str();
  cmd->add_option("--seconds", o->seconds, "how long to call")->capture_default_str();
  cmd->add_option("--mix", o->mix,
                  "ops and input shapes: softmax:1,1 matmul:M,K,N attention:B,H,S,D")
      ->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "float32, float16 or bfloat16")->capture_default_str();
  cmd->add_flag("--resident", o->resident, "put the inputs once and keep outputs on the device");
  cmd->add_flag(
      "--shm", o->shm,
      "inputs and outputs through a POSIX shared-memory region (the server on this host, run "
      "with --shared-memory system)");
  cmd->add_option("--cuda-ipc", o->cuda_ipc_device,
                  "inputs and outputs in device memory of this CUDA device, exported by CUDA IPC "
                  "(the server on "
                  "this GPU host, run with --shared-memory cuda)");
  cmd->add_flag("--echo-only", o->echo_only,
                "only the echo baseline: the mix's payload sizes, for --seconds");
  cmd->add_flag("--causal", o->causal, "attention entries are causal");
  cmd->add_option("--json-out", o->json_path, "also write the results as JSON here");
  // Its clients are its own, made from the same options as the session's.
  return {cmd, [o](const Session& session) {
            o->server = session.flags.server;
            return run_bench_rpc(*o, session.options);
          }};
}

Subcommand add_decode_bench(CLI::App& app) {
  auto o = std::make_shared<DecodeBenchOptions>();
  auto* cmd = app.add_subcommand(
      "decode-bench",
      "decode serving over a KV cache: prefill N sequences, then S steps of one Decode per layer "
      "(the defaults are a GPU's load: a CPU server wants --context 256 --layers 4 --q-heads 8 "
      "--kv-heads 2 --head-dim 64)");
  cmd->add_option("--seqs", o->seqs, "sequences decoded together")->capture_default_str();
  cmd->add_option("--clients", o->clients,
                  "concurrent decode streams, the sequences split among them")
      ->capture_default_str();
  cmd->add_option("--context", o->context, "prompt tokens per sequence: N, or MIN:MAX (uniform)")
      ->capture_default_str();
  cmd->add_option("--steps", o->steps, "timed decode steps")->capture_default_str();
  cmd->add_option("--warmup", o->warmup, "untimed steps first")->capture_default_str();
  cmd->add_option("--layers", o->layers, "layers: one Decode call each per step")
      ->capture_default_str();
  cmd->add_option("--q-heads", o->q_heads, "query heads")->capture_default_str();
  cmd->add_option("--kv-heads", o->kv_heads, "key/value heads")->capture_default_str();
  cmd->add_option("--head-dim", o->head_dim, "head dimension")->capture_default_str();
  cmd->add_option("--dtype", o->dtype, "float32, float16 or bfloat16")->capture_default_str();
  cmd->add_flag("--fp8", o->fp8,
                "store the cache's K/V in float8 e4m3, scales computed on append (--dtype float16 "
                "or bfloat16; the wire keeps --dtype)");
  cmd->add_option("--page-size", o->page_size, "tokens per page (8 .. 128)")->capture_default_str();
  cmd->add_option("--prefill-chunk", o->prefill_chunk, "tokens per Prefill call at most")
      ->capture_default_str();
  cmd->add_option("--kernel", o->kernel, "Decode's variant (default: the server picks)");
  cmd->add_option("--device", o->device,
                  "the cache's device, e.g. cuda:1 (default: the server picks)");
  cmd->add_option("--seed", o->seed, "seed of the lengths and values")->capture_default_str();
  cmd->add_flag("--shm", o->shm,
                "decode's q, k_new, v_new and o through a POSIX shared-memory region (the server "
                "on this host, run with --shared-memory system)");
  cmd->add_option("--cuda-ipc", o->cuda_ipc_device,
                  "decode's q, k_new, v_new and o in device memory of this CUDA device, exported "
                  "by CUDA IPC (the server on this GPU host, run with --shared-memory cuda, the "
                  "cache on that device)");
  cmd->add_flag("--keep", o->keep, "leave the cache on the server");
  cmd->add_option("--json-out", o->json_path, "also write the results as JSON here");
  return {cmd, [o](const Session& session) {
            o->json = session.flags.json;
            return run_decode_bench(*o, session.client);
          }};
}

}  // namespace attn::cli
