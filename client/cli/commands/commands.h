// Every subcommand's registration, grouped by the file that holds it.
#pragma once

#include "subcommand.h"

namespace attn::cli {

// info.cc: what the server is and has.
Subcommand add_info(CLI::App& app);
Subcommand add_health(CLI::App& app);
Subcommand add_kernels(CLI::App& app);

// ops.cc: one op call, inputs from .npy or --random.
Subcommand add_matmul(CLI::App& app);
Subcommand add_softmax(CLI::App& app);
Subcommand add_attention(CLI::App& app);

// benches.cc: the load generators (the work is in ../bench_rpc.cc and ../decode_bench.cc).
Subcommand add_bench_rpc(CLI::App& app);
Subcommand add_decode_bench(CLI::App& app);

// kv.cc: KV caches by hand.
Subcommand add_kv(CLI::App& app);

// benchmark.cc: the server's own timing of its variants.
Subcommand add_benchmark(CLI::App& app);

}  // namespace attn::cli
