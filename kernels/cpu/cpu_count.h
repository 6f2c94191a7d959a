// How many threads the CPU backend runs: the CPUs this process is given, not the host's. A
// container gets its share through an affinity mask (docker --cpuset-cpus) or a cgroup v2 quota
// (docker --cpus, a Kubernetes CPU limit); a thread beyond that share only waits for its turn.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace attn::cpu {

// The CPUs in this process's affinity mask, capped by the cgroup v2 cpu.max quota of its cgroup
// and of each parent, rounded up (a fraction of a CPU is still worth a thread); at least 1.
// Computed once.
int usable_cpus();

// The quota in CPUs of a cgroup v2 cpu.max file ("150000 100000" -> 1.5), or nothing for "max"
// (no limit) or text that is not a quota.
std::optional<double> parse_cpu_max(std::string_view text);

// The tightest cpu.max quota along the process's cgroup, `cgroup` being its path in the v2
// hierarchy ("/kubepods/pod1/c2", from the "0::" line of /proc/self/cgroup) and `mount` where
// that hierarchy is mounted ("/sys/fs/cgroup"); nothing when no level sets one.
std::optional<double> cgroup_cpu_quota(const std::string& mount, const std::string& cgroup);

}  // namespace attn::cpu
