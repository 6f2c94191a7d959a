// Every CPU variant against the float64 reference: fresh random inputs, awkward sizes, every
// dtype, outputs poisoned with NaN before the run.
#include <gtest/gtest.h>

#include <cmath>
#include <iterator>

#include "attn/executor.h"
#include "reference.h"
#include "support/random.h"

namespace attn {
namespace {

using testing::mask_every;
using testing::poison;
using testing::random_tensor;

std::string dname(DType t) { return std::string(dtype_name(t)); }

class CpuKernels : public ::testing::TestWithParam<DType> {
 protected:
  std::mt19937_64 rng{testing::seed()};
  std::unique_ptr<Executor> cpu = make_cpu_executor();
  const Registry& registry = default_registry();

  template <class Args>
  void run(const Variant<Args>& v, Args& args) {
    ExecTimings t;
    const OpCall call = make_call(v, args);
    Status s = cpu->execute(call, t);
    ASSERT_TRUE(s.ok()) << s.to_string();
  }
};

struct MatmulCase {
  Shape a, b;
  bool ta, tb;
};

TEST_P(CpuKernels, MatmulMatchesReference) {
  const DType dt = GetParam();
  const MatmulCase cases[] = {
      {{1, 1}, {1, 1}, false, false},      {{7, 33}, {33, 5}, false, false},
      {{33, 7}, {1000, 33}, true, true},   {{65, 257}, {257, 300}, false, false},
      {{257, 65}, {257, 300}, true, false}, {{65, 257}, {300, 257}, false, true},
      {{3, 17, 9}, {9, 70}, false, false},  {{2, 9, 17}, {2, 70, 9}, true, true},
  };
  for (const auto& c : cases) {
    for (const auto& v : registry.of<MatmulArgs>().variants()) {
      if (v.info.backend != Backend::kCpu) continue;
      SCOPED_TRACE(v.info.name + " " + dname(dt) + " a" + shape_to_string(c.a) + " b" +
                   shape_to_string(c.b) + " ta=" + std::to_string(c.ta) + " tb=" + std::to_string(c.tb) +
                   " seed=" + std::to_string(testing::seed()));
      Tensor a = random_tensor(dt, c.a, rng), b = random_tensor(dt, c.b, rng);
      auto dims = matmul_dims(a.view(), b.view(), c.ta, c.tb);
      ASSERT_TRUE(dims.ok()) << dims.status().to_string();
      Tensor out(dt, matmul_output_shape(*dims, static_cast<int>(c.a.size())));
      poison(out);
      MatmulArgs args{a.view(), b.view(), out.view(), c.ta, c.tb};
      run(v, args);
      const double err = reference::relative_frobenius_error(out.view(), reference::matmul(args));
      EXPECT_LE(err, reference::tolerance(dt));
    }
  }
}

TEST_P(CpuKernels, SoftmaxMatchesReference) {
  const DType dt = GetParam();
  const Shape shapes[] = {{1}, {7}, {3, 33}, {2, 5, 1000}, {1, 4097}, {2, 1, 1, 3}};
  for (const auto& shape : shapes) {
    for (float spread : {1.0f, 30.0f}) {  // 30: large logits, where a naive exp overflows
      for (const auto& v : registry.of<SoftmaxArgs>().variants()) {
        if (v.info.backend != Backend::kCpu) continue;
        SCOPED_TRACE(v.info.name + " " + dname(dt) + " " + shape_to_string(shape) +
                     " spread=" + std::to_string(spread));
        Tensor x = random_tensor(dt, shape, rng, spread), y(dt, shape);
        poison(y);
        SoftmaxArgs args{x.view(), y.view()};
        run(v, args);
        EXPECT_LE(reference::relative_frobenius_error(y.view(), reference::softmax(args)),
                  reference::tolerance(dt));
      }
    }
  }
}

// Rows holding -inf (every third entry, the first one included): zeros there, never NaN.
TEST_P(CpuKernels, SoftmaxRowsWithMinusInfinity) {
  const DType dt = GetParam();
  const Shape shapes[] = {{7}, {3, 33}, {2, 5, 1000}, {1, 4097}, {1000, 7}};
  for (const auto& shape : shapes) {
    for (const auto& v : registry.of<SoftmaxArgs>().variants()) {
      if (v.info.backend != Backend::kCpu) continue;
      SCOPED_TRACE(v.info.name + " " + dname(dt) + " " + shape_to_string(shape));
      Tensor x = random_tensor(dt, shape, rng, 4.0f), y(dt, shape);
      mask_every(x, 3);
      poison(y);
      SoftmaxArgs args{x.view(), y.view()};
      run(v, args);
      EXPECT_LE(reference::relative_frobenius_error(y.view(), reference::softmax(args)), reference::tolerance(dt));
      for (std::size_t i = 0; i < static_cast<std::size_t>(y.numel()); i += 3) ASSERT_EQ(y.get(i), 0.0f) << i;
    }
  }
}

struct AttentionCase {
  std::int64_t b, hq, hkv, sq, sk, d;
};

TEST_P(CpuKernels, AttentionMatchesReference) {
  const DType dt = GetParam();
  const AttentionCase cases[] = {
      {1, 1, 1, 1, 1, 64},     {2, 4, 2, 17, 33, 64}, {1, 8, 2, 1, 1000, 128},
      {1, 2, 1, 33, 7, 32},    {1, 2, 2, 100, 100, 128}, {2, 3, 3, 7, 1, 16},
  };
  for (const auto& c : cases)
    for (bool causal : {false, true})
      for (float scale : {0.0f, 0.3f})
        for (const auto& v : registry.of<AttentionArgs>().variants()) {
          if (v.info.backend != Backend::kCpu) continue;
          SCOPED_TRACE(v.info.name + " " + dname(dt) + " B" + std::to_string(c.b) + " Hq" +
                       std::to_string(c.hq) + " Hkv" + std::to_string(c.hkv) + " Sq" +
                       std::to_string(c.sq) + " Sk" + std::to_string(c.sk) + " D" +
                       std::to_string(c.d) + (causal ? " causal" : "") + " scale=" +
                       std::to_string(scale));
          Tensor q = random_tensor(dt, {c.b, c.hq, c.sq, c.d}, rng);
          Tensor k = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
          Tensor vv = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
          Tensor o(dt, q.shape()), lse(DType::kFloat32, {c.b, c.hq, c.sq});
          poison(o);
          poison(lse);
          AttentionArgs args{q.view(), k.view(), vv.view(), o.view(), lse.view(), causal,
                             resolve_attention_scale(scale, c.d)};
          run(v, args);
          std::vector<double> want_lse;
          const auto want = reference::attention(args, &want_lse);
          EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt));
          EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-5);
        }
}

