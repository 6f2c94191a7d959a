// paged_decode/cpu and paged_prefill/cpu: the KV-cache ops on the CPU, the embedded default.
// One task per (sequence, kv head): it appends that head's new rows to the sequence's pages,
// then walks the pages once for every query head of its group (GQA: each K/V page is converted
// to float32 once per group, not once per query head), with an online softmax per query row.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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
  bool causal;
  float scale;
};

void copy_row(const TensorView& src, std::int64_t src_elem, void* pool, DType dt,
              std::int64_t dst_elem, std::int64_t d) {
  const std::size_t es = element_size(dt);
  std::copy_n(static_cast<const char*>(src.data) + src_elem * static_cast<std::int64_t>(es),
              d * static_cast<std::int64_t>(es),
              static_cast<char*>(pool) + dst_elem * static_cast<std::int64_t>(es));
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

  // The append: this head's new rows into their slots.
  for (std::int64_t j = 0; j < fresh; ++j) {
    const std::int64_t t = len - fresh + j;
    const std::int64_t slot = c.offset(pages[t / ps], hk, t % ps);
    copy_row(w.k_new, (first + j) * c.heads_kv * d + hk * d, c.k, c.dtype, slot, d);
    copy_row(w.v_new, (first + j) * c.heads_kv * d + hk * d, c.v, c.dtype, slot, d);
  }

  // Query rows of the group, scaled; running max, sum and output per row.
  const std::int64_t rows = fresh * group;
  std::vector<float> qf(static_cast<std::size_t>(rows * d)),
      acc(static_cast<std::size_t>(rows * d), 0.0f);
  std::vector<float> m(static_cast<std::size_t>(rows), -std::numeric_limits<float>::infinity());
  std::vector<float> l(static_cast<std::size_t>(rows), 0.0f);
  for (std::int64_t j = 0; j < fresh; ++j)
    for (std::int64_t g = 0; g < group; ++g) {
      float* dst = qf.data() + (j * group + g) * d;
      load_floats(w.q, ((first + j) * hq + hk * group + g) * d, d, dst);
      for (std::int64_t x = 0; x < d; ++x) dst[x] *= w.scale;
    }

  std::vector<float> kf(static_cast<std::size_t>(ps * d)), vf(static_cast<std::size_t>(ps * d)),
      s(static_cast<std::size_t>(ps));
  const TensorView k_pool{c.dtype, {c.pages * c.page_elements()}, c.k, MemoryKind::kHost};
  const TensorView v_pool{c.dtype, {c.pages * c.page_elements()}, c.v, MemoryKind::kHost};
  for (std::int64_t p0 = 0; p0 < len; p0 += ps) {
    const std::int64_t n = std::min(ps, len - p0);
    const std::int64_t base = c.offset(pages[p0 / ps], hk, 0);
    load_floats(k_pool, base, n * d, kf.data());
    load_floats(v_pool, base, n * d, vf.data());
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t j = r / group;
      // Keys this row sees in the page: all, or (causal) positions <= its own.
      const std::int64_t visible = w.causal ? std::min(n, len - fresh + j + 1 - p0) : n;
      if (visible <= 0) continue;
      const float* qr = qf.data() + r * d;
      float mx = m[static_cast<std::size_t>(r)];
      for (std::int64_t t = 0; t < visible; ++t) {
        const float* kr = kf.data() + t * d;
        float dot = 0.0f;
        for (std::int64_t x = 0; x < d; ++x) dot += qr[x] * kr[x];
        s[static_cast<std::size_t>(t)] = dot;
        mx = std::max(mx, dot);
      }
      const float rescale = std::exp(m[static_cast<std::size_t>(r)] - mx);  // 0 on the first page
      float* out = acc.data() + r * d;
      float sum = l[static_cast<std::size_t>(r)] * rescale;
      for (std::int64_t x = 0; x < d; ++x) out[x] *= rescale;
      for (std::int64_t t = 0; t < visible; ++t) {
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
    const float inv = 1.0f / l[static_cast<std::size_t>(r)];  // every row sees at least itself
    for (std::int64_t x = 0; x < d; ++x) out[x] *= inv;
    store_floats(w.o, (row * hq + h) * d, d, out);
    if (!w.lse.empty())
      static_cast<float*>(w.lse.data)[row * hq + h] =
          m[static_cast<std::size_t>(r)] + std::log(l[static_cast<std::size_t>(r)]);
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
  return run({a.q, a.k_new, a.v_new, a.o, a.lse, a.cache, a.seqs, nullptr, false, a.scale});
}

Status paged_prefill(const PagedPrefillArgs& a, Stream&) {
  return run({a.q, a.k_new, a.v_new, a.o, a.lse, a.cache, a.seqs,
              static_cast<const std::int32_t*>(a.q_indptr.data), a.mask.causal, a.scale});
}

}  // namespace attn::cpu
