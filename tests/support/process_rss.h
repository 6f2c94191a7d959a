// A process's resident memory, from /proc, for the tests and the memory probe.
#pragma once

#include <cstdint>
#include <fstream>
#include <string>

namespace attn::testing {

// VmRSS of `pid` in bytes, -1 when the process is gone.
inline std::int64_t process_rss(int pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string key;
  while (in >> key) {
    if (key == "VmRSS:") {
      std::int64_t kb = 0;
      in >> kb;
      return kb * 1024;
    }
    std::getline(in, key);
  }
  return -1;
}

}  // namespace attn::testing
