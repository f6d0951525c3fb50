// Causal self-attention over float32 as XLA FFI handlers for the CPU backend, flash-attention
// style: scores in 64 x 64 tiles that stay in cache, an online softmax, and no tile above the
// diagonal computed. XLA's attention slices q, k and v out of the projection, transposes them
// per head, writes the [T, T] scores and probabilities of every head to memory and reads them
// back forward and backward; these read q, k and v where c_attn wrote them and write the
// output where c_proj reads it.
//
//   gpt_attention_fwd(qkv [..., T, 3 * H * K]; heads = H) -> (out [..., T, H * K], lse [..., H, T])
//   gpt_attention_bwd(qkv, out, lse, dout [..., T, H * K]; heads) -> dqkv [..., T, 3 * H * K]
//
// qkv is c_attn's output: for each token q, k, v, each H heads of K. lse is each query's
// log-sum-exp of its scaled scores, kept for the backward, which recomputes the probabilities
// from it (FlashAttention-2's backward). Both run one task per batch row and head: forward, its
// keys are transposed once; backward, its query gradient, summed over key tiles, has one writer.
// K is 16, 32, 64 or 128; the Python side falls back to XLA's attention for other widths.
//
//   gpt_attention_decode(qkv [B, 1, 3 * H * K], k_cache, v_cache [B, L, H, K], positions [B, 1];
//                        heads) -> (out [B, 1, H * K], k_cache, v_cache)
//
// One new token per row while sampling: its key and value are written into the caches (which
// the outputs alias) at its position, and its query attends to the slots at or before it. In
// XLA, the caches' update and the two products made it copy every layer's caches at every new
// token. Any K; positions must lie in [0, L).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using gpt::Exp;
using gpt::ParallelFor;