// Sliding windows (left only, right only, both, window 0, with and without causal) and
// soft-capping (50 and 5, with logits large enough that capping changes the answer).
struct AttentionOptionsCase {
  bool causal;
  std::int64_t left, right;
  float softcap;
};

const AttentionOptionsCase kOptionCases[] = {
    {false, 5, -1, 0.0f},  {false, -1, 3, 0.0f}, {false, 7, 2, 0.0f},   {true, 6, -1, 0.0f},
    {true, -1, 4, 0.0f},   {false, 0, 0, 0.0f},  {true, 0, -1, 0.0f},   {false, -1, 0, 0.0f},
    {false, -1, -1, 50.0f}, {true, -1, -1, 5.0f}, {true, 100, -1, 5.0f}, {false, 300, 200, 50.0f},
};

std::string options_name(const AttentionOptionsCase& o) {
  return std::string(o.causal ? " causal" : "") + " window=(" + std::to_string(o.left) + "," +
         std::to_string(o.right) + ") softcap=" + std::to_string(o.softcap);
}

TEST_P(CpuKernels, AttentionWindowsAndSoftcapMatchReference) {
  const DType dt = GetParam();
  // Sq > Sk, Sq = 1, one key, and a long one (Sq 1000, Sk 1031) so that cpu_flash walks several
  // key blocks of 512, skips some and slices the ones crossing a window edge.
  const AttentionCase cases[] = {
      {1, 1, 1, 1, 1, 64}, {2, 4, 2, 17, 33, 64}, {1, 2, 1, 33, 7, 32}, {1, 2, 2, 1, 77, 64},
      {1, 1, 1, 1000, 1031, 16},
  };
  int ran = 0;
  for (const auto& c : cases)
    for (const auto& opt : kOptionCases) {
      // Large logits (scaled scores of about 16 standard deviation) so that caps of 50 and 5 matter.
      Tensor q = random_tensor(dt, {c.b, c.hq, c.sq, c.d}, rng, 4.0f);
      Tensor k = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng, 4.0f);
      Tensor vv = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
      for (const auto& v : registry.of<AttentionArgs>().variants()) {
        if (v.info.backend != Backend::kCpu) continue;
        SCOPED_TRACE(v.info.name + " " + dname(dt) + " B" + std::to_string(c.b) + " Hq" + std::to_string(c.hq) +
                     " Hkv" + std::to_string(c.hkv) + " Sq" + std::to_string(c.sq) + " Sk" + std::to_string(c.sk) +
                     " D" + std::to_string(c.d) + options_name(opt) + " seed=" + std::to_string(testing::seed()));
        Tensor o(dt, q.shape()), lse(DType::kFloat32, {c.b, c.hq, c.sq});
        poison(o);
        poison(lse);
        AttentionArgs args{q.view(), k.view(), vv.view(), o.view(), lse.view(), opt.causal,
                           resolve_attention_scale(0.0f, c.d), opt.left, opt.right, opt.softcap};
        ASSERT_TRUE(v.supports(args).ok()) << v.supports(args).to_string();
        run(v, args);
        std::vector<double> want_lse;
        const auto want = reference::attention(args, &want_lse);
        EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt));
        EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-5);
        if (opt.softcap > 0.0f && c.sk > 1) {  // the cap changes the answer: the test can tell
          AttentionArgs plain = args;
          plain.softcap = 0.0f;
          std::vector<double> plain_lse;
          reference::attention(plain, &plain_lse);
          EXPECT_GT(reference::lse_error(lse.view(), plain_lse), 1e-3);
        }
        ++ran;
      }
    }
  EXPECT_GE(ran, 2 * static_cast<int>(std::size(cases) * std::size(kOptionCases)));
}

