// Softmax cross-entropy over the last axis of float32 logits, as XLA FFI handlers for the CPU
// backend. XLA computes the loss and its gradient in about six passes over the [tokens, vocab]
// logits (max, exp, sum; then exp times the incoming gradient, the one-hot subtraction and a
// copy); these read each row once from memory, its max, sum and softmax then served from cache.
//
//   gpt_cross_entropy(logits [..., V] f32, labels [...] s32) -> nll [...]
//   gpt_cross_entropy_fwd(logits, labels) -> (nll, softmax [..., V])  softmax in logits' buffer
//   gpt_cross_entropy_bwd(softmax, labels, g [...]) -> g * (softmax - onehot(labels)), in place
//   gpt_cross_entropy_bwd_t(softmax [N, V], labels [N], g [N]) -> (that [N, V], its transpose)
//
// The transpose is for a tied head's table gradient, gradient^T @ hidden: as a plain matmul
// it reads the transpose, which XLA would otherwise copy out of the whole gradient (a read and
// a write-allocate of every line). Here each 16 x 256 tile is transposed while it is in L1,
// and written with streaming stores where AVX-512 allows.
//
// Training calls _fwd, then _bwd or (tied head) _bwd_t: the softmax overwrites the logits,
// which nothing else reads, and the gradient overwrites the softmax, so the step allocates no
// [tokens, vocab] buffer beyond the logits and the transpose. As in XLA's log-softmax, the
// loss is log(sum exp(x - max)) - (x_label - max), never through a rounded logsumexp.
//
// A label outside [0, V) gives a NaN loss and no one-hot term, never an out-of-bounds read.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using gpt::Exp;
using gpt::ParallelFor;

namespace {

constexpr int64_t kRows = 16;  // a block of rows: one 64-byte line of a transposed column

ROW_KERNEL float RowMax(const float* x, int64_t v) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < v; ++j) m = x[j] > m ? x[j] : m;  // std::max does not vectorise
  return m;
}

// Summed in double: a float running sum of 50,257 terms drifts by several ulps.
ROW_KERNEL float RowSumExp(const float* x, int64_t v, float m) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < v; ++j) s += Exp(x[j] - m);
  return static_cast<float>(s);
}

// out may be x: each element is read before it is written.
ROW_KERNEL void RowScaledExp(const float* x, int64_t v, float m, float scale, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] = scale * Exp(x[j] - m);
}

ROW_KERNEL void RowScale(const float* x, int64_t v, float scale, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < v; ++j) out[j] = scale * x[j];
}

// The loss of each row, and with `softmax` (which may be `logits` itself) its softmax.
ffi::Error Loss(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& logits, ffi::Buffer<ffi::S32>& labels,
                float* nll, float* softmax) {
  if (logits.dimensions().size() == 0) return ffi::Error::InvalidArgument("logits need a class axis");
  const int64_t v = logits.dimensions().back();
  const int64_t n = labels.element_count();
  if (n * v != static_cast<int64_t>(logits.element_count())) {
    return ffi::Error::InvalidArgument("labels must have the logits' shape without the last axis");
  }
  const float* x = logits.typed_data();
  const int32_t* y = labels.typed_data();
  ParallelFor(pool, n, kRows, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = x + i * v;
      const float m = RowMax(row, v);
      const float s = RowSumExp(row, v, m);
      nll[i] = 0 <= y[i] && y[i] < v ? std::log(s) - (row[y[i]] - m)
                                     : std::numeric_limits<float>::quiet_NaN();
      if (softmax != nullptr) RowScaledExp(row, v, m, 1.0f / s, softmax + i * v);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                   ffi::Buffer<ffi::S32> labels, ffi::ResultBuffer<ffi::F32> nll) {
  return Loss(pool, logits, labels, nll->typed_data(), nullptr);
}

ffi::Error ForwardWithSoftmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                              ffi::Buffer<ffi::S32> labels, ffi::ResultBuffer<ffi::F32> nll,
                              ffi::ResultBuffer<ffi::F32> softmax) {
  return Loss(pool, logits, labels, nll->typed_data(), softmax->typed_data());
}

// out[j * n + i0 + i] = tile[i * v + j] for i < rows, j0 <= j < j1.
void TransposeTile(const float* tile, int64_t v, int64_t rows, int64_t j0, int64_t j1, float* out,
                   int64_t n, int64_t i0) {
  for (int64_t j = j0; j < j1; ++j) {
    for (int64_t i = 0; i < rows; ++i) out[j * n + i0 + i] = tile[i * v + j];
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// 16 rows: each column is one gather from L1 and one streaming store of a whole line.
__attribute__((target("avx512f"))) void TransposeTile16(const float* tile, int64_t v, int64_t j0,
                                                        int64_t j1, float* out, int64_t n,
                                                        int64_t i0) {
  const __m512i rows = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
      _mm512_set1_epi32(static_cast<int32_t>(v)));
  for (int64_t j = j0; j < j1; ++j) {
    _mm512_stream_ps(out + j * n + i0, _mm512_i32gather_ps(rows, tile + j, 4));
  }
  _mm_sfence();
}

bool CanStream(int64_t rows, int64_t v, const float* out, int64_t n) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && rows == 16 && v * 16 < (int64_t{1} << 31) && n % 16 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 64 == 0;
}
#endif

// g * (softmax - onehot) into dlogits (which may be softmax), and its transpose into
// dlogits_t [V, N] when that is not null.
ffi::Error Gradient(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& softmax,
                    ffi::Buffer<ffi::S32>& labels, ffi::Buffer<ffi::F32>& g, float* dlogits,
                    float* dlogits_t) {
  constexpr int64_t kColumns = 256;  // 16 rows of 256 columns: 16 KiB, in L1 until transposed
  const int64_t v = softmax.dimensions().back();
  const int64_t n = labels.element_count();
  const float* p = softmax.typed_data();
  const int32_t* y = labels.typed_data();
  const float* gi = g.typed_data();
  ParallelFor(pool, n, kRows, [&](int64_t begin, int64_t end) {
    for (int64_t j0 = 0; j0 < v; j0 += kColumns) {
      const int64_t j1 = std::min(v, j0 + kColumns);
      for (int64_t i = begin; i < end; ++i) {
        RowScale(p + i * v + j0, j1 - j0, gi[i], dlogits + i * v + j0);
        if (j0 <= y[i] && y[i] < j1) dlogits[i * v + y[i]] -= gi[i];
      }
      if (dlogits_t == nullptr) continue;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
      if (CanStream(end - begin, v, dlogits_t, n)) {
        TransposeTile16(dlogits + begin * v, v, j0, j1, dlogits_t, n, begin);
        continue;
      }
#endif
      TransposeTile(dlogits + begin * v, v, end - begin, j0, j1, dlogits_t, n, begin);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> softmax,
                    ffi::Buffer<ffi::S32> labels, ffi::Buffer<ffi::F32> g,
                    ffi::ResultBuffer<ffi::F32> dlogits) {
  return Gradient(pool, softmax, labels, g, dlogits->typed_data(), nullptr);
}

ffi::Error BackwardTransposed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> softmax,
                              ffi::Buffer<ffi::S32> labels, ffi::Buffer<ffi::F32> g,
                              ffi::ResultBuffer<ffi::F32> dlogits,
                              ffi::ResultBuffer<ffi::F32> dlogits_t) {
  return Gradient(pool, softmax, labels, g, dlogits->typed_data(), dlogits_t->typed_data());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptCrossEntropy, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptCrossEntropyFwd, ForwardWithSoftmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptCrossEntropyBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptCrossEntropyBwdT, BackwardTransposed,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
