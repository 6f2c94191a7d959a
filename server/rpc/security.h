// Who gets in: TLS (optionally mutual) for the transport, and an optional bearer token checked on
// every AttnService call. Health and reflection stay reachable without a token, for probes.
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>

#include <array>
#include <memory>
#include <string>
#include <vector>

#include "attn/status.h"

namespace attn::server {

struct SecurityOptions {
  std::string tls_cert_file;  // PEM server certificate chain; empty: plaintext
  std::string tls_key_file;   // PEM private key of that certificate
  std::string
      tls_client_ca_file;  // PEM CA bundle; set: clients must present a certificate it signed
  std::string token;       // bearer token every AttnService call must carry; empty: none
};

// Plaintext, TLS, or mutual TLS credentials, or why the files cannot be used.
Result<std::shared_ptr<grpc::ServerCredentials>> make_server_credentials(
    const SecurityOptions& options);

// The token from `token_file` when given, else from the ATTND_TOKEN environment variable, else
// empty (no token check). Never from the command line, where other users could read it.
Result<std::string> load_token(const std::string& token_file);

// True for 127.0.0.0/8, ::1 and localhost listen addresses.
bool is_loopback_address(const std::string& listen);

// Checks "authorization: Bearer <token>" metadata in time that does not depend on where the
// presented token first differs (both sides are hashed, then compared with CRYPTO_memcmp).
class TokenCheck {
 public:
  explicit TokenCheck(const std::string& token);
  bool enabled() const { return enabled_; }
  Status check(const grpc::ServerContextBase& ctx) const;
  // Who a checked call is, for state that belongs to a caller (shared-memory regions): a digest
  // of its token; empty when the server has no token.
  std::string owner(const grpc::ServerContextBase& ctx) const;

 private:
  bool enabled_ = false;
  // One digest per accepted token: the token (file or ATTND_TOKEN) may hold several, one a line,
  // each a caller of its own.
  std::vector<std::array<unsigned char, 32>> expected_digests_;
};

}  // namespace attn::server
