// AttnService's methods with one request (unary and server-streaming), judged on their metadata
// before their bodies are read.
//
// gRPC reads the whole request of a unary call before any handler runs (a 1 GB body from a caller
// without the token cost the server 2.7 GB before it was refused), while a streaming call's
// handler starts with only the metadata. On the wire a unary call and a bidi-streaming call that
// sends one message each way are the same, so these methods are registered as bidi-streaming
// calls of raw bytes: the token is checked first (a refused call's body stays unread but for one
// HTTP/2 flow-control window), then room for the request is held in the in-flight memory budget
// (the size the client declares in attn-request-bytes, else a small one; a call past the budget is
// refused, its body unread), the one request is read, parsed, and handed to AttnService's unary
// handler as before; its response goes back as the one message. (gRPC 1.51's AuthMetadataProcessor would decide before the body too, but only
// under TLS: InsecureServerCredentials asserts on it.)
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/impl/service_type.h>

#include <deque>
#include <memory>
#include <string>

#include "memory_budget.h"
#include "security.h"

namespace attn::server {

class AttnService;
class Metrics;

// Metadata a client may send with a call: its request's serialized size in bytes. gRPC carries
// no length before a message has fully arrived, so this is how the server learns it in time to
// refuse a call past --max-inflight-mb before its bytes come (as HTTP's Content-Length).
inline constexpr const char* kRequestBytesKey = "attn-request-bytes";

struct GateConfig {
  std::string token;               // empty: no token required
  MemoryBudget* budget = nullptr;  // null: no limit
  Metrics* metrics = nullptr;      // null: no metrics
  std::size_t max_message_bytes = 0;  // the largest request gRPC accepts
};

class GatedMethods final : public grpc::Service {
 public:
  GatedMethods(AttnService& service, GateConfig config);
  ~GatedMethods() override;

  struct Shared;

 private:
  template <class Request, class Response>
  void add(const char* method, const char* op,
           grpc::ServerUnaryReactor* (AttnService::*handler)(grpc::CallbackServerContext*, const Request*,
                                                             Response*));
  template <class Request, class Response>
  void add_streaming(const char* method, const char* op,
                     grpc::ServerWriteReactor<Response>* (AttnService::*handler)(grpc::CallbackServerContext*,
                                                                                 const Request*));
  // Registers `method` as a one-message bidi call of raw bytes served by a `Call` reactor.
  template <class Call, class Handler>
  void add_method(const char* method, const char* op, Handler handler);
  std::unique_ptr<Shared> shared_;
  std::deque<std::string> paths_;  // gRPC keeps a pointer to each method's path
};

// Calls of methods no service has: UNIMPLEMENTED, their bodies unread.
class UnknownMethods final : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;
};

}  // namespace attn::server
