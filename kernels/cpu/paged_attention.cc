// paged_decode/cpu and paged_prefill/cpu: the KV-cache ops on the CPU, the embedded default.
// One task per (sequence, kv head): it appends that head's new rows to the sequence's pages,
// then walks the pages once for every query head of its group (GQA: each K/V page is converted
// to float32 once per group, not once per query head), with an online softmax per query row.
// A window (mask.window_left/right) limits each row to the keys visible_keys gives it, and only
// the pages holding some row's keys are read (a windowed decode touches window_left + 1 keys, not
// the whole sequence); soft caps apply to the scaled scores; a sink starts each row's running
// max and sum (m = sink, l = 1, no value row), so it joins the denominator.
// float8 storage: the append quantizes each page's new rows of the head with the page's scale
// (setting or growing it, attn/paged_ops.h) and the walk dequantizes a page of a head with its one
// scale; the rest is the same float32 arithmetic.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attn/fp8.h"
#include "convert.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace attn::cpu {
namespace {

struct PagedWork {
  const TensorView &q, &k_new, &v_new, &o, &lse;
  const PagedKvLayer& cache;
  const PagedSequences& seqs;
  const std::int32_t* q_indptr;  // null: one new row per sequence
  AttentionMask mask;
  float scale;
  float softcap;       // > 0: scores soft-capped
  const float* sinks;  // null: none; else [Hq], in host memory
};

void copy_row(const TensorView& src, std::int64_t src_elem, void* pool, DType dt,
              std::int64_t dst_elem, std::int64_t d) {
  const std::size_t es = element_size(dt);
  std::copy_n(static_cast<const char*>(src.data) + src_elem * static_cast<std::int64_t>(es),
              d * static_cast<std::int64_t>(es),
              static_cast<char*>(pool) + dst_elem * static_cast<std::int64_t>(es));
}

// float8 storage: appends rows [r0, r1) of one head of one page, from rows `src_row` .. of
// `src` ([rows, Hkv, D]), to one pool, setting or growing the page's scale for that head.
void append_fp8(const PagedKvLayer& c, const TensorView& src, std::int64_t src_row, void* pool,
                float* scales, std::int64_t page, std::int64_t hk, std::int64_t r0,
                std::int64_t r1) {
  const std::int64_t d = c.head_dim, n = (r1 - r0) * d;
  std::vector<float> x(static_cast<std::size_t>(n));
  for (std::int64_t r = r0; r < r1; ++r)
    load_floats(src, ((src_row + r - r0) * c.heads_kv + hk) * d, d, x.data() + (r - r0) * d);
  auto* codes = static_cast<std::uint8_t*>(pool);
  float& scale = scales[page * c.heads_kv + hk];
  if (!c.fixed_scales) {
    float amax = 0.0f;
    for (float v : x)
      if (std::isfinite(v)) amax = std::max(amax, std::abs(v));
    const float old = r0 == 0 ? 0.0f : scale;  // row 0: a fresh page (at this layer)
    const float grown = std::max(old, fp8_pow2_scale(amax));
    if (old > 0.0f && grown > old) {
      // The rows already here, to the larger scale: a power-of-two ratio, exact for normals.
      std::vector<float> kept(static_cast<std::size_t>(r0 * d));
      std::uint8_t* at = codes + c.offset(page, hk, 0);
      dequantize_fp8_e4m3(at, r0 * d, old, kept.data());
      quantize_fp8_e4m3(kept.data(), r0 * d, grown, at);
    }
    scale = grown;
  }
  quantize_fp8_e4m3(x.data(), n, scale, codes + c.offset(page, hk, r0));
}

void run_task(const PagedWork& w, std::int64_t seq, std::int64_t hk) {
  const PagedKvLayer& c = w.cache;
  const std::int64_t d = c.head_dim, hq = w.q.dim(1), group = hq / c.heads_kv, ps = c.page_size;
  const auto* lens = static_cast<const std::int32_t*>(w.seqs.seq_lens.data);
  const auto* indptr = static_cast<const std::int32_t*>(w.seqs.page_indptr.data);
  const std::int32_t* pages =
      static_cast<const std::int32_t*>(w.seqs.page_indices.data) + indptr[seq];
  const std::int64_t len = lens[seq];
  const std::int64_t first = w.q_indptr ? w.q_indptr[seq] : seq;
  const std::int64_t fresh = w.q_indptr ? w.q_indptr[seq + 1] - first : 1;

  // The append: this head's new rows into their slots (float8: a page's rows at a time).
  for (std::int64_t j = 0; c.fp8() && j < fresh;) {
    const std::int64_t t = len - fresh + j, r0 = t % ps, r1 = std::min(ps, r0 + fresh - j);
    const std::int64_t page = pages[t / ps];
    append_fp8(c, w.k_new, first + j, c.k, c.k_scales, page, hk, r0, r1);
    append_fp8(c, w.v_new, first + j, c.v, c.v_scales, page, hk, r0, r1);
    j += r1 - r0;
  }
  for (std::int64_t j = 0; !c.fp8() && j < fresh; ++j) {
    const std::int64_t t = len - fresh + j;
    const std::int64_t slot = c.offset(pages[t / ps], hk, t % ps);
    copy_row(w.k_new, (first + j) * c.heads_kv * d + hk * d, c.k, c.dtype, slot, d);
    copy_row(w.v_new, (first + j) * c.heads_kv * d + hk * d, c.v, c.dtype, slot, d);
  }

  // Query rows of the group, scaled; running max, sum and output per row (a sink starts them:
  // m = sink, l = e^0 = 1, no value). Each new token's keys: [key_begin[j], key_end[j]).
  const std::int64_t rows = fresh * group;
  std::vector<float> qf(static_cast<std::size_t>(rows * d)),
      acc(static_cast<std::size_t>(rows * d), 0.0f);
  std::vector<float> m(static_cast<std::size_t>(rows), -std::numeric_limits<float>::infinity());
  std::vector<float> l(static_cast<std::size_t>(rows), 0.0f);
  std::vector<std::int64_t> key_begin(static_cast<std::size_t>(fresh)),
      key_end(static_cast<std::size_t>(fresh));
  std::int64_t lo = len, hi = 0;  // the keys any row sees
  for (std::int64_t j = 0; j < fresh; ++j) {
    const KeyRange kr =
        visible_keys(j, fresh, len, w.mask.causal, w.mask.window_left, w.mask.window_right);
    key_begin[static_cast<std::size_t>(j)] = kr.begin;
    key_end[static_cast<std::size_t>(j)] = kr.end;
    if (kr.end > kr.begin) lo = std::min(lo, kr.begin), hi = std::max(hi, kr.end);
    for (std::int64_t g = 0; g < group; ++g) {
      const std::int64_t r = j * group + g;
      float* dst = qf.data() + r * d;
      load_floats(w.q, ((first + j) * hq + hk * group + g) * d, d, dst);
      for (std::int64_t x = 0; x < d; ++x) dst[x] *= w.scale;
      if (w.sinks)
        m[static_cast<std::size_t>(r)] = w.sinks[hk * group + g],
        l[static_cast<std::size_t>(r)] = 1.0f;
    }
  }
  const float cap = w.softcap, inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;

  std::vector<float> kf(static_cast<std::size_t>(ps * d)), vf(static_cast<std::size_t>(ps * d)),
      s(static_cast<std::size_t>(ps));
  const TensorView k_pool{c.dtype, {c.pages * c.page_elements()}, c.k, MemoryKind::kHost};
  const TensorView v_pool{c.dtype, {c.pages * c.page_elements()}, c.v, MemoryKind::kHost};
  // Only the pages that hold keys some row sees: [lo, hi) rounded out to pages.
  for (std::int64_t p0 = lo / ps * ps; p0 < hi; p0 += ps) {
    const std::int64_t n = std::min(ps, len - p0);
    const std::int64_t base = c.offset(pages[p0 / ps], hk, 0);
    if (c.fp8()) {
      const std::int64_t at = pages[p0 / ps] * c.heads_kv + hk;
      dequantize_fp8_e4m3(static_cast<const std::uint8_t*>(c.k) + base, n * d, c.k_scales[at],
                          kf.data());
      dequantize_fp8_e4m3(static_cast<const std::uint8_t*>(c.v) + base, n * d, c.v_scales[at],
                          vf.data());
    } else {
      load_floats(k_pool, base, n * d, kf.data());
      load_floats(v_pool, base, n * d, vf.data());
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::size_t j = static_cast<std::size_t>(r / group);
      // Keys [t0, t1) of the page this row sees (causal, window).
      const std::int64_t t0 = std::max<std::int64_t>(key_begin[j] - p0, 0);
      const std::int64_t t1 = std::min(n, key_end[j] - p0);
      if (t1 <= t0) continue;
      const float* qr = qf.data() + r * d;
      float mx = m[static_cast<std::size_t>(r)];
      for (std::int64_t t = t0; t < t1; ++t) {
        const float* kr = kf.data() + t * d;
        float dot = 0.0f;
        for (std::int64_t x = 0; x < d; ++x) dot += qr[x] * kr[x];
        if (cap > 0.0f) dot = cap * std::tanh(dot * inv_cap);
        s[static_cast<std::size_t>(t)] = dot;
        mx = std::max(mx, dot);
      }
      const float rescale = std::exp(m[static_cast<std::size_t>(r)] - mx);  // 0 on the first keys
      float* out = acc.data() + r * d;
      float sum = l[static_cast<std::size_t>(r)] * rescale;
      for (std::int64_t x = 0; x < d; ++x) out[x] *= rescale;
      for (std::int64_t t = t0; t < t1; ++t) {
        const float p = std::exp(s[static_cast<std::size_t>(t)] - mx);
        sum += p;
        const float* vr = vf.data() + t * d;
        for (std::int64_t x = 0; x < d; ++x) out[x] += p * vr[x];
      }
      m[static_cast<std::size_t>(r)] = mx;
      l[static_cast<std::size_t>(r)] = sum;
    }
  }
  for (std::int64_t r = 0; r < rows; ++r) {
    const std::int64_t j = r / group, h = hk * group + r % group, row = first + j;
    float* out = acc.data() + r * d;
    // l = 0 only for a row that sees no key and has no sink: zeros, lse -inf.
    const float lr = l[static_cast<std::size_t>(r)];
    const float inv = lr > 0.0f ? 1.0f / lr : 0.0f;
    for (std::int64_t x = 0; x < d; ++x) out[x] *= inv;
    store_floats(w.o, (row * hq + h) * d, d, out);
    if (!w.lse.empty())
      static_cast<float*>(w.lse.data)[row * hq + h] =
          lr > 0.0f ? m[static_cast<std::size_t>(r)] + std::log(lr)
                    : -std::numeric_limits<float>::infinity();
  }
}

Status run(const PagedWork& w) {
  const std::int64_t n = w.seqs.count(), hkv = w.cache.heads_kv;
  const std::int64_t work =
      std::max<std::int64_t>(1, w.seqs.max_seq_len * w.q.dim(1) / hkv * w.cache.head_dim * 2);
  parallel_for(n * hkv, work, [&](std::int64_t i) { run_task(w, i / hkv, i % hkv); });
  release_openmp_threads();
  return Status::Ok();
}

}  // namespace

Status paged_decode(const PagedDecodeArgs& a, Stream&) {
  return run({a.q, a.k_new, a.v_new, a.o, a.lse, a.cache, a.seqs, nullptr, a.mask, a.scale,
              a.softcap, static_cast<const float*>(a.sinks.data)});
}

Status paged_prefill(const PagedPrefillArgs& a, Stream&) {
  return run({a.q, a.k_new, a.v_new, a.o, a.lse, a.cache, a.seqs,
              static_cast<const std::int32_t*>(a.q_indptr.data), a.mask, a.scale, a.softcap,
              static_cast<const float*>(a.sinks.data)});
}

}  // namespace attn::cpu
