// The test's own copy of a KV cache (every sequence's K and V rows per layer, as the server
// holds them: rounded to the dtype) and float64 attention over it; wire helpers.
#pragma once

#include <cmath>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "attn/tensor.h"
#include "attn/wire.h"

namespace attn::testing {

inline v1::Tensor to_wire(const Tensor& t) {
  v1::Tensor out;
  wire::encode_tensor(t.view(), &out);
  return out;
}

inline Tensor from_wire(const v1::Tensor& t) {
  auto d = wire::decode_tensor(t, "out", {});
  if (!d.ok()) return {};
  Tensor out(d->view.dtype, d->view.shape);
  std::memcpy(out.data(), d->view.data, out.bytes());
  return out;
}

// Every sequence's K and V rows per layer; attention over them in float64.
struct Mirror {
  std::int64_t hkv, d;
  std::map<std::string, std::vector<std::vector<float>>> k, v;  // id -> layer -> rows [len, Hkv, D]

  void append(const std::string& id, int layer, int layers, const Tensor& kn, const Tensor& vn,
              std::int64_t row, std::int64_t count) {
    auto& ks = k[id];
    auto& vs = v[id];
    if (ks.empty())
      ks.resize(static_cast<std::size_t>(layers)), vs.resize(static_cast<std::size_t>(layers));
    for (std::int64_t r = row; r < row + count; ++r)
      for (std::int64_t e = 0; e < hkv * d; ++e) {
        ks[static_cast<std::size_t>(layer)].push_back(
            kn.get(static_cast<std::size_t>(r * hkv * d + e)));
        vs[static_cast<std::size_t>(layer)].push_back(
            vn.get(static_cast<std::size_t>(r * hkv * d + e)));
      }
  }
  std::int64_t length(const std::string& id, int layer) const {
    return static_cast<std::int64_t>(k.at(id)[static_cast<std::size_t>(layer)].size()) / (hkv * d);
  }
  // Output row `row` of q (all heads) attending to the first `visible` tokens of `id` at `layer`.
  void attend(const Tensor& q, std::int64_t row, const std::string& id, int layer,
              std::int64_t visible, std::vector<double>& out) const {
    const std::int64_t hq = q.shape()[1], group = hq / hkv;
    const auto& ks = k.at(id)[static_cast<std::size_t>(layer)];
    const auto& vs = v.at(id)[static_cast<std::size_t>(layer)];
    for (std::int64_t h = 0; h < hq; ++h) {
      const std::int64_t hk = h / group;
      std::vector<double> s(static_cast<std::size_t>(visible));
      double mx = -INFINITY;
      for (std::int64_t t = 0; t < visible; ++t) {
        double dot = 0;
        for (std::int64_t c = 0; c < d; ++c)
          dot += q.get(static_cast<std::size_t>((row * hq + h) * d + c)) *
                 ks[static_cast<std::size_t>((t * hkv + hk) * d + c)];
        s[static_cast<std::size_t>(t)] = dot / std::sqrt(static_cast<double>(d));
        mx = std::max(mx, s[static_cast<std::size_t>(t)]);
      }
      double sum = 0;
      for (auto& x : s) sum += (x = std::exp(x - mx));
      for (std::int64_t c = 0; c < d; ++c) {
        double acc = 0;
        for (std::int64_t t = 0; t < visible; ++t)
          acc +=
              s[static_cast<std::size_t>(t)] * vs[static_cast<std::size_t>((t * hkv + hk) * d + c)];
        out.push_back(acc / sum);
      }
    }
  }
};

}  // namespace attn::testing
