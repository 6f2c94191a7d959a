// A ragged batch of sequences over a device KV cache for the GPU tests of the paged ops: each
// sequence brings `fresh` new tokens onto `cached` ones. The pools start as NaN everywhere (unused
// pages, the slots the call must fill, the tails of last pages) but for the cached tokens, so a
// missing append, a read past a sequence's end or of another sequence's page turns the output into
// NaN. Pages are handed out in shuffled order.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attn/paged_ops.h"
#include "support/gpu_executor.h"
#include "support/random.h"

namespace attn::testing {

struct PagedCase {
  std::int64_t hq, hkv, d;
  std::vector<std::int32_t> cached, fresh;
};

struct PagedBatch {
  PagedPlan plan;
  PagedKvLayer host, device;  // the same pools: host copy (as before the call) and device
  Tensor k_host, v_host;
  std::int64_t tokens = 0;

  PagedBatch(DType dt, const PagedCase& c, std::int64_t page_size, std::mt19937_64& rng) {
    const std::size_t n = c.cached.size();
    std::vector<std::int64_t> pages_of(n);
    std::int64_t pages = 3;  // three pages nobody owns
    for (std::size_t i = 0; i < n; ++i) {
      pages_of[i] = (c.cached[i] + c.fresh[i] + page_size - 1) / page_size;
      pages += pages_of[i];
    }
    std::vector<std::int32_t> ids(static_cast<std::size_t>(pages));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    plan.page_indptr.push_back(0);
    plan.q_indptr.push_back(0);
    std::size_t next = 0;
    for (std::size_t i = 0; i < n; ++i) {
      for (std::int64_t k = 0; k < pages_of[i]; ++k) plan.page_indices.push_back(ids[next++]);
      plan.page_indptr.push_back(static_cast<std::int32_t>(plan.page_indices.size()));
      plan.seq_lens.push_back(c.cached[i] + c.fresh[i]);
      plan.q_indptr.push_back(plan.q_indptr.back() + c.fresh[i]);
    }
    tokens = plan.q_indptr.back();
    host = PagedKvLayer{dt, pages, c.hkv, page_size, c.d, nullptr, nullptr, MemoryKind::kHost};
    const Shape pool_shape{pages, c.hkv, page_size, c.d};
    k_host = Tensor(dt, pool_shape);
    v_host = Tensor(dt, pool_shape);
    testing::poison(k_host);
    testing::poison(v_host);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (std::size_t i = 0; i < n; ++i)
      for (std::int64_t t = 0; t < c.cached[i]; ++t) {
        const std::int64_t page = plan.page_indices[plan.page_indptr[i] + t / page_size];
        for (std::int64_t h = 0; h < c.hkv; ++h)
          for (std::int64_t x = 0; x < c.d; ++x) {
            const auto at = static_cast<std::size_t>(host.offset(page, h, t % page_size) + x);
            k_host.set(at, dist(rng));
            v_host.set(at, dist(rng));
          }
      }
    host.k = k_host.data();
    host.v = v_host.data();
    device = host;
    device.memory = MemoryKind::kDevice;
    device.k = must(gpu()->allocate(k_host.bytes()));
    device.v = must(gpu()->allocate(v_host.bytes()));
    EXPECT_TRUE(gpu()->write(device.k, 0, k_host.data(), k_host.bytes()).ok());
    EXPECT_TRUE(gpu()->write(device.v, 0, v_host.data(), v_host.bytes()).ok());
  }
  ~PagedBatch() {
    gpu()->deallocate(device.k);
    gpu()->deallocate(device.v);
  }
  PagedBatch(const PagedBatch&) = delete;
  PagedBatch& operator=(const PagedBatch&) = delete;

  static void* must(Result<void*> r) {
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    return r.ok() ? *r : nullptr;
  }

  // The device pools after the call must equal the host pools with exactly the new rows written
  // (bit for bit): nothing else in the cache may change.
  void expect_appended(const Tensor& k_new, const Tensor& v_new) const {
    Tensor k_want = k_host, v_want = v_host;
    const std::size_t es = element_size(host.dtype), row = static_cast<std::size_t>(host.head_dim) * es;
    for (std::size_t i = 0; i + 1 < plan.q_indptr.size(); ++i)
      for (std::int32_t r = plan.q_indptr[i]; r < plan.q_indptr[i + 1]; ++r) {
        const std::int64_t t = plan.seq_lens[i] - (plan.q_indptr[i + 1] - r);
        const std::int64_t page = plan.page_indices[plan.page_indptr[i] + t / host.page_size];
        for (std::int64_t h = 0; h < host.heads_kv; ++h) {
          const std::size_t dst = static_cast<std::size_t>(host.offset(page, h, t % host.page_size)) * es;
          const std::size_t src = static_cast<std::size_t>((r * host.heads_kv + h) * host.head_dim) * es;
          std::memcpy(static_cast<char*>(k_want.data()) + dst, static_cast<const char*>(k_new.data()) + src, row);
          std::memcpy(static_cast<char*>(v_want.data()) + dst, static_cast<const char*>(v_new.data()) + src, row);
        }
      }
    Tensor k_got(host.dtype, k_host.shape()), v_got(host.dtype, v_host.shape());
    ASSERT_TRUE(gpu()->read(k_got.data(), device.k, 0, k_got.bytes()).ok());
    ASSERT_TRUE(gpu()->read(v_got.data(), device.v, 0, v_got.bytes()).ok());
    EXPECT_EQ(std::memcmp(k_got.data(), k_want.data(), k_want.bytes()), 0) << "K pool: appended rows or others differ";
    EXPECT_EQ(std::memcmp(v_got.data(), v_want.data(), v_want.bytes()), 0) << "V pool: appended rows or others differ";
  }
};


inline std::string paged_trace(DType dt, const PagedCase& c, std::int64_t ps) {
  std::string s = std::string(dtype_name(dt)) + " Hq" + std::to_string(c.hq) + " Hkv" + std::to_string(c.hkv) + " D" +
                  std::to_string(c.d) + " page " + std::to_string(ps) + " cached/new:";
  for (std::size_t i = 0; i < c.cached.size(); ++i)
    s.append(" ").append(std::to_string(c.cached[i])).append("+").append(std::to_string(c.fresh[i]));
  return s + " seed=" + std::to_string(testing::seed());
}

inline std::int64_t longest(const PagedCase& c) {
  std::int64_t m = 1;
  for (std::size_t i = 0; i < c.cached.size(); ++i) m = std::max<std::int64_t>(m, c.cached[i] + c.fresh[i]);
  return m;
}

}  // namespace attn::testing
