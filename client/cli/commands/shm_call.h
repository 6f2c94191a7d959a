// --shm for the op subcommands: the inputs copied into a new shared-memory region registered for
// this call, the request given their references and the output's, the output read back from the
// region. A template over the RPC, so that one copy serves matmul, softmax and attention.
#pragma once

#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include "attn/client.h"
#include "attn/wire.h"

namespace attn::cli {

template <class Request, class Response>
Result<OpResult> call_in_shm(
    Client& client, const std::vector<const Tensor*>& inputs, std::size_t output_bytes,
    const std::vector<v1::Tensor*>& request_inputs, Request& req,
    grpc::Status (v1::AttnService::Stub::*method)(grpc::ClientContext*, const Request&, Response*),
    const v1::Tensor& (Response::*output)() const) {
  std::size_t total = output_bytes;
  for (const Tensor* t : inputs) total += t->bytes();
  ATTN_ASSIGN_OR_RETURN(buf, SharedMemoryBuffer::create(total));
  const std::string name = "attn-cli-" + std::to_string(::getpid());
  std::int64_t at = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    std::memcpy(static_cast<char*>(buf.data()) + at, inputs[i]->data(), inputs[i]->bytes());
    *request_inputs[i] = Client::in_shared_memory(inputs[i]->dtype(), inputs[i]->shape(), name, at);
    at += static_cast<std::int64_t>(inputs[i]->bytes());
  }
  *req.add_output_shm() = Client::shared_memory_ref(name, at);
  ATTN_RETURN_IF_ERROR(
      client.register_shared_memory(name, buf.key(), 0, static_cast<std::int64_t>(total)).status());
  Response resp;
  const Status called =
      wire::from_grpc((client.stub().*method)(client.make_context(req).get(), req, &resp));
  (void)client.unregister_shared_memory(name);
  ATTN_RETURN_IF_ERROR(called);
  const v1::Tensor& o = (resp.*output)();
  const auto dtype = wire::from_proto(o.dtype());
  if (!dtype) return internal_error("the response's output has no dtype");
  Tensor out(*dtype, Shape(o.shape().begin(), o.shape().end()));
  if (out.bytes() != output_bytes)
    return internal_error("the response's output is not the size expected");
  std::memcpy(out.data(), static_cast<const char*>(buf.data()) + at, out.bytes());
  return OpResult{std::move(out), {}, resp.timings()};
}

}  // namespace attn::cli
