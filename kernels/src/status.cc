#include "attn/status.h"

#include <array>

namespace attn {
namespace {

// The canonical codes by number (google.rpc.Code).
constexpr std::array<const char*, 17> kCanonicalNames = {
    "OK",        "CANCELLED",         "UNKNOWN",           "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL",       "UNAVAILABLE",       "DATA_LOSS",        "UNAUTHENTICATED"};

}  // namespace

std::string status_code_name(int code) {
  if (code >= 0 && static_cast<std::size_t>(code) < kCanonicalNames.size()) return kCanonicalNames[static_cast<std::size_t>(code)];
  return std::to_string(code);
}

StatusCode status_code_from_canonical(int code) {
  switch (static_cast<StatusCode>(code)) {
    case StatusCode::kOk:
    case StatusCode::kCancelled:
    case StatusCode::kInvalidArgument:
    case StatusCode::kDeadlineExceeded:
    case StatusCode::kNotFound:
    case StatusCode::kResourceExhausted:
    case StatusCode::kFailedPrecondition:
    case StatusCode::kInternal:
    case StatusCode::kUnavailable:
    case StatusCode::kUnauthenticated: return static_cast<StatusCode>(code);
  }
  return StatusCode::kInternal;
}

std::string Status::to_string() const {
  if (ok()) return "OK";
  return status_code_name(code_) + ": " + message_;
}

}  // namespace attn
