// attention/cpu_flash: flash attention on sgemm tiles. One task per (batch, query head, block of
// up to 512 query rows), across threads, heaviest (latest under causal) blocks first. A task walks
// the key blocks its rows may see, 512 keys at a time:
//   S = scale * Q_blk K_blk^T (sgemm), soft-capped when asked, the causal/window mask on blocks
//   that cross the diagonal or a window edge, online softmax per row (running max m and sum l;
//   O rescaled when m grows),
//   O += P V_blk (sgemm, beta 1),
// then O / l and lse = m + log l, a sink (args.sinks[h]) folded into m and l first (it adds no
// value). Key blocks wholly outside the band a query block sees (above the diagonal, left of a
// sliding window) are never touched, those crossing its edges are computed in slices of 64 rows
// each over the keys those rows see; rows that see no key (causal with Sq > Sk) are written as
// zeros with lse -inf without any work. float16/bfloat16: the task's Q block and each K/V block are
// converted to float32 as they are used (per-task buffers of a few blocks), float32 is read in
// place. Query head h reads key/value head h / (Hq / Hkv). Each sgemm runs on its task's thread
// (SingleThreadedBlas): the tasks already fill every CPU.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_kernels.h"
#include "openblas.h"
#include "parallel.h"
#include "vectorized.h"

