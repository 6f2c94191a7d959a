// Hopper (sm_90a) building blocks shared by the top rungs: mbarriers, TMA (bulk tensor copies),
// shared-memory matrix descriptors and warpgroup MMA (wgmma). Thin wrappers over the PTX; the
// wgmma shapes below are written out because their register lists are part of the instruction.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace attn::cuda::hopper {

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// --- mbarriers ---------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(std::uint64_t* bar, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
// Makes initialized barriers visible to the async proxy (TMA).
__device__ __forceinline__ void mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(std::uint64_t* bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Waits until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(std::uint64_t* bar, std::uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n wait:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra wait;\n}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// --- TMA ---------------------------------------------------------------------------------
// Copies the box at (c0, c1, c2) of the tensor map into shared memory; `bar` hears the bytes land.
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, std::uint64_t* bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(smem_u32(dst)),
      "l"(map), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
// Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from global to shared memory;
// `bar` hears them land.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, std::uint32_t bytes, std::uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                   smem_u32(dst)),
               "l"(src), "r"(bytes), "r"(smem_u32(bar))
               : "memory");
}
// Stores a shared-memory box to the tensor at (c0, c1, c2) (clipped at the tensor's edges).
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(map),
               "r"(smem_u32(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until the committed stores have read their shared memory (it may be overwritten).
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Orders this thread's ordinary shared-memory writes before later TMA reads of them.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// A barrier for `threads` threads of the block (ids 1-15; 0 is __syncthreads).
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Counts this warp toward a named barrier of `threads` without waiting for the others.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(map) : "memory");
}

// --- wgmma -------------------------------------------------------------------------------
// A shared-memory matrix descriptor for a tile stored in 128-byte swizzled rows (the layout TMA
// writes with CU_TENSOR_MAP_SWIZZLE_128B into 1024-byte aligned buffers). `lead` and `stride` are
// the byte offsets between 8-row core-matrix groups along the two dimensions (see the PTX ISA,
// "Matrix Descriptor Format"); for a K-major tile only `stride` matters.
__device__ __forceinline__ std::uint64_t smem_desc(const void* tile, std::uint32_t lead, std::uint32_t stride) {
  return static_cast<std::uint64_t>((smem_u32(tile) & 0x3FFFF) >> 4) |
         (static_cast<std::uint64_t>((lead & 0x3FFFF) >> 4) << 16) |
         (static_cast<std::uint64_t>((stride & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accumulator reads or writes across an asynchronous wgmma.
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// Register budget hand-off between warpgroups (all threads of the warpgroup execute it).
template <int kRegs>
__device__ __forceinline__ void regs_increase() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs)); }
template <int kRegs>
__device__ __forceinline__ void regs_decrease() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs)); }

// The accumulator operands "+f"(d[0]) .. "+f"(d[N - 1]) of a wgmma, for N = 32, 64 and 128.
#define ATTN_ACC8(i)                                                                                    \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define ATTN_ACC32(i) ATTN_ACC8(i), ATTN_ACC8(i + 8), ATTN_ACC8(i + 16), ATTN_ACC8(i + 24)
#define ATTN_ACC64 ATTN_ACC32(0), ATTN_ACC32(32)
#define ATTN_ACC128 ATTN_ACC64, ATTN_ACC32(64), ATTN_ACC32(96)

// Emits the instruction for T's PTX type: EMIT("bf16") or EMIT("f16").
#define ATTN_WGMMA_FOR_TYPE(EMIT)                    \
  if constexpr (std::is_same_v<T, __nv_bfloat16>) \
    EMIT("bf16");                                    \
  else                                               \
    EMIT("f16")

// D (64 x 256, fp32, 128 registers a thread) += A (64 x 16) . B (16 x 256), both in shared memory;
// TY is the PTX type of A and B ("bf16" or "f16"). The register list is part of the instruction.
#define ATTN_WGMMA_M64N256K16(TY)                                                             \
  asm volatile(                                                                                \
      "{\n .reg .pred p;\n setp.ne.b32 p, %130, 0;\n"                                        \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " "                                \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "   \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "   \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "   \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "   \
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "   \
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "   \
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "   \
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "   \
      "%128, %129, p, 1, 1, %131, %132;\n}\n"   \
      : ATTN_ACC128   \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB))

template <class T, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], std::uint64_t desc_a, std::uint64_t desc_b,
                                                 int accumulate) {
  ATTN_WGMMA_FOR_TYPE(ATTN_WGMMA_M64N256K16);
}
#undef ATTN_WGMMA_M64N256K16

// D (64 x 128, fp32, 64 registers a thread) += A (64 x 16) . B (16 x 128), both in shared memory.
#define ATTN_WGMMA_M64N128K16(TY)   \
  asm volatile(   \
      "{\n .reg .pred p;\n setp.ne.b32 p, %66, 0;\n"   \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "   \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "   \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "   \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "   \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "   \
      "%64, %65, p, 1, 1, %67, %68;\n}\n"   \
      : ATTN_ACC64   \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB))

