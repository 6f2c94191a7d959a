// How subcommands end: errors on stderr with the CLI's exit codes, responses as JSON, durations.
#pragma once

#include <google/protobuf/message.h>

#include <cstdint>
#include <string>

#include "attn/status.h"

namespace attn::cli {

// A bad flag or input, found before calling: "attn: MESSAGE", exit code 2.
int fail(const Status& s);

// A call that failed: "attn: CODE: MESSAGE", exit code 1.
int call_failed(const Status& s);

// A response as indented JSON with the proto's field names, for --json; exit code 0.
int print_json(const google::protobuf::Message& m);

// "1.234 s", "5.678 ms" or "9.0 us".
std::string format_ns(std::int64_t ns);

}  // namespace attn::cli
