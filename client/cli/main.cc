// attn: a command-line client for attnd. Inputs from .npy files or --random, outputs to .npy,
// the server's timings as a short table or JSON. The subcommands are in commands/; this file
// builds the app, registers them and runs the one chosen.
#include <CLI/CLI.hpp>
#include <chrono>
#include <vector>

#include "attn/client.h"
#include "commands/commands.h"
#include "commands/output.h"

namespace {

using attn::cli::GlobalFlags;

// In the order `attn --help` lists them.
constexpr attn::cli::AddSubcommand kSubcommands[] = {
    attn::cli::add_info,      attn::cli::add_health,       attn::cli::add_kernels,
    attn::cli::add_matmul,    attn::cli::add_softmax,      attn::cli::add_attention,
    attn::cli::add_bench_rpc, attn::cli::add_decode_bench, attn::cli::add_kv,
    attn::cli::add_benchmark,
};

// The flags before the subcommand: where the server is, how to reach it, how to print.
void add_global_flags(CLI::App& app, GlobalFlags& g, attn::ClientOptions& options) {
  app.add_option("-s,--server", g.server, "server address")
      ->capture_default_str()
      ->envname("ATTN_SERVER");
  app.add_option("--timeout-ms", g.timeout_ms, "deadline per call (0: none)");
  app.add_flag("--json", g.json, "print JSON instead of a table");
  app.add_flag("--tls", options.tls, "connect with TLS (implied by the other --tls-* flags)");
  app.add_option("--tls-ca", options.tls_ca_file,
                 "PEM CA bundle that signed the server's certificate");
  app.add_option("--tls-cert", options.tls_cert_file, "PEM client certificate, for mutual TLS");
  app.add_option("--tls-key", options.tls_key_file, "PEM key of --tls-cert");
  app.add_option("--tls-server-name", options.tls_server_name,
                 "check the server's certificate against this name instead of the address's");
  app.add_option("--token-file", g.token_file,
                 "file holding the server's bearer token (else $ATTN_TOKEN)");
  app.add_option("--load-balancing", options.load_balancing,
                 "gRPC policy over the addresses of --server, e.g. round_robin");
}

// What the parsed flags imply for the client: the deadline, TLS when any --tls-* flag asks for
// it, the bearer token.
attn::Status complete_client_options(const GlobalFlags& g, attn::ClientOptions& options) {
  options.timeout = std::chrono::milliseconds(g.timeout_ms);
  options.tls |= !options.tls_ca_file.empty() || !options.tls_cert_file.empty() ||
                 !options.tls_server_name.empty();
  auto token = attn::load_client_token(g.token_file);
  if (!token.ok()) return token.status();
  options.token = *token;
  return attn::Status::Ok();
}

}  // namespace

int main(int argc, char** argv) {
  GlobalFlags g;
  attn::ClientOptions options;
  CLI::App app{"attn: call an attnd server"};
  add_global_flags(app, g, options);
  app.require_subcommand(1);
  std::vector<attn::cli::Subcommand> subcommands;
  for (auto add : kSubcommands) subcommands.push_back(add(app));

  CLI11_PARSE(app, argc, argv);
  if (attn::Status s = complete_client_options(g, options); !s.ok()) return attn::cli::fail(s);
  attn::Client client(g.server, options);
  const attn::cli::Session session{g, options, client};
  for (const auto& sub : subcommands)
    if (sub.cmd->parsed()) return sub.run(session);
  return 0;
}
