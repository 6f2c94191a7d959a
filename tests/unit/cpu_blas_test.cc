// The OpenBLAS CPU backend: matmul/cpu_openblas and attention/cpu_flash against the float64
// reference (fresh random inputs, awkward sizes past every block size, every dtype, both
// transposes, batches with shared and batched B, GQA, causal with Sq < Sk and Sq > Sk, Sq = 1,
// lse, outputs poisoned with NaN), `auto` picking them, the thread count they run with, and the
// conversions and exponentials under them.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include "attn/executor.h"
#include "cpu/cpu_count.h"
#include "cpu/openblas.h"
#include "cpu/vectorized.h"
#include "reference.h"
#include "support/random.h"

namespace attn {
namespace {

using ::testing::HasSubstr;
using testing::poison;
using testing::random_tensor;

std::string dname(DType t) { return std::string(dtype_name(t)); }
std::string seed_note() { return " seed=" + std::to_string(testing::seed()); }

class CpuBlas : public ::testing::TestWithParam<DType> {
 protected:
  std::mt19937_64 rng{testing::seed()};
  std::unique_ptr<Executor> cpu = make_cpu_executor();
  const Registry& registry = default_registry();

  template <class Args>
  void run(const OpRegistry<Args>& ops, const std::string& name, Args& args) {
    auto v = ops.select(args, name, cpu->target());
    ASSERT_TRUE(v.ok()) << v.status().to_string();
    ExecTimings t;
    const Status s = cpu->execute(make_call(**v, args), t);
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
};

struct MatmulCase {
  Shape a, b;
  bool ta, tb;
};

TEST_P(CpuBlas, MatmulOpenBlasMatchesReference) {
  const DType dt = GetParam();
  const MatmulCase cases[] = {
      {{1, 1}, {1, 1}, false, false},
      {{7, 33}, {33, 5}, false, false},
      {{33, 7}, {1000, 33}, true, true},
      {{1000, 33}, {7, 33}, false, true},
      {{33, 1000}, {33, 7}, true, false},
      // Past the 2048 x 2048 conversion blocks of a single product in M, K and N (two blocks
      // each, the second short).
      {{2100, 2200}, {2200, 9}, false, false},
      {{2200, 2100}, {9, 2200}, true, true},
      {{5, 2100}, {2100, 2200}, false, false},
      {{2100, 5}, {2200, 2100}, true, true},
      // Past the 1024 x 1024 blocks of a batch's products (one per thread) in M, K and N.
      {{4, 1030, 6}, {4, 6, 9}, false, false},
      {{4, 7, 1100}, {4, 7, 1030}, true, false},
      {{4, 5, 1030}, {4, 1030, 3}, false, false},
      // Batches: a shared B under untransposed A (one product of 3 x 17 rows), under transposed A
      // (a product each), batched B; many small products (one per thread) and a few large ones
      // (each threaded by OpenBLAS).
      {{3, 17, 9}, {9, 70}, false, false},
      {{3, 9, 17}, {70, 9}, true, true},
      {{2, 9, 17}, {2, 17, 70}, false, false},
      {{2, 9, 17}, {2, 70, 9}, true, true},
      {{16, 33, 7}, {16, 20, 7}, false, true},
      {{16, 7, 33}, {16, 7, 20}, true, false},
      {{2, 300, 410}, {2, 410, 350}, false, false},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(dname(dt) + " a" + shape_to_string(c.a) + " b" + shape_to_string(c.b) +
                 " ta=" + std::to_string(c.ta) + " tb=" + std::to_string(c.tb) + seed_note());
    Tensor a = random_tensor(dt, c.a, rng), b = random_tensor(dt, c.b, rng);
    auto dims = matmul_dims(a.view(), b.view(), c.ta, c.tb);
    ASSERT_TRUE(dims.ok()) << dims.status().to_string();
    Tensor out(dt, matmul_output_shape(*dims, static_cast<int>(c.a.size())));
    poison(out);
    MatmulArgs args{a.view(), b.view(), out.view(), c.ta, c.tb};
    run(registry.of<MatmulArgs>(), "matmul/cpu_openblas", args);
    EXPECT_LE(reference::matmul_error(out.view(), args), reference::tolerance(dt));
  }
}

struct AttentionCase {
  std::int64_t b, hq, hkv, sq, sk, d;
};

TEST_P(CpuBlas, FlashAttentionMatchesReference) {
  const DType dt = GetParam();
  // Blocks: 64 to 512 queries (fewer when there are few heads) x 512 keys, diagonal slices of 64
  // rows: sizes below, at and past them, head dims 1 to 128. With 8 heads, 512-row blocks: two
  // query blocks and two key blocks; Sq > Sk with the blind rows filling the first block and part
  // of the second.
  const AttentionCase cases[] = {
      {1, 1, 1, 1, 1, 1},     {1, 8, 2, 1, 1000, 64},   {2, 4, 2, 17, 33, 64},
      {1, 2, 1, 33, 7, 32},   {1, 2, 2, 130, 130, 7},   {1, 4, 1, 200, 1000, 33},
      {2, 3, 3, 7, 1, 16},    {1, 1, 1, 129, 300, 128}, {1, 2, 1, 300, 129, 64},
      {1, 2, 2, 64, 512, 64}, {1, 8, 4, 600, 700, 16},  {1, 8, 8, 1100, 530, 8},
  };
  for (const auto& c : cases)
    for (bool causal : {false, true})
      for (float scale : {0.0f, 0.3f}) {
        SCOPED_TRACE(dname(dt) + " B" + std::to_string(c.b) + " Hq" + std::to_string(c.hq) +
                     " Hkv" + std::to_string(c.hkv) + " Sq" + std::to_string(c.sq) + " Sk" +
                     std::to_string(c.sk) + " D" + std::to_string(c.d) + (causal ? " causal" : "") +
                     " scale=" + std::to_string(scale) + seed_note());
        Tensor q = random_tensor(dt, {c.b, c.hq, c.sq, c.d}, rng);
        Tensor k = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
        Tensor v = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
        Tensor o(dt, q.shape()), lse(DType::kFloat32, {c.b, c.hq, c.sq});
        poison(o);
        poison(lse);
        AttentionArgs args{q.view(),
                           k.view(),
                           v.view(),
                           o.view(),
                           lse.view(),
                           causal,
                           resolve_attention_scale(scale, c.d)};
        run(registry.of<AttentionArgs>(), "attention/cpu_flash", args);
        std::vector<double> want_lse;
        const auto want = reference::attention(args, &want_lse);
        EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt));
        EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-5);
        // Causal with Sq > Sk: the first Sq - Sk rows of every head see no key.
        const std::int64_t blind = causal ? std::max<std::int64_t>(c.sq - c.sk, 0) : 0;
        for (std::int64_t bh = 0; bh < c.b * c.hq; ++bh)
          for (std::int64_t i = 0; i < blind; ++i) {
            const auto row = static_cast<std::size_t>(bh * c.sq + i);
            ASSERT_EQ(lse.get(row), -std::numeric_limits<float>::infinity()) << "row " << i;
            for (std::int64_t col = 0; col < c.d; ++col)
              ASSERT_EQ(o.get(row * static_cast<std::size_t>(c.d) + static_cast<std::size_t>(col)),
                        0.0f)
                  << "row " << i;
          }
      }
}