namespace attn::cpu {
namespace {

// OpenBLAS packs both operands of every call, so larger blocks spend less on packing per flop:
// measured on one core (AVX-512, [1,8,2048,64] and [1,32,1024,128]), 128 x 256 blocks ran at
// 69-75 GFLOP/s, 256 x 512 at 77-91, 512 x 512 at 84-97 (sgemm alone: ~150). 512 x 512 keeps S
// (1 MiB) and O within a 2 MiB L2. Query blocks shrink (to 64) while there are fewer than 4 tasks
// a thread. Under causal, the block on the diagonal goes in slices of 64 rows.
constexpr std::int64_t kMaxBlockQ = 512, kMinBlockQ = 64, kBlockK = 512, kSliceQ = 64;

// Rows of float32 data for a block: the tensor's own memory for float32, else a converted copy.
const float* rows_as_float(const TensorView& t, std::int64_t first, std::int64_t count,
                           std::vector<float>& storage) {
  if (t.dtype == DType::kFloat32) return static_cast<const float*>(t.data) + first;
  storage.resize(static_cast<std::size_t>(count));
  const auto size = static_cast<std::int64_t>(element_size(t.dtype));
  convert_to_float(static_cast<const char*>(t.data) + first * size, t.dtype, count, storage.data());
  return storage.data();
}

struct TaskBuffers {
  std::vector<float> q, k, v, s, o, m, l;
};

}  // namespace

Status attention_flash(const AttentionArgs& args, Stream&) {
  auto dims = attention_dims(args.q, args.k, args.v);
  ATTN_RETURN_IF_ERROR(dims.status());
  const std::int64_t batch = dims->batch, hq = dims->heads_q, hkv = dims->heads_kv,
                     sq = dims->len_q, sk = dims->len_kv, d = dims->head_dim;
  const std::int64_t group = hq / hkv, heads = batch * hq;
  std::int64_t block_q = kMaxBlockQ;
  while (block_q > kMinBlockQ && heads * ((sq + block_q - 1) / block_q) < 4 * hardware_threads())
    block_q /= 2;
  const std::int64_t q_blocks = (sq + block_q - 1) / block_q;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const auto o_size = static_cast<std::int64_t>(element_size(args.o.dtype));
  auto* o_bytes = static_cast<char*>(args.o.data);
  auto* lse = static_cast<float*>(args.lse.data);  // null when not wanted
  // Keys [begin, end) are the ones query row i sees (causal, window); both ends grow with i.
  auto keys = [&](std::int64_t i) { return visible_keys(i, sq, sk, args); };
  const float cap = args.softcap;  // > 0: scores soft-capped before the softmax
  const auto* sinks = static_cast<const float*>(args.sinks.data);  // null: none; [Hq]

  const SingleThreadedBlas one_thread_each;
  parallel_for(heads * q_blocks, block_q * sk * d * 2, [&](std::int64_t task) {
    const std::int64_t bh = task % heads, i0 = (q_blocks - 1 - task / heads) * block_q;
    const std::int64_t rows = std::min(block_q, sq - i0);
    const std::int64_t kv_head = (bh / hq) * hkv + (bh % hq) / group;
    // Rows [0, first) of the block see no key (causal or a right window with Sq > Sk: the rows
    // that see none come first); the rest see keys [keys(row).begin, keys(row).end).
    std::int64_t first = 0;
    while (first < rows && keys(i0 + first).begin >= keys(i0 + first).end) ++first;
    const std::int64_t active = rows - first, row0 = bh * sq + i0;
    if (first > 0) {
      std::memset(o_bytes + row0 * d * o_size, 0, static_cast<std::size_t>(first * d * o_size));
      if (lse) std::fill(lse + row0, lse + row0 + first, sinks ? sinks[bh % hq] : neg_inf);
    }
    if (active == 0) return;

    thread_local TaskBuffers buf;
    const float* q = rows_as_float(args.q, (row0 + first) * d, active * d, buf.q);
    buf.o.assign(static_cast<std::size_t>(active * d), 0.0f);
    buf.m.assign(static_cast<std::size_t>(active), neg_inf);
    buf.l.assign(static_cast<std::size_t>(active), 0.0f);
    // The band of keys the block's rows see: from the first active row's begin to the last row's end.
    const std::int64_t key_begin = keys(i0 + first).begin, key_end = keys(i0 + rows - 1).end;
    buf.s.resize(static_cast<std::size_t>(active * std::min(kBlockK, key_end - key_begin)));
    const auto n_d = static_cast<blasint>(d);

    // Key blocks cover [key_begin, key_end) and go backwards (online softmax takes them in any
    // order); blocks outside the band are never touched. A block that some row does not see whole
    // (it crosses the causal diagonal or a window edge) goes in slices of kSliceQ rows, each over
    // the keys its rows see: only slivers of kSliceQ rows are computed and masked.
    for (std::int64_t j1 = key_end; j1 > key_begin; j1 -= kBlockK) {
      const std::int64_t j0 = std::max(j1 - kBlockK, key_begin);
      const float* k = rows_as_float(args.k, (kv_head * sk + j0) * d, (j1 - j0) * d, buf.k);
      const float* v = rows_as_float(args.v, (kv_head * sk + j0) * d, (j1 - j0) * d, buf.v);
      // The first row sees the least on the right, the last the least on the left.
      const bool crosses = keys(i0 + first).end < j1 || keys(i0 + rows - 1).begin > j0;
      const std::int64_t slice = crosses ? kSliceQ : active;
      for (std::int64_t r0 = 0; r0 < active; r0 += slice) {
        const std::int64_t nr = std::min(slice, active - r0);
        const std::int64_t c0 = std::max(j0, keys(i0 + first + r0).begin);
        const std::int64_t c1 = std::min(j1, keys(i0 + first + r0 + nr - 1).end);
        if (c1 <= c0) continue;  // no row of the slice sees this block
        const std::int64_t cols = c1 - c0;
        const auto n_cols = static_cast<blasint>(cols), n_rows = static_cast<blasint>(nr);
        float* s = buf.s.data();
        float* o = buf.o.data() + r0 * d;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n_rows, n_cols, n_d, args.scale,
                    q + r0 * d, n_d, k + (c0 - j0) * d, n_d, 0.0f, s, n_cols);
        for (std::int64_t r = 0; r < nr; ++r) {
          float* s_row = s + r * cols;
          if (cap > 0.0f) soft_cap(s_row, cols, cap);
          if (crosses) {  // hide the keys outside the row's range
            const KeyRange kr = keys(i0 + first + r0 + r);
            std::fill(s_row, s_row + std::clamp<std::int64_t>(kr.begin - c0, 0, cols), neg_inf);
            std::fill(s_row + std::clamp<std::int64_t>(kr.end - c0, 0, cols), s_row + cols, neg_inf);
          }
          float& m = buf.m[static_cast<std::size_t>(r0 + r)];
          float& l = buf.l[static_cast<std::size_t>(r0 + r)];
          const float m_new = std::max(m, row_max(s_row, cols));
          if (m_new == neg_inf) {  // nothing visible yet: P = 0
            std::fill(s_row, s_row + cols, 0.0f);
            continue;
          }
          const float sum = exp_shifted_sum(s_row, cols, m_new);
          if (m != neg_inf && m_new != m) {  // the running max grew: rescale what O and l hold
            const float alpha = std::exp(m - m_new);
            for (std::int64_t c = 0; c < d; ++c) o[r * d + c] *= alpha;
            l *= alpha;
          }
          l += sum;
          m = m_new;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n_rows, n_d, n_cols, 1.0f, s, n_cols,
                    v + (c0 - j0) * d, n_d, 1.0f, o, n_d);
      }
    }

    for (std::int64_t r = 0; r < active; ++r) {
      if (sinks) {  // the sink joins the running max and sum, with no value row
        const float sink = sinks[bh % hq];
        float& m = buf.m[static_cast<std::size_t>(r)];
        float& l = buf.l[static_cast<std::size_t>(r)];
        const float m_new = std::max(m, sink);
        const float alpha = m == neg_inf ? 0.0f : std::exp(m - m_new);
        for (std::int64_t c = 0; c < d; ++c) buf.o[static_cast<std::size_t>(r * d + c)] *= alpha;
        l = l * alpha + std::exp(sink - m_new);
        m = m_new;
      }
      const float l = buf.l[static_cast<std::size_t>(r)];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      float* o_row = buf.o.data() + r * d;
      for (std::int64_t c = 0; c < d; ++c) o_row[c] *= inv;
      if (lse)
        lse[row0 + first + r] =
            l > 0.0f ? buf.m[static_cast<std::size_t>(r)] + std::log(l) : neg_inf;
    }
    convert_from_float(buf.o.data(), args.o.dtype, active * d,
                       o_bytes + (row0 + first) * d * o_size);
  });
  return Status::Ok();
}

}  // namespace attn::cpu