namespace {

constexpr int64_t kTile = 64;  // queries and keys per tile

typedef float V16 __attribute__((vector_size(64)));

__attribute__((always_inline)) inline V16 Load(const float* p) {
  V16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void Store(float* p, V16 v) { std::memcpy(p, &v, sizeof(v)); }

// c[i][0:N] (+)= sum over d < depth of a[i * a_row + d * a_col] * b[d * b_row + 0:N] for R rows
// (+= when kAdd): the R x N accumulators stay in vector registers while b's rows stream past.
template <int N, int R, bool kAdd>
__attribute__((always_inline)) inline void TileRows(int64_t depth, const float* a, int64_t a_row,
                                                    int64_t a_col, const float* b, int64_t b_row,
                                                    float* c, int64_t c_row) {
  constexpr int W = N / 16;
  V16 acc[R][W];
  for (int i = 0; i < R; ++i) {
    for (int w = 0; w < W; ++w) acc[i][w] = kAdd ? Load(c + i * c_row + 16 * w) : V16{};
  }
  for (int64_t d = 0; d < depth; ++d) {
    V16 bd[W];
    for (int w = 0; w < W; ++w) bd[w] = Load(b + d * b_row + 16 * w);
    for (int i = 0; i < R; ++i) {
      const float s = a[i * a_row + d * a_col];
      for (int w = 0; w < W; ++w) acc[i][w] += s * bd[w];
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int w = 0; w < W; ++w) Store(c + i * c_row + 16 * w, acc[i][w]);
  }
}

// The same for `rows` rows of c: c (+)= a @ b, a [rows, depth] read through its strides.
template <int N, bool kAdd = true>
__attribute__((always_inline)) inline void MatMulAdd(int64_t rows, int64_t depth, const float* a,
                                                     int64_t a_row, int64_t a_col, const float* b,
                                                     int64_t b_row, float* c, int64_t c_row) {
  constexpr int R = N >= 128 ? 2 : 4;  // R * N / 16 accumulators of 32 AVX-512 registers
  int64_t i = 0;
  for (; i + R <= rows; i += R) {
    TileRows<N, R, kAdd>(depth, a + i * a_row, a_row, a_col, b, b_row, c + i * c_row, c_row);
  }
  for (; i < rows; ++i) TileRows<N, 1, kAdd>(depth, a + i * a_row, a_row, a_col, b, b_row, c + i * c_row, c_row);
}

// out[d * width + j] = x[j * stride + d] for j < n, zero for n <= j < width: keys or values
// with the head's dimensions as rows, so that scores come out a row at a time.
template <int K>
__attribute__((always_inline)) inline void Transpose(const float* x, int64_t stride, int64_t n,
                                                     int64_t width, float* out) {
  for (int64_t j = 0; j < width; ++j) {
    for (int d = 0; d < K; ++d) out[d * width + j] = j < n ? x[j * stride + d] : 0.0f;
  }
}

// A thread's scratch floats, kept between calls: a fresh 128 KiB vector per head per call came
// from mmap, its pages faulted in and zeroed every time.
float* Scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

struct Shape {
  int64_t batch, t, heads;
  int64_t tiles() const { return (t + kTile - 1) / kTile; }
};

// Which keys of tile `kt` query `q0 + i` of tile `qt` sees: all n, or on the diagonal i + 1.
__attribute__((always_inline)) inline int64_t Visible(int64_t qt, int64_t kt, int64_t i, int64_t n) {
  return qt == kt ? i + 1 : n;
}

// One head's output and lse: its keys transposed once, then each tile of queries against the
// tiles of keys at or before it.
template <int K>
ROW_KERNEL void ForwardHead(const Shape& shape, const float* qkv, int64_t b, int64_t h, float* out,
                            float* lse) {
  const int64_t d_model = shape.heads * K, row = 3 * d_model, t = shape.t, width = shape.tiles() * kTile;
  const float* x = qkv + b * t * row + h * K;  // this head's q; its k at + d_model, v at + 2 d_model
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  float* keys_t = Scratch(K * width);
  Transpose<K>(x + d_model, row, t, width, keys_t);
  alignas(64) float q[kTile * K], p[kTile * kTile], o[kTile * K];
  float row_max[kTile], row_sum[kTile];
  for (int64_t qt = 0; qt < shape.tiles(); ++qt) {
    const int64_t q0 = qt * kTile, m = std::min(kTile, t - q0);
    for (int64_t i = 0; i < m; ++i) {
      for (int d = 0; d < K; ++d) q[i * K + d] = scale * x[(q0 + i) * row + d];
      row_max[i] = -std::numeric_limits<float>::infinity();
      row_sum[i] = 0.0f;
    }
    std::fill(o, o + m * K, 0.0f);
    for (int64_t kt = 0; kt <= qt; ++kt) {
      const int64_t k0 = kt * kTile, n = std::min(kTile, t - k0);
      MatMulAdd<kTile, false>(m, K, q, K, 1, keys_t + k0, width, p, kTile);
      for (int64_t i = 0; i < m; ++i) {
        float* s = p + i * kTile;
        const int64_t visible = Visible(qt, kt, i, n);
        float new_max = row_max[i];
#pragma omp simd reduction(max : new_max)
        for (int64_t j = 0; j < kTile; ++j) new_max = j < visible && s[j] > new_max ? s[j] : new_max;
        const float rescale = Exp(row_max[i] - new_max);
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < kTile; ++j) {
          s[j] = j < visible ? Exp(s[j] - new_max) : 0.0f;
          sum += s[j];
        }
        row_sum[i] = row_sum[i] * rescale + sum;
        row_max[i] = new_max;
#pragma omp simd
        for (int d = 0; d < K; ++d) o[i * K + d] *= rescale;
      }
      MatMulAdd<K>(m, n, p, kTile, 1, x + k0 * row + 2 * d_model, row, o, K);
    }
    for (int64_t i = 0; i < m; ++i) {
      const float inverse = 1.0f / row_sum[i];
      float* y = out + (b * t + q0 + i) * d_model + h * K;
      for (int d = 0; d < K; ++d) y[d] = o[i * K + d] * inverse;
      lse[(b * shape.heads + h) * t + q0 + i] = row_max[i] + std::log(row_sum[i]);
    }
  }
}

// All of one head's gradients: dq, dk and dv of batch row b, head h.
template <int K>
ROW_KERNEL void BackwardHead(const Shape& shape, const float* qkv, const float* out,
                             const float* lse, const float* dout, int64_t b, int64_t h,
                             float* dqkv) {
  const int64_t d_model = shape.heads * K, row = 3 * d_model, t = shape.t;
  const float* x = qkv + b * t * row + h * K;
  const float* y = out + b * t * d_model + h * K;
  const float* dy = dout + b * t * d_model + h * K;
  const float* head_lse = lse + (b * shape.heads + h) * t;
  float* dx = dqkv + b * t * row + h * K;
  const float scale = 1.0f / std::sqrt(static_cast<float>(K));
  float* q = Scratch(t * (2 * K + 1));  // scaled queries, their gradient, rowsum(dout * out)
  float* dq = q + t * K;
  float* delta = dq + t * K;
  std::fill(dq, dq + t * K, 0.0f);
  for (int64_t i = 0; i < t; ++i) {
    float s = 0.0f;
    for (int d = 0; d < K; ++d) {
      q[i * K + d] = scale * x[i * row + d];
      s += dy[i * d_model + d] * y[i * d_model + d];
    }
    delta[i] = s;
  }
  alignas(64) float keys_t[K * kTile], values_t[K * kTile], p[kTile * kTile], dp[kTile * kTile],
      dk[kTile * K], dv[kTile * K];
  for (int64_t kt = 0; kt < shape.tiles(); ++kt) {
    const int64_t k0 = kt * kTile, n = std::min(kTile, t - k0);
    const float* keys = x + k0 * row + d_model;
    Transpose<K>(keys, row, n, kTile, keys_t);
    Transpose<K>(x + k0 * row + 2 * d_model, row, n, kTile, values_t);
    std::fill(dk, dk + n * K, 0.0f);
    std::fill(dv, dv + n * K, 0.0f);
    for (int64_t qt = kt; qt < shape.tiles(); ++qt) {
      const int64_t q0 = qt * kTile, m = std::min(kTile, t - q0);
      MatMulAdd<kTile, false>(m, K, q + q0 * K, K, 1, keys_t, kTile, p, kTile);
      for (int64_t i = 0; i < m; ++i) {
        const int64_t visible = Visible(qt, kt, i, n);
        const float l = head_lse[q0 + i];
        float* s = p + i * kTile;
#pragma omp simd
        for (int64_t j = 0; j < kTile; ++j) s[j] = j < visible ? Exp(s[j] - l) : 0.0f;
      }
      MatMulAdd<K>(n, m, p, 1, kTile, dy + q0 * d_model, d_model, dv, K);  // dv += p^T dout
      MatMulAdd<kTile, false>(m, K, dy + q0 * d_model, d_model, 1, values_t, kTile, dp, kTile);
      for (int64_t i = 0; i < m; ++i) {  // dp becomes the scores' gradient, p * (dp - delta)
        const float di = delta[q0 + i];
#pragma omp simd
        for (int64_t j = 0; j < kTile; ++j) dp[i * kTile + j] = p[i * kTile + j] * (dp[i * kTile + j] - di);
      }
      MatMulAdd<K>(m, n, dp, kTile, 1, keys, row, dq + q0 * K, K);  // dq += ds k
      MatMulAdd<K>(n, m, dp, 1, kTile, q + q0 * K, K, dk, K);       // dk += ds^T q
    }
    for (int64_t j = 0; j < n; ++j) {
      for (int d = 0; d < K; ++d) {
        dx[(k0 + j) * row + d_model + d] = dk[j * K + d];
        dx[(k0 + j) * row + 2 * d_model + d] = dv[j * K + d];
      }
    }
  }
  for (int64_t i = 0; i < t; ++i) {
    for (int d = 0; d < K; ++d) dx[i * row + d] = scale * dq[i * K + d];
  }
}

// (the shape, an error): T is the second-to-last axis of qkv, 3 * heads * K its last.
std::pair<Shape, ffi::Error> ShapeOf(const ffi::Buffer<ffi::F32>& qkv, int64_t heads, int64_t* k) {
  const auto dims = qkv.dimensions();
  if (dims.size() < 2 || heads <= 0 || dims.back() % (3 * heads) != 0) {
    return {{}, ffi::Error::InvalidArgument("qkv must be [..., T, 3 * heads * head_dim]")};
  }
  *k = dims.back() / (3 * heads);
  if (*k != 16 && *k != 32 && *k != 64 && *k != 128) {
    return {{}, ffi::Error::InvalidArgument("head_dim must be 16, 32, 64 or 128")};
  }
  const int64_t t = dims[dims.size() - 2], count = static_cast<int64_t>(qkv.element_count());
  return {{count == 0 ? 0 : count / (t * dims.back()), t, heads}, ffi::Error::Success()};
}

template <int K>
void RunForward(ffi::ThreadPool& pool, const Shape& shape, const float* qkv, float* out, float* lse) {
  ParallelFor(pool, shape.batch * shape.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      ForwardHead<K>(shape, qkv, task / shape.heads, task % shape.heads, out, lse);
    }
  });
}