TEST_P(CpuBlas, FlashAttentionWithoutLse) {
  const DType dt = GetParam();
  Tensor q = random_tensor(dt, {1, 4, 70, 64}, rng), k = random_tensor(dt, {1, 2, 150, 64}, rng);
  Tensor v = random_tensor(dt, {1, 2, 150, 64}, rng), o(dt, q.shape());
  poison(o);
  AttentionArgs args{
      q.view(), k.view(), v.view(), o.view(), {}, true, resolve_attention_scale(0, 64)};
  run(registry.of<AttentionArgs>(), "attention/cpu_flash", args);
  EXPECT_LE(reference::relative_frobenius_error(o.view(), reference::attention(args)),
            reference::tolerance(dt))
      << seed_note();
}

TEST_P(CpuBlas, AutoPicksTheOpenBlasVariants) {
  const DType dt = GetParam();
  const Target cpu_target{Backend::kCpu, 0};
  Tensor a(dt, {4, 8, 16}), b(dt, {16, 8}), c(dt, {4, 8, 8});
  MatmulArgs mm{a.view(), b.view(), c.view()};
  auto picked = registry.of<MatmulArgs>().select(mm, "", cpu_target);
  ASSERT_TRUE(picked.ok()) << picked.status().to_string();
  EXPECT_EQ((*picked)->info.name, "matmul/cpu_openblas");
  Tensor q(dt, {1, 4, 9, 32}), k(dt, {1, 2, 11, 32}), v(dt, {1, 2, 11, 32}), o(dt, {1, 4, 9, 32});
  AttentionArgs at{q.view(), k.view(), v.view(), o.view(), {}, true, 0.5f};
  auto flash = registry.of<AttentionArgs>().select(at, "", cpu_target);
  ASSERT_TRUE(flash.ok()) << flash.status().to_string();
  EXPECT_EQ((*flash)->info.name, "attention/cpu_flash");
  // The hand-written variants stay available by name, below.
  const auto* blocked = registry.of<MatmulArgs>().find("matmul/cpu_blocked");
  const auto* rows = registry.of<AttentionArgs>().find("attention/cpu");
  ASSERT_TRUE(blocked && rows);
  EXPECT_LT(blocked->info.priority, (*picked)->info.priority);
  EXPECT_LT(rows->info.priority, (*flash)->info.priority);
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, CpuBlas,
                         ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                         [](const auto& param_info) { return dname(param_info.param); });

