// attention/cpu: one task per (batch, query head, block of 16 query rows). Q, K and V are read as
// float32 (converted once per call for float16/bfloat16); each query row computes its scores
// against the keys it may see (visible_keys: causal, sliding window), soft-capped when asked, a
// max-subtracted softmax in float32, and the weighted sum of V. A sink (args.sinks[h]) joins the
// max and the denominator and adds no value: a row that sees no key yields zeros, lse = the sink.
// K and V of a key/value head are shared by its Hq/Hkv query heads, never copied.
#include <cmath>
#include <limits>
#include <vector>

#include "convert.h"
#include "cpu_kernels.h"
#include "parallel.h"

namespace attn::cpu {
namespace {

constexpr std::int64_t kRowsPerTask = 16;

// The tensor as float32: the data itself for float32, else a converted copy kept in `storage`.
const float* as_floats(const TensorView& t, std::vector<float>& storage) {
  if (t.dtype == DType::kFloat32) return static_cast<const float*>(t.data);
  storage = to_float_vector(t);
  return storage.data();
}

}  // namespace

Status attention_rows(const AttentionArgs& args, Stream&) {
  auto dims = attention_dims(args.q, args.k, args.v);
  ATTN_RETURN_IF_ERROR(dims.status());
  const std::int64_t batch = dims->batch, hq = dims->heads_q, hkv = dims->heads_kv, sq = dims->len_q,
                     sk = dims->len_kv, d = dims->head_dim;
  std::vector<float> q_store, k_store, v_store;
  const float* q = as_floats(args.q, q_store);
  const float* k = as_floats(args.k, k_store);
  const float* v = as_floats(args.v, v_store);
  const std::int64_t group = hq / hkv;
  const std::int64_t blocks = (sq + kRowsPerTask - 1) / kRowsPerTask;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const auto* sinks = static_cast<const float*>(args.sinks.data);  // null: none

  parallel_for(batch * hq * blocks, kRowsPerTask * sk * d * 2, [&](std::int64_t task) {
    const std::int64_t bh = task / blocks, i0 = (task % blocks) * kRowsPerTask;
    const std::int64_t b = bh / hq, h = bh % hq, kv_head = b * hkv + h / group;
    const float* k_head = k + kv_head * sk * d;
    const float* v_head = v + kv_head * sk * d;
    thread_local std::vector<float> scores, out;
    scores.resize(static_cast<std::size_t>(sk));
    out.resize(static_cast<std::size_t>(d));
    for (std::int64_t i = i0; i < std::min(sq, i0 + kRowsPerTask); ++i) {
      const float* q_row = q + (bh * sq + i) * d;
      // Keys [begin, end) are visible to query i (causal, window).
      const KeyRange keys = visible_keys(i, sq, sk, args);
      const std::int64_t begin = keys.begin, end = keys.end;
      const float cap = args.softcap, inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
      const float sink = sinks ? sinks[h] : neg_inf;
      float mx = sink;
      for (std::int64_t j = begin; j < end; ++j) {
        const float* k_row = k_head + j * d;
        float s = 0.0f;
        for (std::int64_t c = 0; c < d; ++c) s += q_row[c] * k_row[c];
        s *= args.scale;
        if (cap > 0.0f) s = cap * std::tanh(s * inv_cap);
        scores[j] = s;
        mx = std::max(mx, s);
      }
      std::fill(out.begin(), out.end(), 0.0f);
      float sum = sinks ? std::exp(sink - mx) : 0.0f;
      for (std::int64_t j = begin; j < end; ++j) {
        const float p = std::exp(scores[j] - mx);
        sum += p;
        const float* v_row = v_head + j * d;
        for (std::int64_t c = 0; c < d; ++c) out[c] += p * v_row[c];
      }
      const bool any = end > begin || sinks;
      const float inv = any ? 1.0f / sum : 0.0f;
      for (float& x : out) x *= inv;
      store_floats(args.o, (bh * sq + i) * d, d, out.data());
      if (!args.lse.empty()) {
        static_cast<float*>(args.lse.data)[bh * sq + i] = any ? mx + std::log(sum) : neg_inf;
      }
    }
  });
  return Status::Ok();
}

}  // namespace attn::cpu
