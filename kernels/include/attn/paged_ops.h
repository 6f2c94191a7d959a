// The KV-cache ops: attention of a ragged batch of sequences over a paged KV cache, after
// appending each sequence's new K/V rows to it (vLLM's PagedAttention layout). One call serves
// one layer: decode (one new token per sequence) or prefill/extend (any number of new tokens per
// sequence, packed, causal).
//
// The cache of one layer is two pools of pages, K and V, each [pages, Hkv, page_size, D]: a page
// holds `page_size` consecutive tokens of one sequence for every key/value head, one head's
// tokens contiguous (page_size x D elements). A sequence's page table lists its pages in token
// order; token t of a sequence sits in page table[t / page_size] at row t % page_size. The
// server owns the page tables, the free list and sharing between sequences; the kernels only read
// the tables and write the new rows into the slots the tables give them.
//
// The integer arrays (page tables, lengths, offsets) are int32 tensors, staged to the device
// like any other input. Their host copies ride along (`*_host`) so that a launcher can plan the
// work (split the long sequences, balance the SMs) without a round trip.
#pragma once

#include <cstdint>
#include <vector>

#include "attn/ops.h"

namespace attn {

// How a KV cache stores K and V: in its dtype (that of q, the new K/V rows and o), or as float8
// e4m3 codes with a float32 scale per (page, kv head) of each pool (attn/fp8.h): element
// (page, h, row, c) holds e4m3(code) x scale[page, h].
enum class KvStorage : std::uint8_t { kDType, kFloat8E4M3 };

// "dtype" (the cache's own) or "float8_e4m3".
const char* kv_storage_name(KvStorage s);

// One layer of a paged KV cache, where it lives.
struct PagedKvLayer {
  DType dtype = DType::kBFloat16;
  std::int64_t pages = 0, heads_kv = 0, page_size = 0, head_dim = 0;
  void* k = nullptr;  // [pages, Hkv, page_size, D]
  void* v = nullptr;  // [pages, Hkv, page_size, D]
  MemoryKind memory = MemoryKind::kHost;
  KvStorage storage = KvStorage::kDType;
  // float8 storage: float32 [pages, Hkv] per pool, in the pools' memory. With fixed_scales (the
  // client calibrated them) an append quantizes with the page's scale, saturating at +-448 x
  // scale, and never changes it. Otherwise the append sets them: a page's first rows (row 0)
  // give it the power-of-two scale of their largest magnitude (fp8_pow2_scale); later rows that
  // need more grow it to theirs, and the rows already in the page are requantized to the new
  // scale (exactly, scales being powers of two, but for values falling into e4m3's subnormals).
  // A page is only ever appended to by the one sequence holding it (the server copies a shared
  // page before anyone writes it), so a scale never changes under another sequence.
  float* k_scales = nullptr;
  float* v_scales = nullptr;
  bool fixed_scales = false;

  bool fp8() const { return storage == KvStorage::kFloat8E4M3; }
  // Bytes of one stored element: 1 for float8, the dtype's otherwise.
  std::size_t storage_element_size() const { return fp8() ? 1 : element_size(dtype); }
  // Elements of one page of one pool, and the offset of (page, head, row) in a pool.
  std::int64_t page_elements() const { return heads_kv * page_size * head_dim; }
  std::int64_t offset(std::int64_t page, std::int64_t head, std::int64_t row) const {
    return ((page * heads_kv + head) * page_size + row) * head_dim;
  }
};

// The sequences of one call, ragged: sequence i holds seq_lens[i] tokens once the call's new rows
// are appended; its last new_tokens(i) tokens are the new ones (positions seq_lens[i] - new ..
// seq_lens[i] - 1) and its pages are page_indices[page_indptr[i] .. page_indptr[i + 1]).
struct PagedSequences {
  TensorView page_indptr;   // int32 [n + 1], page_indptr[0] = 0
  TensorView page_indices;  // int32 [page_indptr[n]]
  TensorView seq_lens;      // int32 [n], each >= 1 and <= pages of i x page_size
  // Host copies of the same arrays (valid for the call), for launch planning.
  const std::int32_t* page_indptr_host = nullptr;
  const std::int32_t* seq_lens_host = nullptr;
  std::int64_t max_seq_len = 0;  // the largest seq_lens[i]

