#include "reference.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "attn/fp8.h"

namespace attn::reference {
namespace {

double at(const TensorView& t, std::int64_t i) {
  return static_cast<double>(load_as_float(t.data, t.dtype, static_cast<std::size_t>(i)));
}

// C[b, i, j] = op(A) op(B) in float64, the inputs read through `a` and `b` (index -> value); with
// `magnitudes`, |op(A)| |op(B)| instead (each product's size, what rounding errors scale with).
template <class A, class B>
double matmul_value(const MatmulDims& d, bool ta, bool tb, const A& a, const B& b, std::int64_t batch,
                    std::int64_t i, std::int64_t j, bool magnitudes) {
  const std::int64_t a_off = batch * d.m * d.k, b_off = d.b_batched ? batch * d.k * d.n : 0;
  double s = 0.0;
  for (std::int64_t kk = 0; kk < d.k; ++kk) {
    const double x = a(a_off + (ta ? kk * d.m + i : i * d.k + kk));
    const double y = b(b_off + (tb ? j * d.k + kk : kk * d.n + j));
    s += magnitudes ? std::abs(x * y) : x * y;
  }
  return s;
}

std::vector<double> matmul_products(const MatmulArgs& args, bool magnitudes) {
  const auto d = matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b).value();
  std::vector<double> c(static_cast<std::size_t>(d.batch * d.m * d.n), 0.0);
  auto a = [&](std::int64_t i) { return at(args.a, i); };
  auto b = [&](std::int64_t i) { return at(args.b, i); };
  for (std::int64_t bt = 0; bt < d.batch; ++bt)
    for (std::int64_t i = 0; i < d.m; ++i)
      for (std::int64_t j = 0; j < d.n; ++j)
        c[static_cast<std::size_t>((bt * d.m + i) * d.n + j)] =
            matmul_value(d, args.transpose_a, args.transpose_b, a, b, bt, i, j, magnitudes);
  return c;
}

// Row r of softmax(x) in float64 into y[0, cols).
template <class X>
void softmax_row(std::int64_t cols, const X& x, std::int64_t r, double* y) {
  double mx = -std::numeric_limits<double>::infinity();
  for (std::int64_t c = 0; c < cols; ++c) mx = std::max(mx, y[c] = x(r * cols + c));
  double sum = 0.0;
  for (std::int64_t c = 0; c < cols; ++c) sum += (y[c] = std::exp(y[c] - mx));
  for (std::int64_t c = 0; c < cols; ++c) y[c] /= sum;
}

// Output row (b, h, i) of attention in float64 into o[0, D); returns its log-sum-exp (-inf and
// zeros when the row sees no key; the sink then). Keys outside visible_keys (causal, window) are
// masked; with softcap > 0 each scaled score s becomes softcap * tanh(s / softcap); `sink` (null:
// none) joins the softmax's denominator with no value row. `s` is scratch of len_kv values.
template <class Q, class K, class V>
double attention_row(const AttentionDims& d, const AttentionArgs& args, double scale, const Q& q, const K& k,
                     const V& v, std::int64_t b, std::int64_t h, std::int64_t i, double* o, std::vector<double>& s,
                     const double* sink = nullptr) {
  const std::int64_t kvh = h / (d.heads_q / d.heads_kv);
  const std::int64_t q_off = ((b * d.heads_q + h) * d.len_q + i) * d.head_dim;
  const std::int64_t kv_off = ((b * d.heads_kv + kvh) * d.len_kv) * d.head_dim;
  const KeyRange keys = visible_keys(i, d.len_q, d.len_kv, args);
  const double cap = args.softcap;
  s.resize(static_cast<std::size_t>(d.len_kv));
  for (std::int64_t c = 0; c < d.head_dim; ++c) o[c] = 0.0;
  double mx = sink ? *sink : -std::numeric_limits<double>::infinity();
  bool any = false;
  for (std::int64_t j = 0; j < d.len_kv; ++j) {
    if (j < keys.begin || j >= keys.end) {
      s[j] = -std::numeric_limits<double>::infinity();
      continue;
    }
    double dot = 0.0;
    for (std::int64_t c = 0; c < d.head_dim; ++c) dot += q(q_off + c) * k(kv_off + j * d.head_dim + c);
    s[j] = dot * scale;
    if (cap > 0.0) s[j] = cap * std::tanh(s[j] / cap);
    mx = std::max(mx, s[j]);
    any = true;
  }
  if (!any) return sink ? *sink : -std::numeric_limits<double>::infinity();  // no visible key
  double sum = sink ? std::exp(*sink - mx) : 0.0;
  for (std::int64_t j = 0; j < d.len_kv; ++j) sum += std::isinf(s[j]) ? 0.0 : std::exp(s[j] - mx);
  for (std::int64_t j = 0; j < d.len_kv; ++j) {
    if (std::isinf(s[j])) continue;
    const double p = std::exp(s[j] - mx) / sum;
    for (std::int64_t c = 0; c < d.head_dim; ++c) o[c] += p * v(kv_off + j * d.head_dim + c);
  }
  return mx + std::log(sum);
}

// The sink of query head h as float64, or null when there are none (`store` holds it).
const double* sink_of(const TensorView& sinks, std::int64_t h, double& store) {
  if (sinks.empty()) return nullptr;
  store = at(sinks, h);
  return &store;
}

std::int64_t draw(std::mt19937_64& rng, std::int64_t n) {
  return static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(n));
}