template <int K>
void RunBackward(ffi::ThreadPool& pool, const Shape& shape, const float* qkv, const float* out,
                 const float* lse, const float* dout, float* dqkv) {
  ParallelFor(pool, shape.batch * shape.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      BackwardHead<K>(shape, qkv, out, lse, dout, task / shape.heads, task % shape.heads, dqkv);
    }
  });
}

// Calls fn<K>() for the head width K.
template <typename Fn>
void ForHeadDim(int64_t k, const Fn& fn) {
  switch (k) {
    case 16: fn(std::integral_constant<int, 16>()); break;
    case 32: fn(std::integral_constant<int, 32>()); break;
    case 64: fn(std::integral_constant<int, 64>()); break;
    default: fn(std::integral_constant<int, 128>()); break;
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, int64_t heads) {
  int64_t k;
  auto [shape, error] = ShapeOf(qkv, heads, &k);
  if (error.failure()) return error;
  ForHeadDim(k, [&](auto width) {
    RunForward<decltype(width)::value>(pool, shape, qkv.typed_data(), out->typed_data(),
                                       lse->typed_data());
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dqkv, int64_t heads) {
  int64_t k;
  auto [shape, error] = ShapeOf(qkv, heads, &k);
  if (error.failure()) return error;
  ForHeadDim(k, [&](auto width) {
    RunBackward<decltype(width)::value>(pool, shape, qkv.typed_data(), out.typed_data(),
                                        lse.typed_data(), dout.typed_data(), dqkv->typed_data());
  });
  return ffi::Error::Success();
}

// One row's and head's new token: its key and value into slot `position`, then its output.
ROW_KERNEL void DecodeHead(const float* qkv, float* k_cache, float* v_cache, int64_t position,
                           int64_t d_model, int64_t head_dim, float* scores, float* out) {
  const int64_t stride = d_model;  // between the slots of one head in the caches
  const float* q = qkv;
  std::copy(qkv + d_model, qkv + d_model + head_dim, k_cache + position * stride);
  std::copy(qkv + 2 * d_model, qkv + 2 * d_model + head_dim, v_cache + position * stride);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s <= position; ++s) {
    const float* k = k_cache + s * stride;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < head_dim; ++d) dot += q[d] * k[d];
    scores[s] = dot * scale;
    max = std::max(max, scores[s]);
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s <= position; ++s) {
    scores[s] = Exp(scores[s] - max);
    sum += scores[s];
  }
  std::fill(out, out + head_dim, 0.0f);
  for (int64_t s = 0; s <= position; ++s) {
    const float p = scores[s] / sum;
    const float* v = v_cache + s * stride;
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) out[d] += p * v[d];
  }
}