// Attention sinks (gpt-oss): random, large positive (the sink takes nearly all the weight) and
// very negative (it takes none) logits per query head, alone and with windows and soft caps,
// GQA groups of 3 and 7, rows that see no key (causal with Sq > Sk: zeros, lse = the sink).
TEST_P(CpuKernels, AttentionSinksMatchReference) {
  const DType dt = GetParam();
  const AttentionCase cases[] = {
      {1, 1, 1, 1, 1, 64}, {2, 6, 2, 17, 33, 64}, {1, 7, 1, 33, 7, 32}, {1, 3, 1, 1, 1000, 16},
      {1, 2, 1, 1000, 1031, 16},
  };
  const AttentionOptionsCase options[] = {
      {false, -1, -1, 0.0f}, {true, -1, -1, 0.0f}, {true, 5, -1, 0.0f}, {false, 0, 1, 0.0f},
      {true, -1, -1, 5.0f},  {false, 7, 2, 50.0f},
  };
  int ran = 0;
  for (const auto& c : cases)
    for (const auto& opt : options)
      // Large sinks: 30 over scores of about 4 standard deviations. float16 outputs, about
      // e^(s - sink) |v|, would fall into its subnormals: a sink of 4 over scores of about 1 there.
      for (float sink_scale : {1.0f, dt == DType::kFloat16 ? 4.0f : 30.0f, -1e4f}) {
        const float spread = dt == DType::kFloat16 ? 1.0f : 2.0f;
        Tensor q = random_tensor(dt, {c.b, c.hq, c.sq, c.d}, rng, spread);
        Tensor k = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng, spread);
        Tensor vv = random_tensor(dt, {c.b, c.hkv, c.sk, c.d}, rng);
        // Random around 0, around +30 (+4) or around -1e4.
        Tensor sinks = random_tensor(DType::kFloat32, {c.hq}, rng);
        if (sink_scale != 1.0f)
          for (std::size_t h = 0; h < static_cast<std::size_t>(c.hq); ++h)
            sinks.set(h, sink_scale + sinks.get(h));
        for (const auto& v : registry.of<AttentionArgs>().variants()) {
          if (v.info.backend != Backend::kCpu) continue;
          SCOPED_TRACE(v.info.name + " " + dname(dt) + " Hq" + std::to_string(c.hq) + " Hkv" +
                       std::to_string(c.hkv) + " Sq" + std::to_string(c.sq) + " Sk" + std::to_string(c.sk) +
                       options_name(opt) + " sinks~" + std::to_string(sink_scale) +
                       " seed=" + std::to_string(testing::seed()));
          Tensor o(dt, q.shape()), lse(DType::kFloat32, {c.b, c.hq, c.sq});
          poison(o);
          poison(lse);
          AttentionArgs args{q.view(), k.view(), vv.view(), o.view(), lse.view(), opt.causal,
                             resolve_attention_scale(0.0f, c.d), opt.left, opt.right, opt.softcap};
          args.sinks = sinks.view();
          ASSERT_TRUE(v.supports(args).ok()) << v.supports(args).to_string();
          run(v, args);
          std::vector<double> want_lse;
          const auto want = reference::attention(args, &want_lse);
          EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt));
          EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-5);
          // Sinks near 30 outweigh the keys and change the answer: the test can tell.
          if (sink_scale > 10.0f) {
            AttentionArgs plain = args;
            plain.sinks = {};
            std::vector<double> plain_lse;
            reference::attention(plain, &plain_lse);
            EXPECT_GT(reference::lse_error(lse.view(), plain_lse), 1e-4);
          }
          ++ran;
        }
      }
  EXPECT_GE(ran, 2 * static_cast<int>(std::size(cases) * std::size(options) * 3));
}

