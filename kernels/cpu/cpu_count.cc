#include "cpu_count.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>

namespace attn::cpu {
namespace {

int affinity_cpus() {
  const long configured = sysconf(_SC_NPROCESSORS_CONF);
  const int size = static_cast<int>(std::max(configured, 1L)) + 64;  // CPU ids may have gaps
  cpu_set_t* set = CPU_ALLOC(size);
  if (!set) return 1;
  const std::size_t bytes = CPU_ALLOC_SIZE(size);
  int count = static_cast<int>(std::max(configured, 1L));
  if (sched_getaffinity(0, bytes, set) == 0) count = CPU_COUNT_S(bytes, set);
  CPU_FREE(set);
  return std::max(count, 1);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The cgroup v2 path of this process: the "0::" line of /proc/self/cgroup.
std::string own_cgroup() {
  std::istringstream lines(read_file("/proc/self/cgroup"));
  for (std::string line; std::getline(lines, line);)
    if (line.rfind("0::", 0) == 0) return line.substr(3);
  return {};
}

}  // namespace

std::optional<double> parse_cpu_max(std::string_view text) {
  const auto space = text.find(' ');
  if (space == std::string_view::npos) return std::nullopt;
  const std::string_view quota_text = text.substr(0, space);
  std::string_view period_text = text.substr(space + 1);
  while (!period_text.empty() && (period_text.back() == '\n' || period_text.back() == ' '))
    period_text.remove_suffix(1);
  long long quota = 0, period = 0;
  const auto q = std::from_chars(quota_text.data(), quota_text.data() + quota_text.size(), quota);
  const auto p =
      std::from_chars(period_text.data(), period_text.data() + period_text.size(), period);
  if (q.ec != std::errc{} || q.ptr != quota_text.data() + quota_text.size()) return std::nullopt;
  if (p.ec != std::errc{} || p.ptr != period_text.data() + period_text.size()) return std::nullopt;
  if (quota <= 0 || period <= 0) return std::nullopt;
  return static_cast<double>(quota) / static_cast<double>(period);
}

std::optional<double> cgroup_cpu_quota(const std::string& mount, const std::string& cgroup) {
  if (cgroup.empty() || cgroup[0] != '/') return std::nullopt;
  std::optional<double> tightest;
  // A limit on any parent binds its children too; the root has no cpu.max.
  std::string path = cgroup;
  while (true) {
    if (const auto quota = parse_cpu_max(read_file(mount + path + "/cpu.max")))
      tightest = tightest ? std::min(*tightest, *quota) : *quota;
    if (path == "/" || path.empty()) break;
    path = path.substr(0, std::max<std::size_t>(path.rfind('/'), 1));
  }
  return tightest;
}

int usable_cpus() {
  static const int cpus = [] {
    int n = affinity_cpus();
    if (const auto quota = cgroup_cpu_quota("/sys/fs/cgroup", own_cgroup()))
      n = std::min(n, static_cast<int>(std::ceil(*quota)));
    return std::max(n, 1);
  }();
  return cpus;
}

}  // namespace attn::cpu