// Sums of squared differences and of squared wanted values, for a relative Frobenius error.
struct ErrorSum {
  double diff = 0, want = 0;
  bool finite = true;
  void add(double got, double wanted) {
    finite &= std::isfinite(got);
    diff += (got - wanted) * (got - wanted);
    want += wanted * wanted;
  }
  double relative() const {
    if (!finite) return std::numeric_limits<double>::infinity();
    return want == 0.0 ? std::sqrt(diff) : std::sqrt(diff / want);
  }
};

// Sequence i's tokens 0..len-1 of one layer: the first len - fresh from the pages, the rest
// from the call's new rows starting at row `first_new` of k_new/v_new.
struct PagedSequenceReader {
  const PagedKvLayer& cache;
  const TensorView &k_new, &v_new;
  const std::int32_t* pages;  // the sequence's page table
  std::int64_t cached, first_new;

  double key(std::int64_t t, std::int64_t head, std::int64_t c) const { return element(cache.k, k_new, t, head, c); }
  double value(std::int64_t t, std::int64_t head, std::int64_t c) const { return element(cache.v, v_new, t, head, c); }
  double element(const void* pool, const TensorView& fresh, std::int64_t t, std::int64_t head, std::int64_t c) const {
    // float8: every token from the cache (the call's append has run), dequantized exactly.
    if (t >= cached && !cache.fp8())
      return at(fresh, ((first_new + t - cached) * cache.heads_kv + head) * cache.head_dim + c);
    const std::int64_t page = pages[t / cache.page_size];
    const auto i = static_cast<std::size_t>(cache.offset(page, head, t % cache.page_size) + c);
    if (!cache.fp8()) return load_as_float(pool, cache.dtype, i);
    const float* scales = pool == cache.k ? cache.k_scales : cache.v_scales;
    return static_cast<double>(fp8_e4m3_to_float(static_cast<const std::uint8_t*>(pool)[i])) *
           static_cast<double>(scales[page * cache.heads_kv + head]);
  }
};