// ListKernels and GetServerInfo say which BLAS serves.
TEST(CpuBlasInfo, VariantsAndDeviceNameSayWhichBlasServes) {
  const std::string blas = cpu::openblas_description();
  EXPECT_THAT(blas, HasSubstr("OpenBLAS 0."));
  EXPECT_THAT(blas, HasSubstr("pthread"));
  for (const char* name : {"matmul/cpu_openblas", "attention/cpu_flash"}) {
    const VariantInfo* info = nullptr;
    for (const VariantInfo* v : default_registry().all())
      if (v->name == name) info = v;
    ASSERT_NE(info, nullptr) << name;
    EXPECT_THAT(info->description, HasSubstr(blas)) << name;
    EXPECT_THAT(info->limits, HasSubstr(blas)) << name;
  }
  auto cpu = make_cpu_executor();
  EXPECT_EQ(cpu->device().name, "cpu: " + std::to_string(cpu::usable_cpus()) + " threads, " + blas);
  EXPECT_EQ(cpu->device().multiprocessors, cpu::usable_cpus());
}

// OpenBLAS runs usable_cpus() threads, one while a threaded loop of ours holds it, and gets its
// count back after: after a real attention call too.
TEST(CpuBlasThreads, SingleThreadedWhileHeldThenRestored) {
  cpu::configure_openblas_threads();
  const int usable = cpu::usable_cpus();
  EXPECT_EQ(cpu::openblas_threads(), usable);
  {
    cpu::SingleThreadedBlas outer;
    EXPECT_EQ(cpu::openblas_threads(), 1);
    {
      cpu::SingleThreadedBlas inner;
      EXPECT_EQ(cpu::openblas_threads(), 1);
    }
    EXPECT_EQ(cpu::openblas_threads(), 1);  // the outer holder still runs its loop
  }
  EXPECT_EQ(cpu::openblas_threads(), usable);
  std::mt19937_64 rng(testing::seed());
  Tensor q = random_tensor(DType::kFloat32, {1, 2, 100, 32}, rng), o(DType::kFloat32, q.shape());
  AttentionArgs args{q.view(), q.view(), q.view(), o.view(), {}, false, 0.1f};
  auto cpu = make_cpu_executor();
  ExecTimings t;
  ASSERT_TRUE(
      cpu->execute(make_call(*default_registry().of<AttentionArgs>().find("attention/cpu_flash"), args), t)
          .ok());
  EXPECT_EQ(cpu::openblas_threads(), usable);
}

TEST(CpuCount, ParsesCgroupCpuMax) {
  EXPECT_EQ(cpu::parse_cpu_max("max 100000\n"), std::nullopt);
  EXPECT_EQ(cpu::parse_cpu_max("150000 100000\n"), 1.5);
  EXPECT_EQ(cpu::parse_cpu_max("200000 100000"), 2.0);
  EXPECT_EQ(cpu::parse_cpu_max("50000 100000"), 0.5);
  EXPECT_EQ(cpu::parse_cpu_max(""), std::nullopt);
  EXPECT_EQ(cpu::parse_cpu_max("12x 100000"), std::nullopt);
  EXPECT_EQ(cpu::parse_cpu_max("0 100000"), std::nullopt);
}

