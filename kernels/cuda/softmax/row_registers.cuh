// A chunk of a row held in registers as raw 16-byte vectors, for rungs 05 and 06: read once,
// reduced and written from registers, so the row costs one read and one write of memory.
#pragma once

#include "softmax_common.cuh"

namespace attn::cuda {

// 16-byte vectors a thread holds at 1024 threads a block (64 registers each): 8 for float32
// (32 values), 4 for 16-bit types (32 values), the most that fits without spilling. With fewer
// threads a block, 16-bit types hold 8 as well.
template <class T>
constexpr int vectors_per_thread() {
  return sizeof(T) == 4 ? 8 : 4;
}

template <class T, int kVectors = vectors_per_thread<T>()>
struct RowChunk {
  static constexpr int kPerVector = 16 / sizeof(T);
  static constexpr int kVectorsPerThread = kVectors;
  uint4 raw[kVectorsPerThread];

  __device__ __forceinline__ static float element(const uint4& v, int e) {
    return to_float(reinterpret_cast<const T*>(&v)[e]);
  }

  // Vector i of this thread covers columns [col(i), col(i) + kPerVector), col(i) =
  // (begin_vec + t + i * stride) * kPerVector, clipped to [0, end_col).
  __device__ __forceinline__ void load(const T* row, int t, int stride, int begin_vec, int end_col,
                                       bool aligned) {
#pragma unroll
    for (int i = 0; i < kVectorsPerThread; ++i) {
      const int col = (begin_vec + t + i * stride) * kPerVector;
      if (aligned && col + kPerVector <= end_col) {
        raw[i] = *reinterpret_cast<const uint4*>(row + col);
      } else {
        T* out = reinterpret_cast<T*>(&raw[i]);
#pragma unroll
        for (int e = 0; e < kPerVector; ++e) out[e] = col + e < end_col ? row[col + e] : from_float<T>(0.0f);
      }
    }
  }

  // (max, sum of exp(x - max)) over the chunk's columns inside [0, end_col).
  __device__ __forceinline__ MaxSum reduce(int t, int stride, int begin_vec, int end_col) const {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kVectorsPerThread; ++i) {
      const int col = (begin_vec + t + i * stride) * kPerVector;
#pragma unroll
      for (int e = 0; e < kPerVector; ++e)
        if (col + e < end_col) m = fmaxf(m, element(raw[i], e));
    }
    float s = 0.0f;
    if (m != -INFINITY) {
#pragma unroll
      for (int i = 0; i < kVectorsPerThread; ++i) {
        const int col = (begin_vec + t + i * stride) * kPerVector;
#pragma unroll
        for (int e = 0; e < kPerVector; ++e)
          if (col + e < end_col) s += __expf(element(raw[i], e) - m);
      }
    }
    return {m, s};
  }

  __device__ __forceinline__ void store(T* row, int t, int stride, int begin_vec, int end_col, bool aligned,
                                        MaxSum total) const {
    const float inv = 1.0f / total.s;
#pragma unroll
    for (int i = 0; i < kVectorsPerThread; ++i) {
      const int col = (begin_vec + t + i * stride) * kPerVector;
      if (col >= end_col) continue;
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int e = 0; e < kPerVector; ++e) o[e] = from_float<T>(__expf(element(raw[i], e) - total.m) * inv);
      if (aligned && col + kPerVector <= end_col) {
        *reinterpret_cast<uint4*>(row + col) = out;
      } else {
#pragma unroll
        for (int e = 0; e < kPerVector; ++e)
          if (col + e < end_col) row[col + e] = o[e];
      }
    }
  }
};

}  // namespace attn::cuda
