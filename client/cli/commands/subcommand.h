// What a subcommand of `attn` is: a CLI11 node with its flags, and what runs it once the command
// line is parsed. main() registers them from a table and runs the one that was chosen.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <string>

#include "attn/client.h"

namespace attn::cli {

// The flags before the subcommand, which every subcommand may read.
struct GlobalFlags {
  std::string server = "127.0.0.1:50051";
  std::int64_t timeout_ms = 0;
  bool json = false;
  std::string token_file;
};

// What a subcommand runs with: the top-level flags, and the client made from them.
struct Session {
  const GlobalFlags& flags;
  const ClientOptions& options;  // what `client` was made with (bench-rpc makes its own)
  Client& client;
};

struct Subcommand {
  CLI::App* cmd = nullptr;                 // parsed() once chosen on the command line
  std::function<int(const Session&)> run;  // returns the exit code
};

// Adds a subcommand, and the flags it binds, to `parent`.
using AddSubcommand = Subcommand (*)(CLI::App& parent);

}  // namespace attn::cli