// The tightest quota along the path wins, wherever it is set; no file or "max" is no limit.
TEST(CpuCount, TightestQuotaAlongTheCgroupPath) {
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / ("attn-cgroup-" + std::to_string(getpid()));
  fs::create_directories(root / "pod/c1/leaf");
  fs::create_directories(root / "free/leaf");
  auto write = [](const fs::path& p, const char* text) { std::ofstream(p) << text; };
  write(root / "pod/cpu.max", "300000 100000\n");
  write(root / "pod/c1/cpu.max", "max 100000\n");
  write(root / "pod/c1/leaf/cpu.max", "max 100000\n");
  write(root / "free/cpu.max", "max 100000\n");
  EXPECT_EQ(cpu::cgroup_cpu_quota(root.string(), "/pod/c1/leaf"), 3.0);
  EXPECT_EQ(cpu::cgroup_cpu_quota(root.string(), "/pod"), 3.0);
  EXPECT_EQ(cpu::cgroup_cpu_quota(root.string(), "/free/leaf"), std::nullopt);
  EXPECT_EQ(cpu::cgroup_cpu_quota(root.string(), "/missing"), std::nullopt);
  EXPECT_EQ(cpu::cgroup_cpu_quota(root.string(), ""), std::nullopt);
  write(root / "pod/c1/leaf/cpu.max", "150000 100000\n");  // tighter below
  EXPECT_EQ(cpu::cgroup_cpu_quota(root.string(), "/pod/c1/leaf"), 1.5);
  write(root / "cpu.max", "100000 100000\n");  // at the mount itself (a container's namespace)
  EXPECT_EQ(cpu::cgroup_cpu_quota(root.string(), "/"), 1.0);
  EXPECT_EQ(cpu::cgroup_cpu_quota(root.string(), "/pod/c1/leaf"), 1.0);
  fs::remove_all(root);
  EXPECT_GE(cpu::usable_cpus(), 1);
  EXPECT_LE(cpu::usable_cpus(), static_cast<int>(sysconf(_SC_NPROCESSORS_CONF)));
}

// cgroup v1 (hosts whose cpu controller is still on v1, as a docker --cpus container there):
// cpu.cfs_quota_us over cpu.cfs_period_us, -1 for no limit, the tightest along the path.
TEST(CpuCount, CgroupV1CfsQuota) {
  EXPECT_EQ(cpu::parse_cfs_quota("150000\n", "100000\n"), 1.5);
  EXPECT_EQ(cpu::parse_cfs_quota("-1\n", "100000\n"), std::nullopt);
  EXPECT_EQ(cpu::parse_cfs_quota("", "100000"), std::nullopt);
  EXPECT_EQ(cpu::parse_cfs_quota("50000", "x"), std::nullopt);
  namespace fs = std::filesystem;
  const fs::path root = fs::temp_directory_path() / ("attn-cgroup-v1-" + std::to_string(getpid()));
  fs::create_directories(root / "docker/abc");
  auto write = [](const fs::path& p, const char* text) { std::ofstream(p) << text; };
  write(root / "cpu.cfs_quota_us", "-1\n");
  write(root / "cpu.cfs_period_us", "100000\n");
  write(root / "docker/cpu.cfs_quota_us", "-1\n");
  write(root / "docker/cpu.cfs_period_us", "100000\n");
  write(root / "docker/abc/cpu.cfs_quota_us", "250000\n");
  write(root / "docker/abc/cpu.cfs_period_us", "100000\n");
  EXPECT_EQ(cpu::cgroup_v1_cpu_quota(root.string(), "/docker/abc"), 2.5);
  EXPECT_EQ(cpu::cgroup_v1_cpu_quota(root.string(), "/docker"), std::nullopt);
  EXPECT_EQ(cpu::cgroup_v1_cpu_quota(root.string(), "/"), std::nullopt);
  write(root / "cpu.cfs_quota_us", "50000\n");  // the mount itself: a container's own cgroup
  EXPECT_EQ(cpu::cgroup_v1_cpu_quota(root.string(), "/"), 0.5);
  EXPECT_EQ(cpu::cgroup_v1_cpu_quota(root.string(), "/docker/abc"), 0.5);
  fs::remove_all(root);
}

