// Status: how the kernel library reports a failure. The server maps it to a gRPC status in
// exactly one place (wire::to_grpc, proto/wire.cc).
#pragma once

#include <string>
#include <utility>
#include <variant>

namespace attn {

// Numbered as the canonical codes (google.rpc.Code, which gRPC uses), so that the mapping to any
// RPC status is the number itself and the names live in one table (status.cc).
enum class StatusCode {
  kOk = 0,
  kCancelled = 1,           // the caller gave up
  kInvalidArgument = 3,     // the request is wrong: a field, a shape, a dtype, a name
  kDeadlineExceeded = 4,    // the caller's deadline passed
  kNotFound = 5,            // no such variant / handle
  kResourceExhausted = 8,   // too large for a limit, out of memory, queue full
  kFailedPrecondition = 9,  // a valid request this variant or backend cannot serve
  kInternal = 13,           // a bug or a device fault
  kUnavailable = 14,        // the backend or device is not there
  kUnauthenticated = 16,    // no credentials, or wrong ones
};

// "INVALID_ARGUMENT", ...: the canonical name of a code, also of the canonical codes this enum
// does not use ("UNIMPLEMENTED"); the number for one that is not canonical.
std::string status_code_name(int canonical_code);
inline std::string status_code_name(StatusCode code) { return status_code_name(static_cast<int>(code)); }
// The StatusCode of a canonical code; kInternal for one the library does not use.
StatusCode status_code_from_canonical(int canonical_code);


class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status Ok() { return {}; }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }
  std::string to_string() const;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status resource_exhausted(std::string m) {
  return {StatusCode::kResourceExhausted, std::move(m)};
}
inline Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status failed_precondition(std::string m) {
  return {StatusCode::kFailedPrecondition, std::move(m)};
}
inline Status unavailable(std::string m) { return {StatusCode::kUnavailable, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }
inline Status unauthenticated(std::string m) { return {StatusCode::kUnauthenticated, std::move(m)}; }
inline Status deadline_exceeded(std::string m) {
  return {StatusCode::kDeadlineExceeded, std::move(m)};
}
inline Status cancelled(std::string m) { return {StatusCode::kCancelled, std::move(m)}; }

// A value or the Status that explains why there is none.
template <class T>
class [[nodiscard]] Result {
 public:
  Result(T result) : v_(std::move(result)) {}  // NOLINT: implicit on purpose, like absl::StatusOr
  Result(Status status) : v_(std::move(status)) {}  // NOLINT

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOk;
    return ok() ? kOk : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace attn

// Returns early from the enclosing function when `expr` (a Status) is not ok.
#define ATTN_RETURN_IF_ERROR(expr)       \
  do {                                   \
    ::attn::Status attn_status_ = (expr); \
    if (!attn_status_.ok()) return attn_status_; \
  } while (0)

// Declares `lhs` from `expr` (a Result) or returns its Status from the enclosing function.
#define ATTN_ASSIGN_OR_RETURN(lhs, expr)                 \
  auto lhs##_result_ = (expr);                           \
  if (!lhs##_result_.ok()) return lhs##_result_.status(); \
  auto lhs = std::move(lhs##_result_).value()
