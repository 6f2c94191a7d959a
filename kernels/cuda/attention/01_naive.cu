// attention/01_naive: the textbook three steps, each its own kernel, with the score matrix S
// materialized in device memory: S = scale . Q K^T (K read as stored, no transpose), a row
// softmax of S in place (which also yields the log-sum-exp), then O = P V. S costs
// B x Hq x Sq x Sk x 4 bytes written once and read twice: at long sequences that traffic, not
// the arithmetic, is the time, and it is what the flash rungs remove. float32. Sliding windows
// and soft-capping apply in the scores kernel (softcap * tanh(s / softcap), keys outside
// [first_key, visible_keys) masked).
#include "attention_common.cuh"
#include "attention_rungs.h"
#include "../softmax/softmax_common.cuh"

namespace attn::cuda {
namespace {

constexpr long long kMaxScoreBytes = 8LL << 30;

// One thread per score, a 32x32 tile of S per block; threadIdx.x walks keys.
__global__ void scores_kernel(AttentionProblem p, float* s) {
  const int j = blockIdx.x * 32 + threadIdx.x, i = blockIdx.y * 32 + threadIdx.y;
  const int bh = blockIdx.z, b = bh / p.heads_q, h = bh % p.heads_q;
  if (i >= p.len_q || j >= p.len_kv) return;
  const float* q = static_cast<const float*>(p.q) + p.q_row(b, h, i);
  const float* k = static_cast<const float*>(p.k) + p.kv_row(b, h, j);
  float acc = 0.0f;
  for (int c = 0; c < p.head_dim; ++c) acc += q[c] * k[c];
  float score = acc * p.scale;
  if (p.softcap > 0.0f) score = p.softcap * soft_tanh(score / p.softcap);
  const bool visible = j >= p.first_key(i) && j < p.visible_keys(i);  // causal, window
  s[(static_cast<long long>(bh) * p.len_q + i) * p.len_kv + j] = visible ? score : -INFINITY;
}

// A block per row of S: max, sum, then P = exp(S - max) / sum in place; lse = max + log(sum).
__global__ void softmax_kernel(AttentionProblem p, float* s) {
  __shared__ float scratch[32];
  const long long row = blockIdx.x;
  float* r = s + row * p.len_kv;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < p.len_kv; j += blockDim.x) m = fmaxf(m, r[j]);
  m = block_reduce<true>(m, scratch);
  // The sink of the row's head joins the denominator (a column of S with no V row).
  const float sink = p.sinks ? p.sinks[(row / p.len_q) % p.heads_q] : -INFINITY;
  const float m_all = fmaxf(m, sink);
  float sum = 0.0f;
  if (m != -INFINITY)
    for (int j = threadIdx.x; j < p.len_kv; j += blockDim.x) sum += __expf(r[j] - m_all);
  sum = block_reduce<false>(sum, scratch);
  if (p.sinks) sum += __expf(sink - m_all);
  const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;  // a row that sees no key: P = 0, O = 0
  for (int j = threadIdx.x; j < p.len_kv; j += blockDim.x) r[j] = m == -INFINITY ? 0.0f : __expf(r[j] - m_all) * inv;
  if (p.lse && threadIdx.x == 0) p.lse[row] = m_all == -INFINITY ? -INFINITY : m_all + logf(sum);
}

// One thread per output element; threadIdx.x walks the head dim so V reads coalesce.
__global__ void pv_kernel(AttentionProblem p, const float* s) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x, i = blockIdx.y;
  const int bh = blockIdx.z, b = bh / p.heads_q, h = bh % p.heads_q;
  if (c >= p.head_dim) return;
  const float* row = s + (static_cast<long long>(bh) * p.len_q + i) * p.len_kv;
  const float* v = static_cast<const float*>(p.v) + p.kv_row(b, h, 0);
  float acc = 0.0f;
  for (int j = 0; j < p.len_kv; ++j) acc += row[j] * v[static_cast<long long>(j) * p.head_dim + c];
  static_cast<float*>(p.o)[p.q_row(b, h, i) + c] = acc;
}

long long score_bytes(const AttentionProblem& p) {
  return static_cast<long long>(p.batch) * p.heads_q * p.len_q * p.len_kv * 4;
}

}  // namespace

Status attention_01_supports(const AttentionArgs& args) {
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, kAttention01Caps, "attention/01_naive"));
  if (score_bytes(p) > kMaxScoreBytes) {
    return resource_exhausted("q.shape: attention/01_naive materializes S = B x Hq x Sq x Sk floats: " +
                              std::to_string(score_bytes(p) >> 20) + " MiB here, over its limit of " +
                              std::to_string(kMaxScoreBytes >> 20) + " MiB (use attention/02_flash_fp32)");
  }
  if (p.len_q > 65535 || static_cast<long long>(p.batch) * p.heads_q > 65535) {
    return invalid_argument("q.shape: attention/01_naive takes Sq <= 65535 and B x Hq <= 65535");
  }
  return Status::Ok();
}

Status attention_01_naive(const AttentionArgs& args, Stream& stream) {
  ATTN_RETURN_IF_ERROR(attention_01_supports(args));
  ATTN_ASSIGN_OR_RETURN(p, attention_problem(args, kAttention01Caps, "attention/01_naive"));
  const cudaStream_t s = attention_stream(stream);
  float* scores = nullptr;
  ATTN_RETURN_IF_ERROR(to_status(cudaMallocAsync(&scores, score_bytes(p), s), "attention/01_naive: S"));
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads_q);
  scores_kernel<<<dim3((p.len_kv + 31) / 32, (p.len_q + 31) / 32, bh), dim3(32, 32), 0, s>>>(p, scores);
  softmax_kernel<<<static_cast<unsigned>(bh * static_cast<long long>(p.len_q)), 256, 0, s>>>(p, scores);
  pv_kernel<<<dim3((p.head_dim + 63) / 64, p.len_q, bh), 64, 0, s>>>(p, scores);
  const Status launched = to_status(cudaGetLastError(), "attention/01_naive launch");
  cudaFreeAsync(scores, s);
  return launched;
}

}  // namespace attn::cuda
