#include "output.h"

#include <google/protobuf/util/json_util.h>

#include <cstdio>
#include <iostream>

namespace attn::cli {

int fail(const Status& s) {
  std::cerr << "attn: " << s.message() << "\n";
  return 2;
}

int call_failed(const Status& s) {
  std::cerr << "attn: " << s.to_string() << "\n";
  return 1;
}

int print_json(const google::protobuf::Message& m) {
  google::protobuf::util::JsonPrintOptions opts;
  opts.add_whitespace = true;
  opts.preserve_proto_field_names = true;
  std::string s;
  (void)google::protobuf::util::MessageToJsonString(m, &s, opts);
  std::cout << s;
  return 0;
}

std::string format_ns(std::int64_t ns) {
  char buf[32];
  if (ns >= 1000000000)
    std::snprintf(buf, sizeof buf, "%.3f s", ns / 1e9);
  else if (ns >= 1000000)
    std::snprintf(buf, sizeof buf, "%.3f ms", ns / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%.1f us", ns / 1e3);
  return buf;
}

}  // namespace attn::cli