// Rows [first_row, first_row + fresh) of q: sequence `seq`'s new tokens; token j (0-based among
// the new) sits at position len - fresh + j and sees the keys visible_keys gives it (causal,
// window), its scores soft-capped when softcap > 0, the head's sink in the denominator.
void paged_rows(const TensorView& q, const TensorView& k_new, const TensorView& v_new, const PagedKvLayer& cache,
                const PagedSequences& seqs, float scale_in, const AttentionMask& mask, float softcap,
                const TensorView& sinks, std::int64_t seq, std::int64_t first_row, std::int64_t fresh,
                std::vector<double>& o, std::vector<double>* lse) {
  const auto* indptr = static_cast<const std::int32_t*>(seqs.page_indptr.data);
  const std::int64_t len = static_cast<const std::int32_t*>(seqs.seq_lens.data)[seq];
  const PagedSequenceReader r{cache, k_new, v_new, static_cast<const std::int32_t*>(seqs.page_indices.data) + indptr[seq],
                              len - fresh, first_row};
  const std::int64_t hq = q.dim(1), d = q.dim(2), group = hq / cache.heads_kv;
  const double scale = resolve_attention_scale(scale_in, d), cap = softcap;
  std::vector<double> s(static_cast<std::size_t>(len));
  for (std::int64_t j = 0; j < fresh; ++j) {
    const std::int64_t row = first_row + j;
    const KeyRange keys = visible_keys(j, fresh, len, mask.causal, mask.window_left, mask.window_right);
    for (std::int64_t h = 0; h < hq; ++h) {
      const std::int64_t hk = h / group;
      double sink_store = 0.0;
      const double* sink = sink_of(sinks, h, sink_store);
      double mx = sink ? *sink : -std::numeric_limits<double>::infinity();
      for (std::int64_t t = keys.begin; t < keys.end; ++t) {
        double dot = 0.0;
        for (std::int64_t c = 0; c < d; ++c) dot += at(q, (row * hq + h) * d + c) * r.key(t, hk, c);
        s[t] = dot * scale;
        if (cap > 0.0) s[t] = cap * std::tanh(s[t] / cap);
        mx = std::max(mx, s[t]);
      }
      double* out = o.data() + (row * hq + h) * d;
      if (keys.end <= keys.begin) {  // no key: zeros, lse the sink or -inf
        if (lse) (*lse)[static_cast<std::size_t>(row * hq + h)] = sink ? *sink : -std::numeric_limits<double>::infinity();
        continue;
      }
      double sum = sink ? std::exp(*sink - mx) : 0.0;
      for (std::int64_t t = keys.begin; t < keys.end; ++t) sum += std::exp(s[t] - mx);
      for (std::int64_t t = keys.begin; t < keys.end; ++t) {
        const double p = std::exp(s[t] - mx) / sum;
        for (std::int64_t c = 0; c < d; ++c) out[c] += p * r.value(t, hk, c);
      }
      if (lse) (*lse)[static_cast<std::size_t>(row * hq + h)] = mx + std::log(sum);
    }
  }
}

}  // namespace

std::vector<double> paged_decode(const PagedDecodeArgs& a, std::vector<double>* lse) {
  std::vector<double> o(static_cast<std::size_t>(a.q.numel()), 0.0);
  if (lse) lse->assign(static_cast<std::size_t>(a.q.dim(0) * a.q.dim(1)), 0.0);
  for (std::int64_t i = 0; i < a.seqs.count(); ++i)
    paged_rows(a.q, a.k_new, a.v_new, a.cache, a.seqs, a.scale, a.mask, a.softcap, a.sinks, i, i, 1, o, lse);
  return o;
}

std::vector<double> paged_prefill(const PagedPrefillArgs& a, std::vector<double>* lse) {
  std::vector<double> o(static_cast<std::size_t>(a.q.numel()), 0.0);
  if (lse) lse->assign(static_cast<std::size_t>(a.q.dim(0) * a.q.dim(1)), 0.0);
  const auto* qi = static_cast<const std::int32_t*>(a.q_indptr.data);
  for (std::int64_t i = 0; i < a.seqs.count(); ++i)
    paged_rows(a.q, a.k_new, a.v_new, a.cache, a.seqs, a.scale, a.mask, a.softcap, a.sinks, i, qi[i], qi[i + 1] - qi[i],
               o, lse);
  return o;
}

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
  auto x = [&](std::int64_t i) { return at(args.x, i); };
  for (std::int64_t r = 0; r < d.rows; ++r) softmax_row(d.cols, x, r, y.data() + r * d.cols);
  return y;
}

