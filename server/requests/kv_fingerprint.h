// The fingerprint of a Decode or Prefill call that states its expectation (exactly-once,
// state/kv_replay.h): SHA-256 over everything that determines its result, each part fed with its
// length so that two different calls never feed the same bytes: the op, layer, sequence ids and
// new tokens per sequence, q, k/v and sinks (dtype, shape, bytes; read from the device where they
// live there), the resolved scale, the mask, the soft cap, the variant chosen and the outputs
// asked for (lse, values).
#pragma once

#include <openssl/evp.h>

#include <cstdint>
#include <string>
#include <vector>

#include "attn/executor.h"
#include "attn/paged_ops.h"
#include "state/kv_replay.h"

namespace attn::server {

class Fingerprinter {
 public:
  Fingerprinter();
  ~Fingerprinter();
  Fingerprinter(const Fingerprinter&) = delete;
  Fingerprinter& operator=(const Fingerprinter&) = delete;

  void bytes(const void* p, std::size_t n);  // length first
  void integer(std::int64_t v);
  void text(const std::string& s);
  void real(float f);  // its bits
  // dtype, shape and bytes (an empty view: a marker); device memory is read through `device`.
  Status tensor(const TensorView& v, Executor& device);
  Fingerprint finish();

 private:
  void raw(const void* p, std::size_t n);
  EVP_MD_CTX* ctx_;
};

// What a Decode or Prefill call's fingerprint covers besides its arguments.
struct KvCallIdentity {
  const char* op = "";
  int layer = 0;
  const std::vector<std::string>* ids = nullptr;
  const std::vector<std::int64_t>* fresh = nullptr;
  bool return_lse = false, return_values = false;
  std::string variant;
};

Result<Fingerprint> kv_fingerprint(const KvCallIdentity& call, const PagedDecodeArgs& a,
                                   Executor& device);
Result<Fingerprint> kv_fingerprint(const KvCallIdentity& call, const PagedPrefillArgs& a,
                                   Executor& device);

}  // namespace attn::server
