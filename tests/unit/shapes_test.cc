#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <utility>

#include "attn/ops.h"

namespace attn {
namespace {

using ::testing::HasSubstr;

TensorView view(DType t, Shape s) { return {t, std::move(s), nullptr, MemoryKind::kHost}; }

TEST(Shapes, ElementCountChecks) {
  EXPECT_EQ(*checked_element_count({2, 3, 4}, "x.shape"), 24);
  auto zero = checked_element_count({2, 0}, "x.shape");
  ASSERT_FALSE(zero.ok());
  EXPECT_EQ(zero.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(zero.status().message(), HasSubstr("x.shape[1]"));
  EXPECT_THAT(zero.status().message(), HasSubstr("got 0"));
  auto negative = checked_element_count({-3}, "x.shape");
  EXPECT_THAT(negative.status().message(), HasSubstr("got -3"));
  auto overflow = checked_element_count({1LL << 32, 1LL << 32}, "x.shape");
  ASSERT_FALSE(overflow.ok());
  EXPECT_THAT(overflow.status().message(), HasSubstr("overflows"));
}

TEST(Shapes, MatmulDims) {
  auto d = matmul_dims(view(DType::kFloat32, {3, 5, 7}), view(DType::kFloat32, {7, 2}), false, false);
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->batch, 3);
  EXPECT_EQ(d->m, 5);
  EXPECT_EQ(d->k, 7);
  EXPECT_EQ(d->n, 2);
  EXPECT_FALSE(d->b_batched);
  auto t = matmul_dims(view(DType::kFloat32, {7, 5}), view(DType::kFloat32, {2, 7}), true, true);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ(t->m, 5);
  EXPECT_EQ(t->n, 2);
  EXPECT_EQ(matmul_output_shape(*t, 2), (Shape{5, 2}));
}

TEST(Shapes, MatmulRefusals) {
  const auto f = DType::kFloat32;
  auto inner = matmul_dims(view(f, {4, 5}), view(f, {6, 2}), false, false);
  EXPECT_THAT(inner.status().message(), HasSubstr("inner dimensions differ"));
  auto rank = matmul_dims(view(f, {4}), view(f, {4, 2}), false, false);
  EXPECT_THAT(rank.status().message(), HasSubstr("a.shape: expected rank 2"));
  auto dtype = matmul_dims(view(f, {4, 4}), view(DType::kFloat16, {4, 4}), false, false);
  EXPECT_THAT(dtype.status().message(), HasSubstr("b.dtype: expected float32"));
  auto batch = matmul_dims(view(f, {2, 4, 4}), view(f, {3, 4, 4}), false, false);
  EXPECT_THAT(batch.status().message(), HasSubstr("b.shape[0]"));
}

TEST(Shapes, AttentionRefusals) {
  const auto f = DType::kFloat32;
  EXPECT_TRUE(attention_dims(view(f, {1, 8, 5, 64}), view(f, {1, 2, 9, 64}), view(f, {1, 2, 9, 64})).ok());
  auto gqa = attention_dims(view(f, {1, 8, 5, 64}), view(f, {1, 3, 9, 64}), view(f, {1, 3, 9, 64}));
  EXPECT_THAT(gqa.status().message(), HasSubstr("multiple of the key/value heads"));
  auto d = attention_dims(view(f, {1, 8, 5, 64}), view(f, {1, 2, 9, 32}), view(f, {1, 2, 9, 32}));
  EXPECT_THAT(d.status().message(), HasSubstr("k.shape[3]"));
  auto vshape = attention_dims(view(f, {1, 8, 5, 64}), view(f, {1, 2, 9, 64}), view(f, {1, 2, 8, 64}));
  EXPECT_THAT(vshape.status().message(), HasSubstr("v.shape"));
  auto rank = attention_dims(view(f, {8, 5, 64}), view(f, {1, 2, 9, 64}), view(f, {1, 2, 9, 64}));
  EXPECT_THAT(rank.status().message(), HasSubstr("q.shape: expected rank 4"));
}

TEST(Shapes, CausalIsBottomRightAligned) {
  // Sq = 2, Sk = 5: row 0 sees keys 0..3, row 1 sees 0..4.
  EXPECT_TRUE(causal_visible(0, 3, 2, 5));
  EXPECT_FALSE(causal_visible(0, 4, 2, 5));
  EXPECT_TRUE(causal_visible(1, 4, 2, 5));
  // Sq = 5, Sk = 2: rows 0..2 see nothing, row 3 sees key 0.
  EXPECT_FALSE(causal_visible(2, 0, 5, 2));
  EXPECT_TRUE(causal_visible(3, 0, 5, 2));
  EXPECT_FALSE(causal_visible(3, 1, 5, 2));
}

// visible_keys(i, Sq, Sk, causal, left, right) -> [begin, end); query i sits at key i + Sk - Sq.
TEST(Shapes, VisibleKeysEdgeCases) {
  auto keys = [](std::int64_t i, std::int64_t sq, std::int64_t sk, bool causal, std::int64_t l, std::int64_t r) {
    const KeyRange k = visible_keys(i, sq, sk, causal, l, r);
    return std::make_pair(k.begin, k.end);
  };
  using P = std::pair<std::int64_t, std::int64_t>;
  // No mask: every key.
  EXPECT_EQ(keys(3, 7, 7, false, -1, -1), P(0, 7));
  // Causal with Sq > Sk (5 queries, 2 keys): rows 0..2 see nothing, row 3 key 0, row 4 both.
  EXPECT_EQ(keys(0, 5, 2, true, -1, -1), P(0, 0));
  EXPECT_EQ(keys(2, 5, 2, true, -1, -1), P(0, 0));
  EXPECT_EQ(keys(3, 5, 2, true, -1, -1), P(0, 1));
  EXPECT_EQ(keys(4, 5, 2, true, -1, -1), P(0, 2));
  // Window 0 on both sides: only the key at the query's own position.
  EXPECT_EQ(keys(2, 4, 4, false, 0, 0), P(2, 3));
  EXPECT_EQ(keys(0, 3, 10, false, 0, 0), P(7, 8));
  // Left only: 3 queries over 10 keys, row 0 at position 7 sees 5..9.
  EXPECT_EQ(keys(0, 3, 10, false, 2, -1), P(5, 10));
  EXPECT_EQ(keys(0, 10, 10, false, 2, -1), P(0, 10));  // clamped at key 0
  EXPECT_EQ(keys(0, 10, 10, false, 100, -1), P(0, 10));
  // Right only.
  EXPECT_EQ(keys(3, 10, 10, false, -1, 1), P(0, 5));
  EXPECT_EQ(keys(9, 10, 10, false, -1, 1), P(0, 10));  // clamped at Sk
  EXPECT_EQ(keys(3, 10, 10, false, -1, 0), P(0, 4));   // right 0 is causal
  // Right only with Sq > Sk: rows left of key 0 by more than the window see nothing.
  EXPECT_EQ(keys(0, 5, 2, false, -1, 1), P(0, 0));
  EXPECT_EQ(keys(1, 5, 2, false, -1, 1), P(0, 0));
  EXPECT_EQ(keys(2, 5, 2, false, -1, 1), P(0, 1));
  // Left only with Sq > Sk: the window starts left of key 0, every key is seen.
  EXPECT_EQ(keys(0, 5, 2, false, 0, -1), P(0, 2));
  // Causal + window: the right side is 0 whatever window_right says.
  EXPECT_EQ(keys(6, 10, 10, true, 3, 5), P(3, 7));
  EXPECT_EQ(keys(6, 10, 10, true, 3, -1), P(3, 7));
  EXPECT_EQ(keys(6, 10, 10, true, 0, -1), P(6, 7));
  EXPECT_EQ(keys(0, 5, 2, true, 1, -1), P(0, 0));  // still nothing before the diagonal
  // Empty ranges are never inverted.
  for (std::int64_t i = 0; i < 5; ++i) {
    const KeyRange k = visible_keys(i, 5, 2, true, 0, -1);
    EXPECT_LE(k.begin, k.end);
  }
  // has_window: a right side under causal is no window; anything else set is.
  AttentionArgs a;
  EXPECT_FALSE(has_window(a));
  a.causal = true;
  a.window_right = 4;
  EXPECT_FALSE(has_window(a));
  a.window_left = 0;
  EXPECT_TRUE(has_window(a));
  a.causal = false;
  a.window_left = -1;
  EXPECT_TRUE(has_window(a));
}

TEST(Shapes, AttentionOptionChecksNameTheField) {
  EXPECT_TRUE(check_attention_options(-1, -1, 0.0f).ok());
  EXPECT_TRUE(check_attention_options(0, 0, 50.0f).ok());
  EXPECT_THAT(check_attention_options(-2, -1, 0.0f).message(), HasSubstr("window_left: expected >= 0"));
  EXPECT_THAT(check_attention_options(-1, -5, 0.0f).message(), HasSubstr("window_right: expected >= 0"));
  EXPECT_THAT(check_attention_options(-1, -5, 0.0f).message(), HasSubstr("got -5"));
  EXPECT_THAT(check_attention_options(-1, -1, -1.0f).message(), HasSubstr("softcap:"));
  EXPECT_THAT(check_attention_options(-1, -1, std::nanf("")).message(), HasSubstr("softcap:"));
  EXPECT_THAT(check_attention_options(-1, -1, INFINITY).message(), HasSubstr("softcap:"));
}

TEST(Shapes, Costs) {
  MatmulArgs m{view(DType::kFloat32, {8, 16}), view(DType::kFloat32, {16, 4}),
               view(DType::kFloat32, {8, 4})};
  EXPECT_EQ(cost_of(m).flops, 2 * 8 * 16 * 4);
  EXPECT_EQ(cost_of(m).bytes, (8 * 16 + 16 * 4 + 8 * 4) * 4);
  AttentionArgs a;
  a.q = a.o = view(DType::kBFloat16, {2, 4, 128, 64});
  a.k = a.v = view(DType::kBFloat16, {2, 2, 128, 64});
  EXPECT_EQ(cost_of(a).flops, 4LL * 2 * 4 * 128 * 128 * 64);
  a.causal = true;
  EXPECT_EQ(cost_of(a).flops, 2LL * 2 * 4 * 128 * 128 * 64);
  // A window counts the pairs it keeps: causal with 15 keys to the left keeps 16 per row but
  // the first 15 rows' 1 + 2 + ... + 15.
  a.window_left = 15;
  EXPECT_EQ(cost_of(a).flops, 4LL * 2 * 4 * (128 * 16 - 15 * 16 / 2) * 64);
}

}  // namespace
}  // namespace attn
