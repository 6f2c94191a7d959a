#include "requests/kv_fingerprint.h"

#include <algorithm>
#include <cstring>

namespace attn::server {

Fingerprinter::Fingerprinter() : ctx_(EVP_MD_CTX_new()) {
  EVP_DigestInit_ex(ctx_, EVP_sha256(), nullptr);
}

Fingerprinter::~Fingerprinter() { EVP_MD_CTX_free(ctx_); }

void Fingerprinter::raw(const void* p, std::size_t n) {
  if (n) EVP_DigestUpdate(ctx_, p, n);
}

void Fingerprinter::integer(std::int64_t v) {
  unsigned char le[8];
  for (int i = 0; i < 8; ++i)
    le[i] = static_cast<unsigned char>(static_cast<std::uint64_t>(v) >> (8 * i));
  raw(le, sizeof le);
}

void Fingerprinter::bytes(const void* p, std::size_t n) {
  integer(static_cast<std::int64_t>(n));
  raw(p, n);
}

void Fingerprinter::text(const std::string& s) { bytes(s.data(), s.size()); }

void Fingerprinter::real(float f) {
  std::uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  integer(bits);
}

Status Fingerprinter::tensor(const TensorView& v, Executor& device) {
  if (v.empty()) {
    integer(-1);
    return Status::Ok();
  }
  integer(static_cast<std::int64_t>(v.dtype));
  integer(static_cast<std::int64_t>(v.shape.size()));
  for (std::int64_t d : v.shape) integer(d);
  const std::size_t n = v.bytes();
  integer(static_cast<std::int64_t>(n));
  if (v.memory == MemoryKind::kHost) {
    raw(v.data, n);
    return Status::Ok();
  }
  // On the device (a resident tensor, a CUDA region): read to the host a chunk at a time.
  std::vector<unsigned char> buf(std::min<std::size_t>(n, std::size_t{1} << 20));
  for (std::size_t at = 0; at < n; at += buf.size()) {
    const std::size_t chunk = std::min(buf.size(), n - at);
    ATTN_RETURN_IF_ERROR(device.read(buf.data(), v.data, at, chunk));
    raw(buf.data(), chunk);
  }
  return Status::Ok();
}

Fingerprint Fingerprinter::finish() {
  Fingerprint f{};
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx_, f.data(), &len);
  return f;
}

namespace {

// What both ops share; Prefill adds its mask's other side (window_right, non-causal) through
// `mask`, which both carry.
template <class Args>
Result<Fingerprint> fingerprint(const KvCallIdentity& call, const Args& a, Executor& device) {
  Fingerprinter h;
  h.text(call.op);
  h.integer(call.layer);
  h.integer(static_cast<std::int64_t>(call.ids->size()));
  for (const std::string& id : *call.ids) h.text(id);
  for (std::int64_t f : *call.fresh) h.integer(f);
  ATTN_RETURN_IF_ERROR(h.tensor(a.q, device));
  ATTN_RETURN_IF_ERROR(h.tensor(a.k_new, device));
  ATTN_RETURN_IF_ERROR(h.tensor(a.v_new, device));
  ATTN_RETURN_IF_ERROR(h.tensor(a.sinks, device));
  h.real(a.scale);
  h.integer(a.mask.causal ? 1 : 0);
  h.integer(a.mask.window_left);
  h.integer(a.mask.window_right);
  h.real(a.softcap);
  h.text(call.variant);
  h.integer(call.return_lse ? 1 : 0);
  h.integer(call.return_values ? 1 : 0);
  return h.finish();
}

}  // namespace

Result<Fingerprint> kv_fingerprint(const KvCallIdentity& call, const PagedDecodeArgs& a,
                                   Executor& device) {
  return fingerprint(call, a, device);
}

Result<Fingerprint> kv_fingerprint(const KvCallIdentity& call, const PagedPrefillArgs& a,
                                   Executor& device) {
  return fingerprint(call, a, device);
}

}  // namespace attn::server
