// An op call's outcome: the output (and log-sum-exp) to their .npy files, the server's timings
// as a short table or, with --json, one JSON line.
#pragma once

#include "attn/client.h"
#include "op_inputs.h"
#include "subcommand.h"

namespace attn::cli {

// `lse_path`: where the log-sum-exp goes (null or empty: nowhere). Returns the exit code.
int report_op(const GlobalFlags& g, const Result<OpResult>& r, const OpFlags& f,
              const char* lse_path);

}  // namespace attn::cli
