#include "reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace attn::reference {
namespace {

double at(const TensorView& t, std::int64_t i) {
  return static_cast<double>(load_as_float(t.data, t.dtype, static_cast<std::size_t>(i)));
}

// C = op(A) op(B) in float64; with `magnitudes`, |op(A)| |op(B)| instead (each product's size,
// what rounding errors scale with).
std::vector<double> matmul_products(const MatmulArgs& args, bool magnitudes) {
  const auto d = matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b).value();
  std::vector<double> c(static_cast<std::size_t>(d.batch * d.m * d.n), 0.0);
  for (std::int64_t b = 0; b < d.batch; ++b) {
    const std::int64_t a_off = b * d.m * d.k, b_off = d.b_batched ? b * d.k * d.n : 0;
    for (std::int64_t i = 0; i < d.m; ++i)
      for (std::int64_t j = 0; j < d.n; ++j) {
        double s = 0.0;
        for (std::int64_t kk = 0; kk < d.k; ++kk) {
          const double a = at(args.a, a_off + (args.transpose_a ? kk * d.m + i : i * d.k + kk));
          const double bb = at(args.b, b_off + (args.transpose_b ? j * d.k + kk : kk * d.n + j));
          s += magnitudes ? std::abs(a * bb) : a * bb;
        }
        c[static_cast<std::size_t>((b * d.m + i) * d.n + j)] = s;
      }
  }
  return c;
}

}  // namespace

std::vector<double> matmul(const MatmulArgs& args) { return matmul_products(args, false); }

double matmul_error(const TensorView& got, const MatmulArgs& args) {
  const std::vector<double> want = matmul_products(args, false);
  const std::vector<double> size = matmul_products(args, true);
  const std::int64_t k = matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b).value().k;
  if (static_cast<std::size_t>(got.numel()) != want.size()) return std::numeric_limits<double>::infinity();
  double num = 0.0, want_sq = 0.0, size_sq = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double g = at(got, static_cast<std::int64_t>(i));
    if (!std::isfinite(g)) return std::numeric_limits<double>::infinity();
    num += (g - want[i]) * (g - want[i]);
    want_sq += want[i] * want[i];
    size_sq += size[i] * size[i];
  }
  // Random inputs give ||C|| about sqrt(k) * (size per product), above the floor, so the floor
  // only acts where the sums cancel.
  const double den = std::max(want_sq, size_sq / static_cast<double>(std::max<std::int64_t>(k, 1)));
  if (den == 0.0) return num == 0.0 ? 0.0 : std::sqrt(num);
  return std::sqrt(num / den);
}

std::vector<double> softmax(const SoftmaxArgs& args) {
  const auto d = softmax_dims(args.x).value();
  std::vector<double> y(static_cast<std::size_t>(d.rows * d.cols));
  for (std::int64_t r = 0; r < d.rows; ++r) {
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int64_t c = 0; c < d.cols; ++c) mx = std::max(mx, at(args.x, r * d.cols + c));
    double sum = 0.0;
    for (std::int64_t c = 0; c < d.cols; ++c) sum += std::exp(at(args.x, r * d.cols + c) - mx);
    for (std::int64_t c = 0; c < d.cols; ++c)
      y[static_cast<std::size_t>(r * d.cols + c)] = std::exp(at(args.x, r * d.cols + c) - mx) / sum;
  }
  return y;
}

std::vector<double> attention(const AttentionArgs& args, std::vector<double>* lse) {
  const auto d = attention_dims(args.q, args.k, args.v).value();
  const double scale = resolve_attention_scale(args.scale, d.head_dim);
  std::vector<double> o(static_cast<std::size_t>(d.batch * d.heads_q * d.len_q * d.head_dim), 0.0);
  if (lse) lse->assign(static_cast<std::size_t>(d.batch * d.heads_q * d.len_q), 0.0);
  std::vector<double> s(static_cast<std::size_t>(d.len_kv));
  for (std::int64_t b = 0; b < d.batch; ++b)
    for (std::int64_t h = 0; h < d.heads_q; ++h) {
      const std::int64_t kvh = h / (d.heads_q / d.heads_kv);
      const std::int64_t q_off = ((b * d.heads_q + h) * d.len_q) * d.head_dim;
      const std::int64_t kv_off = ((b * d.heads_kv + kvh) * d.len_kv) * d.head_dim;
      for (std::int64_t i = 0; i < d.len_q; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < d.len_kv; ++j) {
          if (args.causal && !causal_visible(i, j, d.len_q, d.len_kv)) {
            s[j] = -std::numeric_limits<double>::infinity();
            continue;
          }
          double dot = 0.0;
          for (std::int64_t c = 0; c < d.head_dim; ++c)
            dot += at(args.q, q_off + i * d.head_dim + c) * at(args.k, kv_off + j * d.head_dim + c);
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        const std::size_t row = static_cast<std::size_t>((b * d.heads_q + h) * d.len_q + i);
        if (std::isinf(mx)) {  // no visible key: zeros, lse = -inf
          if (lse) (*lse)[row] = -std::numeric_limits<double>::infinity();
          continue;
        }
        double sum = 0.0;
        for (std::int64_t j = 0; j < d.len_kv; ++j) sum += std::isinf(s[j]) ? 0.0 : std::exp(s[j] - mx);
        for (std::int64_t j = 0; j < d.len_kv; ++j) {
          if (std::isinf(s[j])) continue;
          const double p = std::exp(s[j] - mx) / sum;
          for (std::int64_t c = 0; c < d.head_dim; ++c)
            o[row * d.head_dim + c] += p * at(args.v, kv_off + j * d.head_dim + c);
        }
        if (lse) (*lse)[row] = mx + std::log(sum);
      }
    }
  return o;
}

double lse_error(const TensorView& got, const std::vector<double>& want) {
  if (static_cast<std::size_t>(got.numel()) != want.size()) return std::numeric_limits<double>::infinity();
  double worst = 0.0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double g = load_as_float(got.data, got.dtype, i);
    if (!std::isfinite(g) || !std::isfinite(want[i])) {
      if (g == want[i]) continue;
      return std::numeric_limits<double>::infinity();
    }
    worst = std::max(worst, std::abs(g - want[i]) / std::max(1.0, std::abs(want[i])));
  }
  return worst;
}

double relative_frobenius_error(const std::vector<double>& got, const std::vector<double>& want) {
  if (got.size() != want.size()) return std::numeric_limits<double>::infinity();
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const bool want_finite = std::isfinite(want[i]);
    if (!std::isfinite(got[i]) || !want_finite) {
      // Non-finite values must match exactly (e.g. lse = -inf for a fully masked row).
      if (got[i] == want[i]) continue;
      return std::numeric_limits<double>::infinity();
    }
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  if (den == 0.0) return num == 0.0 ? 0.0 : std::sqrt(num);
  return std::sqrt(num / den);
}

double relative_frobenius_error(const TensorView& got, const std::vector<double>& want) {
  std::vector<double> g(static_cast<std::size_t>(got.numel()));
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = at(got, static_cast<std::int64_t>(i));
  return relative_frobenius_error(g, want);
}

double tolerance(DType t) {
  switch (t) {
    case DType::kFloat32: return 1e-5;
    case DType::kFloat16: return 1e-2;
    case DType::kBFloat16: return 1e-2;
  }
  return 0.0;
}

}  // namespace attn::reference