template <class T, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], std::uint64_t desc_a, std::uint64_t desc_b,
                                                 int accumulate) {
  ATTN_WGMMA_FOR_TYPE(ATTN_WGMMA_M64N128K16);
}
#undef ATTN_WGMMA_M64N128K16

// D (64 x 64, fp32, 32 registers a thread) += A (64 x 16) . B (16 x 64), both in shared memory.
#define ATTN_WGMMA_M64N64K16(TY)   \
  asm volatile(   \
      "{\n .reg .pred p;\n setp.ne.b32 p, %34, 0;\n"   \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "   \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "   \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "   \
      "%32, %33, p, 1, 1, %35, %36;\n}\n"   \
      : ATTN_ACC32(0)   \
      : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB))

template <class T, int kTransA, int kTransB>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], std::uint64_t desc_a, std::uint64_t desc_b,
                                                int accumulate) {
  ATTN_WGMMA_FOR_TYPE(ATTN_WGMMA_M64N64K16);
}
#undef ATTN_WGMMA_M64N64K16

// D (64 x 128, fp32, 64 registers a thread) += A (64 x 16, registers: the m16n8k16 A fragment of
// each warp's 16 rows) . B (16 x 128, shared memory). TY: "bf16" or "f16".
#define ATTN_WGMMA_M64N128K16_RS(TY)   \
  asm volatile(   \
      "{\n .reg .pred p;\n setp.ne.b32 p, %69, 0;\n"   \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "   \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "   \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "   \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "   \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "   \
      "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"   \
      : ATTN_ACC64   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB))

template <class T, int kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[64], const unsigned (&a)[4], std::uint64_t desc_b,
                                                 int accumulate) {
  ATTN_WGMMA_FOR_TYPE(ATTN_WGMMA_M64N128K16_RS);
}
#undef ATTN_WGMMA_M64N128K16_RS

// D (64 x 64, fp32, 32 registers a thread) += A (64 x 16, registers: the m16n8k16 A fragment of
// each warp's 16 rows) . B (16 x 64, shared memory). TY: "bf16" or "f16".
#define ATTN_WGMMA_M64N64K16_RS(TY)   \
  asm volatile(   \
      "{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"   \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "   \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "   \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "   \
      "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"   \
      : ATTN_ACC32(0)   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB))

template <class T, int kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const unsigned (&a)[4], std::uint64_t desc_b,
                                                 int accumulate) {
  ATTN_WGMMA_FOR_TYPE(ATTN_WGMMA_M64N64K16_RS);
}
#undef ATTN_WGMMA_M64N64K16_RS

// D (64 x 32 / 64 x 16, fp32, 16 / 8 registers a thread) += A (64 x 16, registers) . B (16 x 32 /
// 16 x 16, shared memory): the last, partial slab of head dims 96 / 32 and 80.
#define ATTN_WGMMA_M64N32K16_RS(TY)   \
  asm volatile(   \
      "{\n .reg .pred p;\n setp.ne.b32 p, %21, 0;\n"   \
      "wgmma.mma_async.sync.aligned.m64n32k16.f32." TY "." TY " "   \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "   \
      "{%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n"   \
      : ATTN_ACC8(0), ATTN_ACC8(8)   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB))

template <class T, int kTransB>
__device__ __forceinline__ void wgmma_m64n32k16_rs(float (&d)[16], const unsigned (&a)[4], std::uint64_t desc_b,
                                                   int accumulate) {
  ATTN_WGMMA_FOR_TYPE(ATTN_WGMMA_M64N32K16_RS);
}
#undef ATTN_WGMMA_M64N32K16_RS

#define ATTN_WGMMA_M64N16K16_RS(TY)   \
  asm volatile(   \
      "{\n .reg .pred p;\n setp.ne.b32 p, %13, 0;\n"   \
      "wgmma.mma_async.sync.aligned.m64n16k16.f32." TY "." TY " "   \
      "{%0, %1, %2, %3, %4, %5, %6, %7}, "   \
      "{%8, %9, %10, %11}, %12, p, 1, 1, %14;\n}\n"   \
      : ATTN_ACC8(0)   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB))

template <class T, int kTransB>
__device__ __forceinline__ void wgmma_m64n16k16_rs(float (&d)[8], const unsigned (&a)[4], std::uint64_t desc_b,
                                                   int accumulate) {
  ATTN_WGMMA_FOR_TYPE(ATTN_WGMMA_M64N16K16_RS);
}
#undef ATTN_WGMMA_M64N16K16_RS

#undef ATTN_WGMMA_FOR_TYPE
#undef ATTN_ACC128
#undef ATTN_ACC64
#undef ATTN_ACC32
#undef ATTN_ACC8

}  // namespace attn::cuda::hopper
