#include "attn/paged_ops.h"

#include <string>

namespace attn {
namespace {

std::string str(std::int64_t v) { return std::to_string(v); }

Status expect_shape(const TensorView& t, const Shape& want, const std::string& field) {
  if (t.shape != want) {
    return invalid_argument(field + ".shape: expected " + shape_to_string(want) + ", got " +
                            shape_to_string(t.shape));
  }
  return Status::Ok();
}

Status expect_dtype(const TensorView& t, DType want, const std::string& field) {
  if (t.dtype != want) {
    return invalid_argument(field + ".dtype: expected " + std::string(dtype_name(want)) + ", got " +
                            std::string(dtype_name(t.dtype)));
  }
  return Status::Ok();
}

Status check_cache(const PagedKvLayer& c) {
  if (c.pages < 1 || c.heads_kv < 1 || c.page_size < 1 || c.head_dim < 1) {
    return invalid_argument("cache: expected pages, heads_kv, page_size and head_dim >= 1");
  }
  if (c.dtype == DType::kInt32)
    return invalid_argument("cache.dtype: expected a floating-point dtype, got int32");
  if (c.fp8() && c.dtype == DType::kFloat32) {
    return invalid_argument(
        "cache.storage: float8_e4m3 storage serves float16 and bfloat16 caches, got float32");
  }
  if (c.fp8() && (!c.k_scales || !c.v_scales))
    return invalid_argument("cache.k_scales: float8_e4m3 storage needs its scales");
  return Status::Ok();
}

// q [rows, Hq, D], k_new/v_new [rows, Hkv, D], o like q, lse [rows, Hq]; the sequences' arrays.
Status check_rows(const TensorView& q, const TensorView& k_new, const TensorView& v_new,
                  const TensorView& o, const TensorView& lse, const PagedKvLayer& cache,
                  const PagedSequences& seqs) {
  ATTN_RETURN_IF_ERROR(check_cache(cache));
  if (q.rank() != 3)
    return invalid_argument("q.shape: expected [tokens, Hq, D], got " + shape_to_string(q.shape));
  const std::int64_t rows = q.dim(0), hq = q.dim(1), d = q.dim(2);
  if (d != cache.head_dim) {
    return invalid_argument("q.shape: expected head dim " + str(cache.head_dim) +
                            " (the cache's), got " + str(d));
  }
  if (hq % cache.heads_kv != 0) {
    return invalid_argument("q.shape: expected Hq a multiple of the cache's " +
                            str(cache.heads_kv) + " kv heads, got " + str(hq));
  }
  ATTN_RETURN_IF_ERROR(expect_dtype(q, cache.dtype, "q"));
  ATTN_RETURN_IF_ERROR(expect_shape(k_new, {rows, cache.heads_kv, d}, "k_new"));
  ATTN_RETURN_IF_ERROR(expect_dtype(k_new, cache.dtype, "k_new"));
  ATTN_RETURN_IF_ERROR(expect_shape(v_new, {rows, cache.heads_kv, d}, "v_new"));
  ATTN_RETURN_IF_ERROR(expect_dtype(v_new, cache.dtype, "v_new"));
  ATTN_RETURN_IF_ERROR(expect_shape(o, q.shape, "o"));
  ATTN_RETURN_IF_ERROR(expect_dtype(o, cache.dtype, "o"));
  if (!lse.empty() || !lse.shape.empty()) {
    ATTN_RETURN_IF_ERROR(expect_shape(lse, {rows, hq}, "lse"));
    ATTN_RETURN_IF_ERROR(expect_dtype(lse, DType::kFloat32, "lse"));
  }
  if (seqs.seq_lens.rank() != 1 || seqs.seq_lens.dim(0) < 1) {
    return invalid_argument("seq_lens.shape: expected [n >= 1], got " +
                            shape_to_string(seqs.seq_lens.shape));
  }
  const std::int64_t n = seqs.seq_lens.dim(0);
  ATTN_RETURN_IF_ERROR(expect_dtype(seqs.seq_lens, DType::kInt32, "seq_lens"));
  ATTN_RETURN_IF_ERROR(expect_shape(seqs.page_indptr, {n + 1}, "page_indptr"));
  ATTN_RETURN_IF_ERROR(expect_dtype(seqs.page_indptr, DType::kInt32, "page_indptr"));
  if (seqs.page_indices.rank() != 1) {
    return invalid_argument("page_indices.shape: expected [pages], got " +
                            shape_to_string(seqs.page_indices.shape));
  }
  ATTN_RETURN_IF_ERROR(expect_dtype(seqs.page_indices, DType::kInt32, "page_indices"));
  if (seqs.max_seq_len < 1) return invalid_argument("max_seq_len: expected >= 1");
  return Status::Ok();
}

// Windows, soft caps and sinks have the one-shot Attention's rules.
Status check_mask_options(const AttentionMask& m, float softcap, const TensorView& sinks, const TensorView& q) {
  ATTN_RETURN_IF_ERROR(check_attention_options(m.window_left, m.window_right, softcap));
  return check_sinks(sinks, q.dim(1));
}

}  // namespace

const char* kv_storage_name(KvStorage s) {
  return s == KvStorage::kFloat8E4M3 ? "float8_e4m3" : "dtype";
}

Status check_paged_decode(const PagedDecodeArgs& a) {
  ATTN_RETURN_IF_ERROR(check_rows(a.q, a.k_new, a.v_new, a.o, a.lse, a.cache, a.seqs));
  ATTN_RETURN_IF_ERROR(check_mask_options(a.mask, a.softcap, a.sinks, a.q));
  if (a.q.dim(0) != a.seqs.count()) {
    return invalid_argument("q.shape: expected one row per sequence (" + str(a.seqs.count()) +
                            "), got " + str(a.q.dim(0)));
  }
  if (a.merged_calls_host) {
    const std::int32_t* at = a.merged_calls_host;
    bool ordered = a.merged_calls >= 1 && at[0] == 0 && at[a.merged_calls] == a.seqs.count();
    for (std::int64_t c = 0; ordered && c < a.merged_calls; ++c) ordered = at[c] < at[c + 1];
    if (!ordered) {
      return invalid_argument("merged_calls_host: expected " + str(a.merged_calls) +
                              " + 1 increasing offsets from 0 to " + str(a.seqs.count()));
    }
  }
  return Status::Ok();
}

Status check_paged_prefill(const PagedPrefillArgs& a) {
  ATTN_RETURN_IF_ERROR(check_rows(a.q, a.k_new, a.v_new, a.o, a.lse, a.cache, a.seqs));
  ATTN_RETURN_IF_ERROR(check_mask_options(a.mask, a.softcap, a.sinks, a.q));
  ATTN_RETURN_IF_ERROR(expect_shape(a.q_indptr, {a.seqs.count() + 1}, "q_indptr"));
  ATTN_RETURN_IF_ERROR(expect_dtype(a.q_indptr, DType::kInt32, "q_indptr"));
  if (a.max_new_tokens < 1) return invalid_argument("max_new_tokens: expected >= 1");
  return Status::Ok();
}

std::int64_t paged_kv_bytes_read(const PagedKvLayer& cache, const PagedSequences& seqs,
                                 std::int64_t window_left) {
  std::int64_t tokens = 0;
  if (seqs.seq_lens_host)
    for (std::int64_t i = 0; i < seqs.count(); ++i) {
      const std::int64_t len = seqs.seq_lens_host[i];
      tokens += window_left >= 0 && window_left + 1 < len ? window_left + 1 : len;
    }
  return 2 * tokens * cache.heads_kv * cache.head_dim *
         static_cast<std::int64_t>(cache.storage_element_size());
}

OpCost OpDesc<PagedDecodeArgs>::cost(const PagedDecodeArgs& a) {
  const std::int64_t hq = a.q.rank() == 3 ? a.q.dim(1) : 0;
  const std::int64_t kv_bytes = paged_kv_bytes_read(a.cache, a.seqs, a.mask.window_left);
  const std::int64_t keys =
      a.cache.heads_kv * a.cache.head_dim > 0
          ? kv_bytes / (2 * a.cache.heads_kv * a.cache.head_dim *
                        static_cast<std::int64_t>(a.cache.storage_element_size()))
          : 0;
  const std::int64_t flops = 4 * keys * hq * a.cache.head_dim;
  const auto bytes =
      kv_bytes + static_cast<std::int64_t>(a.q.bytes() + a.k_new.bytes() + a.v_new.bytes() + a.o.bytes());
  return {flops, bytes};
}

OpCost OpDesc<PagedPrefillArgs>::cost(const PagedPrefillArgs& a) {
  // Keys each new token sees, summed: the earlier cache, plus (causal) the new tokens up to itself,
  // within its window.
  std::int64_t pairs = 0;
  const bool windowed = a.mask.window_left >= 0 || (!a.mask.causal && a.mask.window_right >= 0);
  if (a.seqs.seq_lens_host && a.q_indptr_host)
    for (std::int64_t i = 0; i < a.seqs.count(); ++i) {
      const std::int64_t len = a.seqs.seq_lens_host[i],
                         fresh = a.q_indptr_host[i + 1] - a.q_indptr_host[i];
      if (!windowed) {
        pairs += a.mask.causal ? fresh * (len - fresh) + fresh * (fresh + 1) / 2 : fresh * len;
        continue;
      }
      for (std::int64_t j = 0; j < fresh; ++j) {
        const KeyRange r = visible_keys(j, fresh, len, a.mask.causal, a.mask.window_left, a.mask.window_right);
        pairs += r.end - r.begin;
      }
    }
  const std::int64_t hq = a.q.rank() == 3 ? a.q.dim(1) : 0;
  const auto bytes =
      paged_kv_bytes_read(a.cache, a.seqs, a.mask.window_left >= 0 ? a.mask.window_left + a.max_new_tokens - 1 : -1) +
      static_cast<std::int64_t>(a.q.bytes() + a.k_new.bytes() + a.v_new.bytes() + a.o.bytes());
  return {4 * pairs * hq * a.cache.head_dim, bytes};
}

namespace {

TensorView int32_view(const std::vector<std::int32_t>& v) {
  return {DType::kInt32,
          {static_cast<std::int64_t>(v.size())},
          const_cast<std::int32_t*>(v.data()),
          MemoryKind::kHost};
}

}  // namespace

PagedPlan PagedPlan::placeholder(std::int64_t n) {
  PagedPlan p;
  for (std::int64_t i = 0; i <= n; ++i) {
    p.page_indptr.push_back(static_cast<std::int32_t>(i));
    p.q_indptr.push_back(static_cast<std::int32_t>(i));
  }
  for (std::int64_t i = 0; i < n; ++i) {
    p.page_indices.push_back(static_cast<std::int32_t>(i));
    p.seq_lens.push_back(1);
  }
  return p;
}

void PagedPlan::bind(PagedSequences& seqs) const {
  seqs.page_indptr = int32_view(page_indptr);
  seqs.page_indices = int32_view(page_indices);
  seqs.seq_lens = int32_view(seq_lens);
  seqs.page_indptr_host = page_indptr.data();
  seqs.seq_lens_host = seq_lens.data();
  seqs.max_seq_len = 0;
  for (auto l : seq_lens) seqs.max_seq_len = std::max<std::int64_t>(seqs.max_seq_len, l);
}

void PagedPlan::bind(PagedPrefillArgs& args) const {
  bind(args.seqs);
  args.q_indptr = int32_view(q_indptr);
  args.q_indptr_host = q_indptr.data();
  args.max_new_tokens = 0;
  for (std::size_t i = 0; i + 1 < q_indptr.size(); ++i)
    args.max_new_tokens =
        std::max<std::int64_t>(args.max_new_tokens, q_indptr[i + 1] - q_indptr[i]);
}

}  // namespace attn