std::vector<double> attention(const AttentionArgs& args, std::vector<double>* lse) {
  const auto d = attention_dims(args.q, args.k, args.v).value();
  const double scale = resolve_attention_scale(args.scale, d.head_dim);
  std::vector<double> o(static_cast<std::size_t>(d.batch * d.heads_q * d.len_q * d.head_dim), 0.0);
  if (lse) lse->assign(static_cast<std::size_t>(d.batch * d.heads_q * d.len_q), 0.0);
  std::vector<double> s;
  auto q = [&](std::int64_t i) { return at(args.q, i); };
  auto k = [&](std::int64_t i) { return at(args.k, i); };
  auto v = [&](std::int64_t i) { return at(args.v, i); };
  for (std::int64_t b = 0; b < d.batch; ++b)
    for (std::int64_t h = 0; h < d.heads_q; ++h)
      for (std::int64_t i = 0; i < d.len_q; ++i) {
        const std::size_t row = static_cast<std::size_t>((b * d.heads_q + h) * d.len_q + i);
        double sink_store = 0.0;
        const double* sink = sink_of(args.sinks, h, sink_store);
        const double row_lse = attention_row(d, args, scale, q, k, v, b, h, i, o.data() + row * d.head_dim, s, sink);
        if (lse) (*lse)[row] = row_lse;
      }
  return o;
}

Result<SampledCheck> sampled_error(const MatmulArgs& args, const std::vector<Elements>& in, const OutputReader& out,
                                   std::mt19937_64& rng) {
  ATTN_ASSIGN_OR_RETURN(d, matmul_dims(args.a, args.b, args.transpose_a, args.transpose_b));
  ErrorSum e;
  std::vector<double> got;
  for (int s = 0; s < 48; ++s) {
    const std::int64_t b = draw(rng, d.batch), i = draw(rng, d.m), j = draw(rng, d.n);
    const double want = matmul_value(d, args.transpose_a, args.transpose_b, in[0], in[1], b, i, j, false);
    ATTN_RETURN_IF_ERROR(out((b * d.m + i) * d.n + j, 1, got));
    e.add(got[0], want);
  }
  return SampledCheck{e.relative(), tolerance(args.c.dtype, d.k)};
}

Result<SampledCheck> sampled_error(const SoftmaxArgs& args, const std::vector<Elements>& in, const OutputReader& out,
                                   std::mt19937_64& rng) {
  ATTN_ASSIGN_OR_RETURN(d, softmax_dims(args.x));
  ErrorSum e;
  std::vector<double> got, want(static_cast<std::size_t>(d.cols));
  for (int s = 0; s < 6; ++s) {
    const std::int64_t r = draw(rng, d.rows);
    softmax_row(d.cols, in[0], r, want.data());
    ATTN_RETURN_IF_ERROR(out(r * d.cols, d.cols, got));
    for (std::int64_t c = 0; c < d.cols; ++c) e.add(got[c], want[c]);
  }
  return SampledCheck{e.relative(), tolerance(args.y.dtype, d.cols)};
}

Result<SampledCheck> sampled_error(const AttentionArgs& args, const std::vector<Elements>& in, const OutputReader& out,
                                   std::mt19937_64& rng) {
  ATTN_ASSIGN_OR_RETURN(d, attention_dims(args.q, args.k, args.v));
  const double scale = resolve_attention_scale(args.scale, d.head_dim);
  ErrorSum e;
  std::vector<double> got, want(static_cast<std::size_t>(d.head_dim)), scratch;
  for (int s = 0; s < 4; ++s) {
    const std::int64_t b = draw(rng, d.batch), h = draw(rng, d.heads_q), i = draw(rng, d.len_q);
    // Sinks, when given, are the fourth input (OpDesc<AttentionArgs>::inputs).
    double sink_store = 0.0;
    const bool sinks = !args.sinks.empty() && in.size() > 3;
    if (sinks) sink_store = in[3](h);
    attention_row(d, args, scale, in[0], in[1], in[2], b, h, i, want.data(), scratch, sinks ? &sink_store : nullptr);
    ATTN_RETURN_IF_ERROR(out(((b * d.heads_q + h) * d.len_q + i) * d.head_dim, d.head_dim, got));
    for (std::int64_t c = 0; c < d.head_dim; ++c) e.add(got[c], want[c]);
  }
  return SampledCheck{e.relative(), tolerance(args.o.dtype, std::max(d.len_kv, d.head_dim))};
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

double tolerance(DType t, std::int64_t terms) {
  switch (t) {
    case DType::kFloat32: return std::max(1e-5, 2e-7 * std::sqrt(static_cast<double>(std::max<std::int64_t>(terms, 1))));
    case DType::kFloat16: return 1e-2;
    case DType::kBFloat16: return 1e-2;
    case DType::kInt32: return 0.0;  // exact
  }
  return 0.0;
}

}  // namespace attn::reference