// Every float16 and bfloat16 bit pattern converts exactly as the scalar functions of dtype.h do,
// both ways, at lengths that leave a tail past the 8-lane loop.
TEST(Vectorized, ConversionsMatchTheScalarOnes) {
  std::vector<std::uint16_t> bits(65536 + 5);
  for (std::size_t i = 0; i < bits.size(); ++i) bits[i] = static_cast<std::uint16_t>(i);
  std::vector<float> f(bits.size());
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(dname(dt));
    cpu::convert_to_float(bits.data(), dt, static_cast<std::int64_t>(bits.size()), f.data());
    for (std::size_t i = 0; i < bits.size(); ++i) {
      const float want =
          dt == DType::kFloat16 ? half_bits_to_float(bits[i]) : bfloat16_bits_to_float(bits[i]);
      if (std::isnan(want))
        ASSERT_TRUE(std::isnan(f[i])) << i;
      else
        ASSERT_EQ(f[i], want) << i;
    }
  }
  // Float32 values around every rounding case: halfway points, subnormals, overflow, NaN.
  std::mt19937_64 rng(testing::seed());
  std::vector<float> values;
  for (std::uint32_t i = 0; i < 200003; ++i) {
    std::uint32_t x = static_cast<std::uint32_t>(rng());
    if (i % 3 == 0) x = (x & 0xffff0000u) | 0x8000u;      // a bfloat16 tie
    if (i % 3 == 1) x = (x & 0xc7ffe000u) | 0x38001000u;  // near float16's range, a tie
    float v;
    std::memcpy(&v, &x, 4);
    values.push_back(v);
  }
  values.insert(values.end(),
                {0.0f, -0.0f, 65504.0f, 65520.0f, 1e-8f, 6e-5f, INFINITY, -INFINITY, NAN});
  std::vector<std::uint16_t> out(values.size());
  for (DType dt : {DType::kFloat16, DType::kBFloat16}) {
    SCOPED_TRACE(dname(dt) + seed_note());
    cpu::convert_from_float(values.data(), dt, static_cast<std::int64_t>(values.size()),
                            out.data());
    for (std::size_t i = 0; i < values.size(); ++i) {
      const std::uint16_t want =
          dt == DType::kFloat16 ? float_to_half_bits(values[i]) : float_to_bfloat16_bits(values[i]);
      if (std::isnan(values[i])) {
        const float back =
            dt == DType::kFloat16 ? half_bits_to_float(out[i]) : bfloat16_bits_to_float(out[i]);
        ASSERT_TRUE(std::isnan(back)) << i;
      } else {
        ASSERT_EQ(out[i], want) << "value " << values[i] << " at " << i;
      }
    }
  }
}

TEST(Vectorized, RowMaxAndShiftedExponentials) {
  std::mt19937_64 rng(testing::seed());
  std::normal_distribution<float> dist(0.0f, 4.0f);
  for (std::int64_t n : {0, 1, 7, 8, 9, 33, 128, 1000}) {
    SCOPED_TRACE("n=" + std::to_string(n) + seed_note());
    std::vector<float> x(static_cast<std::size_t>(n));
    for (float& e : x) e = dist(rng);
    if (n > 2) x[1] = -INFINITY;  // a masked score
    if (n > 8) x[8] = -200.0f;    // exp below float32's normal range: 0
    float want_max = -INFINITY;
    for (float e : x) want_max = std::max(want_max, e);
    EXPECT_EQ(cpu::row_max(x.data(), n), want_max);
    const float shift = n > 0 ? want_max : 0.0f;
    std::vector<float> y = x;
    const float sum = cpu::exp_shifted_sum(y.data(), n, shift);
    double want_sum = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
      const float arg = x[static_cast<std::size_t>(i)] - shift;  // as the kernel rounds it
      const double want = arg < -87.0f ? 0.0 : std::exp(static_cast<double>(arg));
      want_sum += want;
      ASSERT_NEAR(y[static_cast<std::size_t>(i)], want, 6e-7 * want) << i;  // libmvec: <= 4 ulp
    }
    EXPECT_NEAR(sum, want_sum, 1e-6 * std::max(want_sum, 1.0));
  }
  std::vector<float> masked(20, -INFINITY);
  EXPECT_EQ(cpu::row_max(masked.data(), 20), -INFINITY);
}

}  // namespace
}  // namespace attn
