#include "rpc/method_traits.h"

#include <algorithm>

#include "attn/v1/attn.pb.h"

namespace attn::server {

const std::vector<MethodInfo>& service_methods() {
  static const std::vector<MethodInfo> methods = [] {
    std::vector<MethodInfo> out;
    const auto* service = v1::MatmulRequest::descriptor()->file()->FindServiceByName("AttnService");
    for (int i = 0; i < service->method_count(); ++i) {
      const auto* m = service->method(i);
      const v1::MethodTraits& traits = m->options().GetExtension(v1::method_traits);
      MethodInfo info;
      info.name = m->name();
      info.path = "/" + service->full_name() + "/" + m->name();
      info.op = traits.op();
      info.changes_state = traits.changes_state();
      info.client_streaming = m->client_streaming();
      info.server_streaming = m->server_streaming();
      out.push_back(std::move(info));
    }
    return out;
  }();
  return methods;
}

const MethodInfo* find_method(std::string_view name) {
  for (const MethodInfo& m : service_methods())
    if (m.name == name) return &m;
  return nullptr;
}

std::string check_served_methods(const std::vector<std::string>& served) {
  std::string problems;
  auto add = [&](const std::string& p) { problems += (problems.empty() ? "" : "; ") + p; };
  for (const MethodInfo& m : service_methods()) {
    const auto n = std::count(served.begin(), served.end(), m.name);
    if (n == 0) add(m.name + " has no table entry");
    if (n > 1) add(m.name + " has " + std::to_string(n) + " table entries");
    if (m.op.empty()) add(m.name + " declares no (method_traits).op in the proto");
  }
  for (const std::string& s : served)
    if (!find_method(s)) add(s + " is not a method of attn.v1.AttnService");
  return problems;
}

}  // namespace attn::server
