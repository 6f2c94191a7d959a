#include "cpu_count.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>
#include <utility>

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

// The v1 cpu controller's line of /proc/self/cgroup ("4:cpu,cpuacct:/docker/abc"): its
// controllers ("cpu,cpuacct", also the name of its mount) and path; empty when there is none.
std::pair<std::string, std::string> own_v1_cpu_cgroup() {
  std::istringstream lines(read_file("/proc/self/cgroup"));
  for (std::string line; std::getline(lines, line);) {
    const auto first = line.find(':'), second = line.find(':', first + 1);
    if (first == std::string::npos || second == std::string::npos) continue;
    const std::string controllers = line.substr(first + 1, second - first - 1);
    std::istringstream names(controllers);
    for (std::string name; std::getline(names, name, ',');)
      if (name == "cpu") return {controllers, line.substr(second + 1)};
  }
  return {};
}

std::optional<long long> parse_integer(std::string_view text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == ' ')) text.remove_suffix(1);
  long long value = 0;
  const auto r = std::from_chars(text.data(), text.data() + text.size(), value);
  if (r.ec != std::errc{} || r.ptr != text.data() + text.size()) return std::nullopt;
  return value;
}

// The tightest of `quota_at(dir)` over `mount` + `cgroup` and each parent up to the mount.
template <class QuotaAt>
std::optional<double> tightest_along(const std::string& mount, const std::string& cgroup, QuotaAt quota_at) {
  if (cgroup.empty() || cgroup[0] != '/') return std::nullopt;
  std::optional<double> tightest;
  std::string path = cgroup;
  while (true) {
    if (const auto quota = quota_at(path == "/" ? mount : mount + path))
      tightest = tightest ? std::min(*tightest, *quota) : *quota;
    if (path == "/" || path.empty()) break;
    path = path.substr(0, std::max<std::size_t>(path.rfind('/'), 1));
  }
  return tightest;
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
  // A limit on any parent binds its children too; the root has no cpu.max.
  return tightest_along(mount, cgroup, [](const std::string& dir) { return parse_cpu_max(read_file(dir + "/cpu.max")); });
}

std::optional<double> parse_cfs_quota(std::string_view quota_us, std::string_view period_us) {
  const auto quota = parse_integer(quota_us), period = parse_integer(period_us);
  if (!quota || !period || *quota <= 0 || *period <= 0) return std::nullopt;  // -1: no limit
  return static_cast<double>(*quota) / static_cast<double>(*period);
}

std::optional<double> cgroup_v1_cpu_quota(const std::string& mount, const std::string& cgroup) {
  return tightest_along(mount, cgroup, [](const std::string& dir) {
    return parse_cfs_quota(read_file(dir + "/cpu.cfs_quota_us"), read_file(dir + "/cpu.cfs_period_us"));
  });
}

int usable_cpus() {
  static const int cpus = [] {
    int n = affinity_cpus();
    if (const auto quota = cgroup_cpu_quota("/sys/fs/cgroup", own_cgroup()))
      n = std::min(n, static_cast<int>(std::ceil(*quota)));
    const auto [controllers, v1_path] = own_v1_cpu_cgroup();
    if (!controllers.empty()) {
      if (const auto quota = cgroup_v1_cpu_quota("/sys/fs/cgroup/" + controllers, v1_path))
        n = std::min(n, static_cast<int>(std::ceil(*quota)));
    }
    return std::max(n, 1);
  }();
  return cpus;
}

}  // namespace attn::cpu