// Rows that see no key (causal, Sq > Sk): zeros, and lse = the sink (not -inf) with sinks.
TEST_P(CpuKernels, AttentionSinksOnRowsThatSeeNoKey) {
  const DType dt = GetParam();
  Tensor q = random_tensor(dt, {1, 2, 9, 16}, rng), k = random_tensor(dt, {1, 1, 4, 16}, rng),
         vv = random_tensor(dt, {1, 1, 4, 16}, rng);
  Tensor sinks = Tensor::from_floats(DType::kFloat32, {2}, {0.5f, -3.0f});
  for (const auto& v : registry.of<AttentionArgs>().variants()) {
    if (v.info.backend != Backend::kCpu) continue;
    SCOPED_TRACE(v.info.name);
    Tensor o(dt, q.shape()), lse(DType::kFloat32, {1, 2, 9});
    poison(o);
    poison(lse);
    AttentionArgs args{q.view(), k.view(), vv.view(), o.view(), lse.view(), true, 0.25f};
    args.sinks = sinks.view();
    run(v, args);
    for (std::size_t h = 0; h < 2; ++h)
      for (std::size_t i = 0; i < 5; ++i) {  // rows 0..4 sit before the first key
        EXPECT_EQ(lse.get(h * 9 + i), sinks.get(h)) << "row " << i;
        for (std::size_t c = 0; c < 16; ++c) EXPECT_EQ(o.get((h * 9 + i) * 16 + c), 0.0f);
      }
    std::vector<double> want_lse;
    const auto want = reference::attention(args, &want_lse);
    EXPECT_LE(reference::relative_frobenius_error(o.view(), want), reference::tolerance(dt));
    EXPECT_LE(reference::lse_error(lse.view(), want_lse), 1e-5);
  }
}

