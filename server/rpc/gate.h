// The entry point of every attn.v1.AttnService call: the method table's handlers, each judged on
// its call's metadata before its body is read.
//
// gRPC reads the whole request of a unary call before any handler runs (a 1 GB body from a caller
// without the token cost the server 2.7 GB before it was refused), while a streaming call's
// handler starts with only the metadata. On the wire a unary call and a bidi-streaming call that
// sends one message each way are the same, so the methods with one request are registered as
// bidi-streaming calls of raw bytes: the token is checked first (a refused call's body stays
// unread but for one HTTP/2 flow-control window), then room for the request is held in the
// in-flight memory budget (the size the client declares in attn-request-bytes, else a small one;
// a call past the budget is refused, its body unread), the one request is read, parsed, and
// handed to its handler with the call's CallContext; its response goes back as the one message.
// PutTensor (a stream of requests) is handed over before its first message and checks the token
// itself. (gRPC 1.51's AuthMetadataProcessor would decide before the body too, but only under
// TLS: InsecureServerCredentials asserts on it.)
//
// Which handler serves which method is the table in handlers/method_table.cc; what a method is
// (its op label, whether it changes state) is its MethodTraits option in the proto.
#pragma once

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/impl/service_type.h>
#include <grpcpp/support/server_callback.h>

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "rpc/call_context.h"
#include "rpc/security.h"
#include "state/memory_budget.h"

namespace attn::server {

struct AttnService;
class Metrics;

// Metadata a client may send with a call: its request's serialized size in bytes. gRPC carries
// no length before a message has fully arrived, so this is how the server learns it in time to
// refuse a call past --max-inflight-mb before its bytes come (as HTTP's Content-Length).
inline constexpr const char* kRequestBytesKey = "attn-request-bytes";

struct GateConfig {
  std::string token;                  // empty: no token required
  MemoryBudget* budget = nullptr;     // null: no limit
  Metrics* metrics = nullptr;         // null: no metrics
  std::size_t max_message_bytes = 0;  // the largest request gRPC accepts
};

class GatedMethods final : public grpc::Service {
 public:
  GatedMethods(AttnService& service, GateConfig config);
  ~GatedMethods() override;

  template <class Request, class Response>
  using UnaryHandler =
      std::function<grpc::ServerUnaryReactor*(CallContext&, const Request*, Response*)>;
  template <class Request, class Response>
  using WriterHandler =
      std::function<grpc::ServerWriteReactor<Response>*(CallContext&, const Request*)>;
  template <class Request, class Response>
  using ReaderHandler =
      std::function<grpc::ServerReadReactor<Request>*(grpc::CallbackServerContext*, Response*)>;

  // The table's entries (handlers/method_table.cc): one per method, by its name in the proto,
  // served by a member function of one handler group.
  template <class Group, class Request, class Response>
  void unary(const char* method, Group& group,
             grpc::ServerUnaryReactor* (Group::*handler)(CallContext&, const Request*, Response*)) {
    unary<Request, Response>(method,
                             [&group, handler](CallContext& c, const Request* q, Response* r) {
                               return (group.*handler)(c, q, r);
                             });
  }
  template <class Group, class Request, class Response>
  void server_streaming(const char* method, Group& group,
                        grpc::ServerWriteReactor<Response>* (Group::*handler)(CallContext&,
                                                                              const Request*)) {
    server_streaming<Request, Response>(
        method,
        [&group, handler](CallContext& c, const Request* q) { return (group.*handler)(c, q); });
  }
  template <class Group, class Request, class Response>
  void client_streaming(const char* method, Group& group,
                        grpc::ServerReadReactor<Request>* (Group::*handler)(
                            grpc::CallbackServerContext*, Response*)) {
    client_streaming<Request, Response>(
        method, [&group, handler](grpc::CallbackServerContext* ctx, Response* r) {
          return (group.*handler)(ctx, r);
        });
  }
  template <class Request, class Response>
  void unary(const char* method, UnaryHandler<Request, Response> handler);
  template <class Request, class Response>
  void server_streaming(const char* method, WriterHandler<Request, Response> handler);
  template <class Request, class Response>
  void client_streaming(const char* method, ReaderHandler<Request, Response> handler);

  struct Shared;

 private:
  // Registers `method` (a name of attn.v1.AttnService) and returns its info.
  const MethodInfo& add_path(const char* method, grpc::internal::RpcMethod::RpcType type);
  std::unique_ptr<Shared> shared_;
  std::deque<std::string> paths_;  // gRPC keeps a pointer to each method's path
  std::vector<std::string> served_;
};

// Calls of methods no service has: UNIMPLEMENTED, their bodies unread.
class UnknownMethods final : public grpc::CallbackGenericService {
 public:
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override;
};

// The table of attn.v1.AttnService's handlers (handlers/method_table.cc).
void bind_methods(GatedMethods& gate, AttnService& service);

}  // namespace attn::server
