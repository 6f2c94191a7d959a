// How many threads the CPU backend runs: the CPUs this process is given, not the host's. A
// container gets its share through an affinity mask (docker --cpuset-cpus) or a cgroup quota
// (docker --cpus, a Kubernetes CPU limit: cpu.max in cgroup v2, cpu.cfs_quota_us in v1); a
// thread beyond that share only waits for its turn.
#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace attn::cpu {

// The CPUs in this process's affinity mask, capped by the cgroup quota (v2 cpu.max, or v1
// cpu.cfs_quota_us / cpu.cfs_period_us) of its cgroup and of each parent, rounded up (a fraction
// of a CPU is still worth a thread); at least 1. Computed once.
int usable_cpus();

// The quota in CPUs of a cgroup v2 cpu.max file ("150000 100000" -> 1.5), or nothing for "max"
// (no limit) or text that is not a quota.
std::optional<double> parse_cpu_max(std::string_view text);

// The tightest cpu.max quota along the process's cgroup, `cgroup` being its path in the v2
// hierarchy ("/kubepods/pod1/c2", from the "0::" line of /proc/self/cgroup) and `mount` where
// that hierarchy is mounted ("/sys/fs/cgroup"); nothing when no level sets one.
std::optional<double> cgroup_cpu_quota(const std::string& mount, const std::string& cgroup);

// The quota in CPUs of a cgroup v1 cpu controller (cpu.cfs_quota_us "150000", cpu.cfs_period_us
// "100000" -> 1.5), or nothing for -1 (no limit) or text that is not a quota.
std::optional<double> parse_cfs_quota(std::string_view quota_us, std::string_view period_us);

// The same walk as cgroup_cpu_quota in a cgroup v1 cpu hierarchy: `cgroup` from the line of
// /proc/self/cgroup whose controllers include "cpu" ("4:cpu,cpuacct:/docker/abc"), `mount` where
// that controller is mounted ("/sys/fs/cgroup/cpu,cpuacct"). The mount's own files count too: in
// a container's cgroup namespace they are the container's.
std::optional<double> cgroup_v1_cpu_quota(const std::string& mount, const std::string& cgroup);

}  // namespace attn::cpu