ffi::Error Decode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> k_cache,
                  ffi::Buffer<ffi::F32> v_cache, ffi::Buffer<ffi::S32> positions,
                  ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> k_out,
                  ffi::ResultBuffer<ffi::F32> v_out, int64_t heads) {
  const auto dims = k_cache.dimensions();
  if (dims.size() != 4 || dims[2] != heads || v_cache.element_count() != k_cache.element_count()) {
    return ffi::Error::InvalidArgument("gpt_attention_decode: caches must be [B, L, heads, K]");
  }
  const int64_t batch = dims[0], length = dims[1], head_dim = dims[3], d_model = heads * head_dim;
  if (qkv.element_count() != batch * 3 * d_model || positions.element_count() != batch) {
    return ffi::Error::InvalidArgument("gpt_attention_decode: one token per row");
  }
  if (k_out->typed_data() != k_cache.typed_data() || v_out->typed_data() != v_cache.typed_data()) {
    return ffi::Error::InvalidArgument("gpt_attention_decode: the outputs must alias the caches");
  }
  const int32_t* position = positions.typed_data();
  for (int64_t b = 0; b < batch; ++b) {
    if (position[b] < 0 || position[b] >= length) {
      return ffi::Error::InvalidArgument("gpt_attention_decode: a position outside the cache");
    }
  }
  ParallelFor(pool, batch * heads, 1, [&](int64_t begin, int64_t end) {
    float* scores = Scratch(length);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const int64_t head = b * length * d_model + h * head_dim;  // slot 0 of this row's head
      DecodeHead(qkv.typed_data() + b * 3 * d_model + h * head_dim, k_out->typed_data() + head,
                 v_out->typed_data() + head, position[b], d_model, head_dim, scores,
                 out->typed_data() + b * d_model + h * head_dim);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptAttentionDecode, Decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads"));
