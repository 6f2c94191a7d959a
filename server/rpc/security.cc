#include "rpc/security.h"

#include <grpcpp/security/server_credentials.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

namespace attn::server {
namespace {

Result<std::string> read_file(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return invalid_argument(std::string(flag) + ": cannot read \"" + path + "\"");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::array<unsigned char, 32> sha256(const std::string& s) {
  std::array<unsigned char, 32> d{};
  SHA256(reinterpret_cast<const unsigned char*>(s.data()), s.size(), d.data());
  return d;
}

std::string trim(std::string s) {
  const auto not_space = [](unsigned char c) { return !std::isspace(c); };
  s.erase(s.begin(), std::find_if(s.begin(), s.end(), not_space));
  s.erase(std::find_if(s.rbegin(), s.rend(), not_space).base(), s.end());
  return s;
}

}  // namespace

Result<std::shared_ptr<grpc::ServerCredentials>> make_server_credentials(const SecurityOptions& o) {
  const bool any_tls =
      !o.tls_cert_file.empty() || !o.tls_key_file.empty() || !o.tls_client_ca_file.empty();
  if (!any_tls) return grpc::InsecureServerCredentials();
  if (o.tls_cert_file.empty() || o.tls_key_file.empty()) {
    return invalid_argument(
        "--tls-cert and --tls-key: expected both (TLS needs a certificate and its "
        "key), got only " +
        std::string(o.tls_cert_file.empty() ? "--tls-key" : "--tls-cert") +
        (o.tls_client_ca_file.empty() ? "" : " and --tls-client-ca"));
  }
  ATTN_ASSIGN_OR_RETURN(cert, read_file(o.tls_cert_file, "--tls-cert"));
  ATTN_ASSIGN_OR_RETURN(key, read_file(o.tls_key_file, "--tls-key"));
  grpc::SslServerCredentialsOptions ssl;
  ssl.pem_key_cert_pairs.push_back({key, cert});
  if (!o.tls_client_ca_file.empty()) {
    ATTN_ASSIGN_OR_RETURN(ca, read_file(o.tls_client_ca_file, "--tls-client-ca"));
    ssl.pem_root_certs = ca;
    ssl.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(ssl);
}

Result<std::string> load_token(const std::string& token_file) {
  std::string token;
  if (!token_file.empty()) {
    ATTN_ASSIGN_OR_RETURN(text, read_file(token_file, "--token-file"));
    token = trim(text);
    if (token.empty())
      return invalid_argument("--token-file: \"" + token_file + "\" holds no token");
  } else if (const char* env = std::getenv("ATTND_TOKEN"); env && *env) {
    token = trim(env);
  }
  return token;
}

bool is_loopback_address(const std::string& listen) {
  std::string host = listen.substr(0, listen.rfind(':'));
  if (host.size() >= 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  return host == "localhost" || host == "::1" || host.rfind("127.", 0) == 0;
}

TokenCheck::TokenCheck(const std::string& token) : enabled_(!token.empty()) {
  std::size_t at = 0;
  while (enabled_ && at <= token.size()) {
    std::size_t end = token.find('\n', at);
    if (end == std::string::npos) end = token.size();
    const std::string line = trim(token.substr(at, end - at));
    if (!line.empty()) expected_digests_.push_back(sha256(line));
    at = end + 1;
  }
}

std::string TokenCheck::owner(const grpc::ServerContextBase& ctx) const {
  if (!enabled_) return "";
  const auto& md = ctx.client_metadata();
  const auto it = md.find("authorization");
  if (it == md.end()) return "";
  const auto digest = sha256(std::string(it->second.data(), it->second.size()));
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (std::size_t i = 0; i < 12; ++i) {
    out += kHex[digest[i] >> 4];
    out += kHex[digest[i] & 15];
  }
  return out;
}

Status TokenCheck::check(const grpc::ServerContextBase& ctx) const {
  if (!enabled_) return Status::Ok();
  const auto& md = ctx.client_metadata();
  const auto it = md.find("authorization");
  if (it == md.end()) {
    return unauthenticated(
        "authorization: expected metadata \"authorization: Bearer <token>\", got none");
  }
  const std::string value(it->second.data(), it->second.size());
  constexpr std::string_view kScheme = "Bearer ";
  if (value.rfind(kScheme, 0) != 0) {
    return unauthenticated("authorization: expected the \"Bearer\" scheme, got another");
  }
  const auto presented = sha256(value.substr(kScheme.size()));
  int matched = 0;
  for (const auto& expected : expected_digests_)
    matched |= CRYPTO_memcmp(presented.data(), expected.data(), presented.size()) == 0;
  if (!matched) {
    return unauthenticated("authorization: the bearer token is not this server's");
  }
  return Status::Ok();
}

}  // namespace attn::server
