// Float32 matrix products as an XLA FFI handler for the CPU backend, computed by a BLAS's
// sgemm (Intel MKL's, single-threaded) on blocks of the product spread over XLA's thread pool.
//
//   gpt_matmul(a, b; transpose_a, transpose_b) -> c [..., M, N] = op(a) op(b)
//
// op(a) is a [..., M, K] or, transposed, a [..., K, M] read as its transpose; op(b) likewise
// [..., K, N] or [..., N, K]. Leading (batch) dimensions are equal. The sgemm comes from
// gpt/cpu/matmul.py, which loads the BLAS and calls GptSetSgemm before the first product.
#include <atomic>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using gpt::ParallelFor;

namespace {

// cblas_sgemm with 64-bit integers (MKL's cblas_sgemm_64).
using Sgemm = void (*)(int layout, int transa, int transb, int64_t m, int64_t n, int64_t k,
                       float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                       float beta, float* c, int64_t ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

std::atomic<Sgemm> sgemm{nullptr};

// Rows (or columns) of C per task at least, so that each call amortises packing its shared
// operand. One block per thread: each block packs the shared operand again, and with two per
// thread the products of tools/matmul_ab.py's tiny shape took 5% longer.
constexpr int64_t kMinBlock = 128;

ffi::Error MatMul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const Sgemm gemm = sgemm.load();
  if (gemm == nullptr) return ffi::Error::InvalidArgument("gpt_matmul: no sgemm loaded");
  const auto a_dims = a.dimensions(), b_dims = b.dimensions();
  const size_t rank = a_dims.size();
  if (rank < 2 || b_dims.size() != rank) {
    return ffi::Error::InvalidArgument("gpt_matmul: operands of equal rank >= 2");
  }
  int64_t batch = 1;
  for (size_t i = 0; i + 2 < rank; ++i) {
    if (a_dims[i] != b_dims[i]) return ffi::Error::InvalidArgument("gpt_matmul: batch dims");
    batch *= a_dims[i];
  }
  const int64_t m = transpose_a ? a_dims[rank - 1] : a_dims[rank - 2];
  const int64_t k = transpose_a ? a_dims[rank - 2] : a_dims[rank - 1];
  const int64_t n = transpose_b ? b_dims[rank - 2] : b_dims[rank - 1];
  if ((transpose_b ? b_dims[rank - 1] : b_dims[rank - 2]) != k) {
    return ffi::Error::InvalidArgument("gpt_matmul: contracted dims differ");
  }
  float* out = c->typed_data();
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (k == 0) {
    std::memset(out, 0, sizeof(float) * batch * m * n);
    return ffi::Error::Success();
  }
  // Blocks of rows of C when it has more rows than columns (they share op(b)), else of columns.
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  const int64_t blocks = std::max<int64_t>(1, std::min(pool.num_threads(), extent / kMinBlock));
  const int64_t block = (extent + blocks - 1) / blocks;
  const int64_t per_batch = (extent + block - 1) / block;
  const float* a_data = a.typed_data();
  const float* b_data = b.typed_data();
  const int64_t lda = transpose_a ? m : k, ldb = transpose_b ? k : n;
  ParallelFor(pool, batch * per_batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / per_batch, lo = (task % per_batch) * block;
      const int64_t size = std::min(block, extent - lo);
      const float* a_i = a_data + i * m * k;
      const float* b_i = b_data + i * k * n;
      float* c_i = out + i * m * n;
      if (by_rows) {  // rows lo.. of op(a)
        gemm(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans, size, n,
             k, 1.0f, a_i + (transpose_a ? lo : lo * k), lda, b_i, ldb, 0.0f, c_i + lo * n, n);
      } else {  // columns lo.. of op(b)
        gemm(kRowMajor, transpose_a ? kTrans : kNoTrans, transpose_b ? kTrans : kNoTrans, m, size,
             k, 1.0f, a_i, lda, b_i + (transpose_b ? lo * k : lo), ldb, 0.0f, c_i + lo, n);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void GptSetSgemm(void* fn) { sgemm.store(reinterpret_cast<Sgemm>(fn)); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptMatMul, MatMul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));
