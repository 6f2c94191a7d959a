// Large messages without extra copies: requests parsed into strings that already have room for
// their tensors' bytes, responses sent from where the handler wrote their tensors.
#pragma once

#include <google/protobuf/message.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/status.h>

#include <cstddef>

namespace attn::server {

// Requests and response fields from this size on are read and sent without extra copies.
inline constexpr std::size_t kLargeMessageBytes = std::size_t{1} << 20;

// Parses `buffer` (`size` bytes) into `message`, letting go of each received slice as soon as
// the parser has moved past it, so the request never exists twice in full.
bool parse_large(grpc::ByteBuffer& buffer, std::size_t size, google::protobuf::Message& message);

// Serializes `message` with its large tensors' bytes going out from where they are (the message
// keeps none of them afterwards).
grpc::Status serialize_large(google::protobuf::Message& message, grpc::ByteBuffer* out);

}  // namespace attn::server