INSTANTIATE_TEST_SUITE_P(AllDTypes, CpuKernels,
                         ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                         [](const auto& param_info) { return dname(param_info.param); });

// The reference's window and soft cap against a brute-force double loop that spells the rule
// out per key (position p = i + Sk - Sq; causal: j <= p; else j <= p + right; j >= p - left).
TEST(ReferenceCheck, WindowAndSoftcapMatchBruteForce) {
  std::mt19937_64 rng(testing::seed());
  const std::int64_t shapes[][3] = {{7, 7, 8}, {9, 4, 8}, {3, 20, 16}, {1, 13, 8}};  // Sq, Sk, D
  for (const auto& sh : shapes)
    for (const auto& opt : kOptionCases) {
      const std::int64_t sq = sh[0], sk = sh[1], d = sh[2];
      SCOPED_TRACE("Sq" + std::to_string(sq) + " Sk" + std::to_string(sk) + options_name(opt));
      Tensor q = random_tensor(DType::kFloat32, {1, 2, sq, d}, rng, 3.0f);
      Tensor k = random_tensor(DType::kFloat32, {1, 1, sk, d}, rng, 3.0f);
      Tensor v = random_tensor(DType::kFloat32, {1, 1, sk, d}, rng);
      Tensor o(DType::kFloat32, q.shape());
      const double scale = 0.7;
      AttentionArgs args{q.view(), k.view(), v.view(), o.view(), {}, opt.causal, static_cast<float>(scale),
                         opt.left, opt.right, opt.softcap};
      std::vector<double> got_lse;
      const auto got = reference::attention(args, &got_lse);
      const auto* qp = static_cast<const float*>(q.data());
      const auto* kp = static_cast<const float*>(k.data());
      const auto* vp = static_cast<const float*>(v.data());
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t i = 0; i < sq; ++i) {
          const std::int64_t p = i + sk - sq;
          std::vector<double> w(static_cast<std::size_t>(sk), 0.0);
          double mx = -INFINITY;
          for (std::int64_t j = 0; j < sk; ++j) {
            bool seen = true;
            if (opt.causal) seen &= j <= p;
            else if (opt.right >= 0) seen &= j <= p + opt.right;
            if (opt.left >= 0) seen &= j >= p - opt.left;
            if (!seen) continue;
            double s = 0.0;
            for (std::int64_t c = 0; c < d; ++c) s += double(qp[(h * sq + i) * d + c]) * double(kp[j * d + c]);
            s *= double(static_cast<float>(scale));
            if (opt.softcap > 0) s = double(opt.softcap) * std::tanh(s / double(opt.softcap));
            w[static_cast<std::size_t>(j)] = s;
            mx = std::max(mx, s);
          }
          double sum = 0.0;
          std::vector<double> want(static_cast<std::size_t>(d), 0.0);
          for (std::int64_t j = 0; j < sk; ++j) {
            bool seen = true;
            if (opt.causal) seen &= j <= p;
            else if (opt.right >= 0) seen &= j <= p + opt.right;
            if (opt.left >= 0) seen &= j >= p - opt.left;
            if (!seen) continue;
            const double e = std::exp(w[static_cast<std::size_t>(j)] - mx);
            sum += e;
            for (std::int64_t c = 0; c < d; ++c) want[static_cast<std::size_t>(c)] += e * vp[j * d + c];
          }
          const std::size_t row = static_cast<std::size_t>(h * sq + i);
          if (sum == 0.0) {
            EXPECT_EQ(got_lse[row], -INFINITY) << "row " << i;
          } else {
            EXPECT_NEAR(got_lse[row], mx + std::log(sum), 1e-9) << "row " << i;
          }
          for (std::int64_t c = 0; c < d; ++c) {
            const double wv = sum == 0.0 ? 0.0 : want[static_cast<std::size_t>(c)] / sum;
            EXPECT_NEAR(got[row * static_cast<std::size_t>(d) + static_cast<std::size_t>(c)], wv, 1e-9)
                << "row " << i << " col " << c;
          }
        }
    }
}

