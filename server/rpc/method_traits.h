// What the proto says about each method of attn.v1.AttnService (its MethodTraits option): the
// label its calls are logged and counted under, and whether it changes state. Read once from the
// descriptor, so the gate, the metrics and the clients agree with the proto by construction.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace attn::server {

struct MethodInfo {
  std::string name;  // "Decode"
  std::string path;  // "/attn.v1.AttnService/Decode"
  std::string op;    // "paged_decode": the label of its logs and metrics
  bool changes_state = false;
  bool client_streaming = false;
  bool server_streaming = false;
};

// Every method of attn.v1.AttnService, in the proto's order. A method without MethodTraits (or
// with an empty op) is a defect of the proto: the server refuses to start (see check_methods).
const std::vector<MethodInfo>& service_methods();
// One method by name; null when the service has none of that name.
const MethodInfo* find_method(std::string_view name);

// Whether `served` names every method of the service exactly once (and nothing else), or what is
// missing or extra: the server serves a method only through its table entry.
std::string check_served_methods(const std::vector<std::string>& served);

}  // namespace attn::server
