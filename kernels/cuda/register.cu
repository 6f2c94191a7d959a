// The CUDA backend's variants. Each rung lives in its own numbered file under matmul/, softmax/,
// attention/, paged_decode/ and paged_prefill/; this table names them, ranks them for `auto` and
// builds each entry from what the rung takes (its RungCaps: the dtypes, the minimum compute
// capability and ListKernels' limits text come from the data the rung's checks read).
#include <iterator>

#include "attn/registry.h"
#include "common/rung_caps.h"
#include "matmul/matmul_common.cuh"
#include "matmul/matmul_rungs.h"
#include "softmax/softmax_rungs.h"
#include "attention/attention_rungs.h"
#include "paged_decode/paged_decode_rungs.h"

namespace attn {
namespace {

// A CUDA variant: its registry entry from what it takes (caps: dtypes, head dims, groups, options,
// architecture), so that its dtypes, minimum compute capability and ListKernels' limits text are
// those its checks read.
template <class Args>
Variant<Args> variant(const char* name, const cuda::RungCaps& caps, const char* description, int priority,
                      std::function<Status(const Args&)> supports, std::function<Status(const Args&, Stream&)> run,
                      std::function<int(const Args&)> rank = {}) {
  VariantInfo info;
  info.name = name;
  info.op = OpDesc<Args>::kOp;
  info.backend = Backend::kCuda;
  info.dtypes = caps.dtype_list();
  info.limits = cuda::limits_text(caps, OpDesc<Args>::kOp);
  info.description = description;
  info.priority = priority;
  info.min_compute_capability = caps.min_arch;
  return {std::move(info), std::move(supports), std::move(run), std::move(rank)};
}

}  // namespace

void register_cuda_variants(Registry& r) {
  using namespace cuda;
  // Matmul and softmax take no head dims or groups: their caps are dtypes, architecture and words.
  constexpr RungCaps fp32 = RungCaps().with_dtypes({DType::kFloat32}).with_more("M, N, K < 2^31");
  constexpr RungCaps half = RungCaps().with_dtypes({DType::kBFloat16, DType::kFloat16});
  constexpr RungCaps all = RungCaps().with_dtypes({kAllDTypes[0], kAllDTypes[1], kAllDTypes[2]});
  static_assert(std::size(kAllDTypes) == 3);
  struct MatmulRung {
    const char* name;
    Status (*run)(const MatmulArgs&, Stream&);
    const char* description;
    int priority;
  };
  const MatmulRung matmul_rungs[] = {
      {"matmul/01_naive", matmul_01_naive, "a thread per output, uncoalesced", 1},
      {"matmul/02_coalesced", matmul_02_coalesced, "a thread per output, coalesced along N", 2},
      {"matmul/03_smem_tiled", matmul_03_smem_tiled, "32x32 shared-memory tiles", 3},
      {"matmul/04_1d_blocktile", matmul_04_1d_blocktile, "64x64 tiles, 8 outputs per thread", 4},
      {"matmul/05_2d_blocktile", matmul_05_2d_blocktile, "128x128 tiles, 8x8 outputs per thread", 5},
      {"matmul/06_vectorized", matmul_06_vectorized,
       "128-bit loads, conflict-free warp tiles, double-buffered K tiles", 6},
  };
  auto& matmul = r.of<MatmulArgs>();
  for (const auto& m : matmul_rungs)
    matmul.add(variant<MatmulArgs>(m.name, fp32, m.description, m.priority, fp32_supports, m.run));
  constexpr RungCaps mma_operands = half.with_more("contiguous dimensions multiples of 8");
  matmul.add(variant<MatmulArgs>("matmul/07_mma_pipelined", mma_operands,
                                 "mma.sync tensor cores, ldmatrix from swizzled tiles, 3-stage cp.async pipeline",
                                 /*priority=*/7, matmul_07_supports, matmul_07_mma_pipelined));
  matmul.add(variant<MatmulArgs>(
      "matmul/08_wgmma_tma", mma_operands.on_hopper_only(),
      "wgmma from TMA-filled 128-byte-swizzled stages, producer/consumer warpgroups, persistent",
      /*priority=*/8, matmul_08_supports, matmul_08_wgmma_tma, [](const MatmulArgs& a) {
        // Ahead of cuBLAS (priority 100) where its tiles fill the GPU without splitting K:
        // 1.04-1.11x there on an H100 (M = 128..1024 x 8192 x 8192, 2048^3, 4096^3);
        // 0.78-0.91x at M = 192 and 384 (fill 0.73: padded rows, a partial last wave)
        // and 0.8-0.9x with split K.
        const auto d = matmul_dims(a.a, a.b, a.transpose_a, a.transpose_b);
        if (!d.ok()) return 8;
        const Matmul08Form f = matmul_08_form(*d, device_sms_of_current());
        return f.splits == 1 && f.fill >= 0.85 ? 101 : 8;
      }));
  matmul.add(variant<MatmulArgs>("matmul/cublas",
                                 all.with_more("cuBLAS; float32 without TF32, float16/bfloat16 with float32 accumulation"),
                                 "the vendor library, the reference for the ladder", /*priority=*/100,
                                 matmul_cublas_supports, matmul_cublas));

  auto& softmax = r.of<SoftmaxArgs>();
  auto any_softmax = [](const SoftmaxArgs& a) { return softmax_dims(a.x).status(); };
  struct SoftmaxRung {
    const char* name;
    Status (*run)(const SoftmaxArgs&, Stream&);
    const char* description;
    int priority;
  };
  const SoftmaxRung softmax_rungs[] = {
      {"softmax/01_naive", softmax_01_naive, "a thread per row, three passes", 1},
      {"softmax/02_block_row", softmax_02_block_row, "a block per row, shared-memory reductions", 2},
      {"softmax/03_warp_row", softmax_03_warp_row, "a warp per row, shuffle reductions", 3},
      {"softmax/04_online", softmax_04_online, "max and sum in one pass: two reads, one write", 4},
  };
  for (const auto& s : softmax_rungs)
    softmax.add(variant<SoftmaxArgs>(s.name, all.with_more("any width"), s.description, s.priority, any_softmax, s.run));
  softmax.add(variant<SoftmaxArgs>("softmax/05_vectorized", all.with_more("rows up to 32k columns"),
                                   "128-bit access, the row in registers: one read, one write", /*priority=*/5,
                                   softmax_05_supports, softmax_05_vectorized));
  // Split rows pay off when a row is wide enough to keep 8 blocks busy and rows are too few to
  // fill the GPU one block each.
  softmax.add(variant<SoftmaxArgs>(
      "softmax/06_split_row",
      all.with_min_arch(90).with_more("rows up to 256k float32 / 512k 16-bit columns; for rows wider than 05 holds"),
      "a cluster of 2 to 16 blocks per row, partial results through distributed shared memory", /*priority=*/5,
      softmax_06_supports, softmax_06_split_row, [](const SoftmaxArgs& a) {
        const auto d = softmax_dims(a.x);
        // Only where 05 refuses: at 32k columns 05 measured 0.84x (fp32) and 0.82x (bf16)
        // against 06's 0.72x and 0.45x (H200, 2026-11-30).
        return d.ok() && d->cols > softmax_05_capacity(a.x.dtype) ? 6 : 3;
      }));
  // Ahead where it measured ahead (H200, 2026-11-30, same run): 16-bit rows of 513-1024 columns
  // (bf16 1k: 0.86x of copy, 05 0.65x; at 2k 05 is ahead, 0.93x against 0.80x) and float32 rows
  // of 32k-64k columns (64k: 0.75x, 06 0.69x; 05 takes 32k at 0.84x). Elsewhere 05 and 06.
  softmax.add(variant<SoftmaxArgs>(
      "softmax/07_bulk_ring",
      all.with_min_arch(90).with_more(
          "width x element size a multiple of 16 bytes; rows up to 400k float32 / 800k 16-bit columns; "
          "ranked first for 16-bit rows of 513-1024 and float32 rows of 32k-64k columns"),
      "persistent blocks, rows through a ring of shared-memory stages filled by bulk copies; wide rows "
      "split over a cluster",
      /*priority=*/5, softmax_07_supports, softmax_07_bulk_ring, [](const SoftmaxArgs& a) {
        const auto d = softmax_dims(a.x);
        if (!d.ok()) return 3;
        const bool fp32 = a.x.dtype == DType::kFloat32;
        const bool narrow_16bit = !fp32 && d->cols > 512 && d->cols <= 1024;
        const bool fp32_64k = fp32 && d->cols > 32768 && d->cols <= 65536;
        return narrow_16bit || fp32_64k ? 7 : 3;
      }));

  // Attention, paged decode and paged prefill: their caps live beside their entry points in the
  // rungs' headers, where their checks read them too.
  auto& attention = r.of<AttentionArgs>();
  attention.add(variant<AttentionArgs>("attention/01_naive", kAttention01Caps,
                                       "S = QK^T materialized, softmax, O = PV: three kernels", /*priority=*/1,
                                       attention_01_supports, attention_01_naive));
  attention.add(variant<AttentionArgs>("attention/02_flash_fp32", kAttention02Caps,
                                       "K/V tiles in shared memory, online softmax, S never stored; CUDA cores",
                                       /*priority=*/2, attention_02_supports, attention_02_flash_fp32));
  attention.add(variant<AttentionArgs>("attention/03_flash_mma", kAttention03Caps,
                                       "FlashAttention-2 split on mma.sync tensor cores, cp.async double buffering",
                                       /*priority=*/3, attention_03_supports, attention_03_flash_mma));
  attention.add(variant<AttentionArgs>(
      "attention/04_wgmma_tma", kAttention04Caps,
      "FlashAttention-3 style: wgmma + TMA ring, producer/consumer warpgroups ping-ponging, "
      "softmax under the next tile's matmuls, persistent blocks",
      /*priority=*/2, attention_04_supports, attention_04_wgmma_tma, [](const AttentionArgs& a) {
        // Ahead of rung 03 (3) from head dim 80 up (1.4-2.1x on the H200); behind it at 32
        // and 64, where 03 measured 1.0-1.5x ahead (the softmax outweighs a tile's matrix
        // work: bench/results/2026-11-30-h200-head-dims.md). One query row goes to the
        // decode rungs (4, 5).
        const auto d = attention_dims(a.q, a.k, a.v);
        return d.ok() && d->len_q > 1 && d->head_dim > 64 ? 4 : 2;
      }));
  attention.add(variant<AttentionArgs>("attention/decode_split_kv", kAttentionDecodeCaps,
                                       "flash-decoding: keys split across blocks, merged by log-sum-exp",
                                       /*priority=*/4, attention_decode_supports, attention_decode_split_kv));
  // The KV-cache ops: the append is part of every call (one launch for the batch before the
  // attention kernel on the same stream).
  auto& paged_decode = r.of<PagedDecodeArgs>();
  paged_decode.add(variant<PagedDecodeArgs>(
      "paged_decode/01_block_per_head", kPagedDecode01Caps,
      "a block per (sequence, kv head, group slice) walking the pages in its window, the slice's query heads "
      "sharing each row; takes every dtype, head dim and option", /*priority=*/1,
      paged_decode_01_supports, paged_decode_01_block_per_head));
  paged_decode.add(variant<PagedDecodeArgs>(
      "paged_decode/02_split_kv", kPagedDecode02Caps,
      "keys split into equal chunks planned from the lengths (about 4 waves), pages through bulk copies into a "
      "shared-memory ring, chunks merged by log-sum-exp",
      /*priority=*/2, paged_decode_02_supports, paged_decode_02_split_kv));
  paged_decode.add(variant<PagedDecodeArgs>(
      "paged_decode/03_split_kv_mma", kPagedDecode03Caps,
      "rung 02's plan and merge with the GQA group's scores and output on mma.sync tensor cores, pages gathered "
      "by cp.async into swizzled 3-stage tiles",
      /*priority=*/3, paged_decode_03_supports, paged_decode_03_split_kv_mma));
  paged_decode.add(variant<PagedDecodeArgs>(
      "paged_decode/04_warp_pipes", kPagedDecode04Caps,
      "rung 03 with a cp.async pipeline per warp (16-key tiles, 3 stages, __syncwarp only): 8 independent page "
      "streams per SM instead of 2",
      /*priority=*/4, paged_decode_04_supports, paged_decode_04_warp_pipes));
  // Ahead of decode_split_kv (4) at every measured shape since it runs rung 04's kernel (H200,
  // bf16, 32/8 heads, D = 128, one job: 1.31x at 1 x 32k, 1.41x at 32 x 4k, 1.38x at 16 x 16k,
  // 1.83x at 64 x 8k, 1.0x at 1 x 4k; bench/results/2026-11-30-h200-serving.md).
  attention.add(variant<AttentionArgs>(
      "attention/decode_mma_split", kAttentionDecodeMmaCaps,
      "paged_decode/04's kernel on dense K/V: equal key chunks over about 4 waves, the GQA group on mma.sync, a "
      "cp.async pipeline per warp, merged by log-sum-exp",
      /*priority=*/5, attention_decode_mma_supports, attention_decode_mma_split));
  auto& paged_prefill = r.of<PagedPrefillArgs>();
  paged_prefill.add(variant<PagedPrefillArgs>(
      "paged_prefill/00_block_per_row", kPagedPrefill00Caps,
      "paged_decode/01's kernel for every new token: a block per (token, kv head, group slice) walking the "
      "keys it sees on CUDA cores; takes every dtype, head dim and option",
      /*priority=*/0, paged_prefill_00_supports, paged_prefill_00_block_per_row));
  paged_prefill.add(variant<PagedPrefillArgs>(
      "paged_prefill/01_flash_mma", kPagedPrefill01Caps,
      "FlashAttention-2 on mma.sync over (token, group head) rows, K/V tiles gathered from the pages with "
      "cp.async, causal bottom-right per sequence",
      /*priority=*/1, paged_prefill_01_supports, paged_prefill_01_flash_mma));
  // Rung 02 ahead of rung 01 wherever it applies (page sizes 16 to 128): 1.4x to 2.2x rung 01 on the
  // H200 at 64-onto-8k and 2k-onto-0, pages 16 and 64 (bench/results/2026-11-30-h200-serving.md).
  paged_prefill.add(variant<PagedPrefillArgs>(
      "paged_prefill/02_wgmma", kPagedPrefill02Caps,
      "attention/04's wgmma + TMA ring over the pages (a box per page), producer/consumer warpgroups "
      "ping-ponging, persistent blocks on a queue of (sequence, kv head, tile) items, latest first",
      /*priority=*/2, paged_prefill_02_supports, paged_prefill_02_wgmma));
}

}  // namespace attn