// The reference's sinks against gpt-oss's definition spelled out: the sink logit appended as an
// extra column after scaling, capping and masking, softmax over the row, the column dropped; the
// lse the log of the whole denominator.
TEST(ReferenceCheck, SinksMatchAnExtraSoftmaxColumn) {
  std::mt19937_64 rng(testing::seed());
  for (bool causal : {false, true})
    for (float cap : {0.0f, 2.0f}) {
      const std::int64_t sq = 5, sk = 3, d = 8;  // causal with Sq > Sk: rows 0, 1 see no key
      Tensor q = random_tensor(DType::kFloat32, {1, 2, sq, d}, rng, 2.0f);
      Tensor k = random_tensor(DType::kFloat32, {1, 1, sk, d}, rng, 2.0f);
      Tensor v = random_tensor(DType::kFloat32, {1, 1, sk, d}, rng);
      Tensor sinks = random_tensor(DType::kFloat32, {2}, rng, 2.0f);
      Tensor o(DType::kFloat32, q.shape());
      AttentionArgs args{q.view(), k.view(), v.view(), o.view(), {}, causal, 0.5f, -1, -1, cap};
      args.sinks = sinks.view();
      std::vector<double> got_lse;
      const auto got = reference::attention(args, &got_lse);
      for (std::int64_t h = 0; h < 2; ++h)
        for (std::int64_t i = 0; i < sq; ++i) {
          std::vector<double> cols;  // the visible keys' scores, then the sink
          for (std::int64_t j = 0; j < sk; ++j) {
            if (causal && j > i + sk - sq) continue;
            double s = 0.0;
            for (std::int64_t c = 0; c < d; ++c) s += double(q.get(std::size_t((h * sq + i) * d + c))) * k.get(std::size_t(j * d + c));
            s *= 0.5;
            if (cap > 0) s = cap * std::tanh(s / cap);
            cols.push_back(s);
          }
          cols.push_back(sinks.get(std::size_t(h)));
          double denom = 0.0;
          for (double x : cols) denom += std::exp(x);
          const std::size_t row = static_cast<std::size_t>(h * sq + i);
          EXPECT_NEAR(got_lse[row], std::log(denom), 1e-9);
          for (std::int64_t c = 0; c < d; ++c) {
            double want = 0.0;
            std::size_t n = 0;
            for (std::int64_t j = 0; j < sk; ++j) {
              if (causal && j > i + sk - sq) continue;
              want += std::exp(cols[n++]) / denom * v.get(std::size_t(j * d + c));
            }
            EXPECT_NEAR(got[row * std::size_t(d) + std::size_t(c)], want, 1e-9);
          }
        }
    }
}

// The checks above must be able to fail: a NaN, a missing element or a small error is caught.
TEST(ReferenceCheck, RejectsNanMissingAndWrongValues) {
  const std::vector<double> want{1.0, 2.0, 3.0};
  EXPECT_EQ(reference::relative_frobenius_error(std::vector<double>{1.0, 2.0, 3.0}, want), 0.0);
  EXPECT_TRUE(std::isinf(
      reference::relative_frobenius_error(std::vector<double>{1.0, std::nan(""), 3.0}, want)));
  EXPECT_TRUE(std::isinf(reference::relative_frobenius_error(std::vector<double>{1.0, 2.0}, want)));
  EXPECT_GT(reference::relative_frobenius_error(std::vector<double>{1.0, 2.0, 3.001}, want),
            reference::tolerance(DType::kFloat32));
  // The LSE check: absolute near 0, relative beyond 1, NaN and a missing -inf fail.
  Tensor l = Tensor::from_floats(DType::kFloat32, {3}, {0.001f, -5.0f, -INFINITY});
  EXPECT_LT(reference::lse_error(l.view(), {0.001, -5.0, -INFINITY}), 1e-7);
  EXPECT_NEAR(reference::lse_error(l.view(), {0.001 + 2e-5, -5.0, -INFINITY}), 2e-5, 1e-7);
  EXPECT_NEAR(reference::lse_error(l.view(), {0.001, -5.0005, -INFINITY}), 1e-4, 1e-6);
  EXPECT_TRUE(std::isinf(reference::lse_error(l.view(), {0.001, -5.0, 0.0})));
  l.set(0, std::nanf(""));
  EXPECT_TRUE(std::isinf(reference::lse_error(l.view(), {0.001, -5.0, -INFINITY})));
  // A poisoned tensor compared with anything finite fails.
  Tensor t(DType::kBFloat16, {3});
  testing::poison(t);
  EXPECT_GT(reference::relative_frobenius_error(t.view(), want), 1.0);
}