  std::int64_t count() const { return seq_lens.shape.empty() ? 0 : seq_lens.dim(0); }
};

// Decode: one new token per sequence. Appends k_new[i], v_new[i] at position seq_lens[i] - 1 of
// sequence i, then o[i] = softmax(scale . q[i] K_i^T) V_i over the sequence's whole cache, the new
// row included; query head h reads key/value head h / (Hq / Hkv).
struct PagedDecodeArgs {
  TensorView q;             // [n, Hq, D]
  TensorView k_new, v_new;  // [n, Hkv, D], the cache's dtype
  TensorView o;             // [n, Hq, D]
  TensorView lse;           // optional float32 [n, Hq]; empty when not wanted
  PagedKvLayer cache;
  PagedSequences seqs;
  float scale = 0.0f;  // resolved: never 0 once it reaches a kernel
  // Prefill's one-token case: the new token sits at the end of its sequence (position len - 1), so
  // the causal mask sees every key; a window (mask.window_left >= 0) keeps the keys at positions
  // len - 1 - window_left .. len - 1 (window_right has no effect under causal).
  AttentionMask mask{true};
  float softcap = 0.0f;  // as AttentionArgs::softcap; 0: none
  TensorView sinks;      // as AttentionArgs::sinks: optional float32 [Hq]
  // Calls merged into this one (dynamic batching), on the host: call c owns sequences
  // merged_calls_host[c] .. merged_calls_host[c + 1] - 1 (merged_calls + 1 offsets, 0 to n).
  // Variants that plan their work across the batch (split-KV chunk lengths) plan each call's
  // sequences as they would plan that call alone, so each sequence's output has the same bits as
  // when its call runs alone. Null: one call.
  const std::int32_t* merged_calls_host = nullptr;
  std::int64_t merged_calls = 0;
};

// Prefill / extend: sequence i brings new_i = q_indptr[i + 1] - q_indptr[i] tokens (rows
// q_indptr[i] .. of the packed q, k_new, v_new). Appends them at positions seq_lens[i] - new_i ..
// seq_lens[i] - 1, then each new token attends to the sequence's earlier cache and, when causal,
// to the new tokens up to itself (bottom-right aligned: new token j sits at position
// seq_lens[i] - new_i + j and sees the keys at positions <= that: mask.causal); when not causal,
// to all of the sequence's tokens.
struct PagedPrefillArgs {
  TensorView q;             // [T, Hq, D], T = q_indptr[n]
  TensorView k_new, v_new;  // [T, Hkv, D]
  TensorView o;             // [T, Hq, D]
  TensorView lse;           // optional float32 [T, Hq]
  TensorView q_indptr;      // int32 [n + 1], q_indptr[0] = 0, non-decreasing, each step >= 1
  const std::int32_t* q_indptr_host = nullptr;
  std::int64_t max_new_tokens = 0;  // the largest new_i
  PagedKvLayer cache;
  PagedSequences seqs;
  // Causal by default. A window keeps, for the new token at position p, the keys at positions
  // p - window_left .. p + window_right (window_right only when not causal), as AttentionArgs.
  AttentionMask mask{true};
  float scale = 0.0f;
  float softcap = 0.0f;  // as AttentionArgs::softcap; 0: none
  TensorView sinks;      // as AttentionArgs::sinks: optional float32 [Hq]
};

// The shape rules of both (everything but the values of the integer arrays, which the server
// builds itself): q/k_new/v_new/o shapes against each other and the cache, dtypes, GQA. Messages
// name the field.
Status check_paged_decode(const PagedDecodeArgs& a);
Status check_paged_prefill(const PagedPrefillArgs& a);

// Bytes of K/V a paged call reads (every sequence's cached tokens, all heads; with a window of
// window_left >= 0 keys before the last token, the last window_left + 1 of each): the figure its
// bandwidth is quoted against.
std::int64_t paged_kv_bytes_read(const PagedKvLayer& cache, const PagedSequences& seqs,
                                 std::int64_t window_left = -1);

template <>
struct OpDesc<PagedDecodeArgs> {
  using Args = PagedDecodeArgs;
  static constexpr Op kOp = Op::kPagedDecode;
  static constexpr const char* kName = "paged_decode";
  static Status check(const PagedDecodeArgs& a) { return check_paged_decode(a); }
  static OpCost cost(const PagedDecodeArgs& a);
  static std::vector<TensorView*> inputs(PagedDecodeArgs& a) {
    std::vector<TensorView*> in{&a.q, &a.k_new, &a.v_new, &a.seqs.page_indptr, &a.seqs.page_indices, &a.seqs.seq_lens};
    if (!a.sinks.empty()) in.push_back(&a.sinks);
    return in;
  }
  static std::vector<TensorView*> outputs(PagedDecodeArgs& a) {
    if (a.lse.empty()) return {&a.o};
    return {&a.o, &a.lse};
  }
};

template <>
struct OpDesc<PagedPrefillArgs> {
  using Args = PagedPrefillArgs;
  static constexpr Op kOp = Op::kPagedPrefill;
  static constexpr const char* kName = "paged_prefill";
  static Status check(const PagedPrefillArgs& a) { return check_paged_prefill(a); }
  static OpCost cost(const PagedPrefillArgs& a);
  static std::vector<TensorView*> inputs(PagedPrefillArgs& a) {
    std::vector<TensorView*> in{&a.q,         &a.k_new, &a.v_new, &a.q_indptr, &a.seqs.page_indptr,
                                &a.seqs.page_indices, &a.seqs.seq_lens};
    if (!a.sinks.empty()) in.push_back(&a.sinks);
    return in;
  }
  static std::vector<TensorView*> outputs(PagedPrefillArgs& a) {
    if (a.lse.empty()) return {&a.o};
    return {&a.o, &a.lse};
  }
};

// The KV-cache ops, which have state and are driven by the server's caches (not by Benchmark's
// generated problems): their variants sit in the registry beside the one-shot ops.
using PagedOpArgs = std::tuple<PagedDecodeArgs, PagedPrefillArgs>;

// A host-side helper for tests, benchmarks and the server: the int32 arrays of a call built from
// page tables and lengths, kept alive together, and views of them.
struct PagedPlan {
  std::vector<std::int32_t> page_indptr, page_indices, seq_lens, q_indptr;

  // n sequences of one token each, sequence i in page i: the shape of a call of n sequences
  // before its real plan exists, for choosing a variant (whose `supports` looks at the arrays'
  // shapes and at the host copies being there, not at their values).
  static PagedPlan placeholder(std::int64_t n);

  // Fills `seqs` (and, for prefill, q_indptr) with host views of these arrays.
  void bind(PagedSequences& seqs) const;
  void bind(PagedPrefillArgs& args) const;
};

}  // namespace attn