// The matmul check: a sum that cancels (3 - 2.9999998 in float32: the true result is one ulp of
// 3, a float32 kernel may round it to 0) passes on its rounding; a wrong element, a NaN and
// well-spread inputs are judged exactly as relative_frobenius_error judges them.
TEST(ReferenceCheck, MatmulErrorFloorsCancellingSumsAndStillCatchesWrongValues) {
  Tensor a = Tensor::from_floats(DType::kFloat32, {1, 2}, {1.0f, 1.0f});
  Tensor b = Tensor::from_floats(DType::kFloat32, {2, 1}, {3.0f, std::nextafter(-3.0f, 0.0f)});
  Tensor c = Tensor::from_floats(DType::kFloat32, {1, 1}, {0.0f});
  MatmulArgs args{a.view(), b.view(), c.view()};
  EXPECT_GT(reference::relative_frobenius_error(c.view(), reference::matmul(args)), 0.5);
  EXPECT_LT(reference::matmul_error(c.view(), args), 1e-7);  // 2.4e-7 against products of size 3
  c.set(0, 0.01f);
  EXPECT_GT(reference::matmul_error(c.view(), args), reference::tolerance(DType::kFloat32));
  c.set(0, std::nanf(""));
  EXPECT_TRUE(std::isinf(reference::matmul_error(c.view(), args)));
  // Well-spread inputs: the same number as relative_frobenius_error.
  std::mt19937_64 r(testing::seed());
  Tensor x = random_tensor(DType::kFloat32, {9, 70}, r), y = random_tensor(DType::kFloat32, {70, 11}, r);
  Tensor z = random_tensor(DType::kFloat32, {9, 11}, r);
  MatmulArgs unrelated{x.view(), y.view(), z.view()};
  EXPECT_DOUBLE_EQ(reference::matmul_error(z.view(), unrelated),
                   reference::relative_frobenius_error(z.view(), reference::matmul(unrelated)));
}

TEST(Registry, SelectsByNameAndExplainsRefusals) {
  const Registry& r = default_registry();
  Tensor a(DType::kFloat32, {2, 3}), b(DType::kFloat32, {3, 4}), c(DType::kFloat32, {2, 4});
  MatmulArgs args{a.view(), b.view(), c.view()};
  const Target cpu{Backend::kCpu, 0};
  auto picked = r.of<MatmulArgs>().select(args, "", cpu);
  ASSERT_TRUE(picked.ok());
  EXPECT_EQ((*picked)->info.backend, Backend::kCpu);
  auto unknown = r.of<MatmulArgs>().select(args, "matmul/nope", cpu);
  EXPECT_EQ(unknown.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(unknown.status().message().find("matmul/cpu_blocked"), std::string::npos);
  // A CPU variant on a CUDA target is refused with the reason.
  auto other = r.of<MatmulArgs>().select(args, "matmul/cpu_blocked", Target{Backend::kCuda, 90});
  EXPECT_EQ(other.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(other.status().message().find("cpu backend"), std::string::npos);
  for (const VariantInfo* info : r.all()) {
    EXPECT_EQ(info->name.rfind(std::string(op_name(info->op)) + "/", 0), 0u) << info->name;
    EXPECT_FALSE(info->dtypes.empty()) << info->name;
  }
}

}  // namespace
}  // namespace attn
