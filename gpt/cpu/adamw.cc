// One AdamW update of one float32 parameter as an XLA FFI handler for the CPU backend. XLA runs
// optax's update (clip, both moments, bias corrections, weight decay, the step) as several loops
// over the parameter, its gradient and moments; this reads the four once and writes three.
//
//   gpt_adamw(param, grad, mu, nu, hyper [10]; weight_decay) -> (update, mu', nu')
//
// hyper = [lr, 1 - b1^t, 1 - b2^t, clip divisor, clip factor, b1, 1 - b1, b2, 1 - b2, eps]:
// the caller (gpt/cpu/adamw.py) computes each as optax does, and the loop below takes optax's
// steps in optax's order, so the update is optax's up to the compiler's contraction of a*b + c.
// The outputs are grad's, mu's and nu's buffers (gpt/cpu/adamw.py aliases them); optax's
// apply_updates then adds the update to the parameter.
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using gpt::ParallelFor;

namespace {

constexpr int64_t kBlock = 1 << 15;  // elements per task: 128 KiB of each of the four arrays
enum Hyper { kLr, kCorrection1, kCorrection2, kClipDivisor, kClipFactor, kB1, kOneMinusB1, kB2,
             kOneMinusB2, kEps, kHyperSize };

ROW_KERNEL void Update(const float* __restrict p, float* __restrict g, float* __restrict mu,
                       float* __restrict nu, int64_t n, const float* h, float weight_decay) {
  const float lr = h[kLr], c1 = h[kCorrection1], c2 = h[kCorrection2];
  const float divisor = h[kClipDivisor], factor = h[kClipFactor];
  const float b1 = h[kB1], one_minus_b1 = h[kOneMinusB1], b2 = h[kB2];
  const float one_minus_b2 = h[kOneMinusB2], eps = h[kEps];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float grad = g[i] / divisor * factor;  // clip_by_global_norm: (g / norm) * max_norm
    const float m = one_minus_b1 * grad + b1 * mu[i];
    const float v = one_minus_b2 * (grad * grad) + b2 * nu[i];
    mu[i] = m;
    nu[i] = v;
    const float update = (m / c1) / (std::sqrt(v / c2) + eps) + weight_decay * p[i];
    g[i] = update * -lr;
  }
}

ffi::Error AdamW(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> param, ffi::Buffer<ffi::F32> grad,
                 ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu,
                 ffi::Buffer<ffi::F32> hyper, ffi::ResultBuffer<ffi::F32> update_out,
                 ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out,
                 float weight_decay) {
  const int64_t n = param.element_count();
  if (grad.element_count() != n || mu.element_count() != n || nu.element_count() != n) {
    return ffi::Error::InvalidArgument("gpt_adamw: param, grad, mu and nu differ in size");
  }
  if (hyper.element_count() != kHyperSize) {
    return ffi::Error::InvalidArgument("gpt_adamw: hyper holds 10 numbers");
  }
  const float* h = hyper.typed_data();
  const float* p = param.typed_data();
  float *g = update_out->typed_data(), *m = mu_out->typed_data(), *v = nu_out->typed_data();
  if (g != grad.typed_data() || m != mu.typed_data() || v != nu.typed_data()) {
    return ffi::Error::InvalidArgument("gpt_adamw: outputs must alias grad, mu and nu");
  }
  ParallelFor(pool, n, kBlock, [&](int64_t begin, int64_t end) {
    Update(p + begin, g + begin, m + begin, v + begin, end - begin, h, weight_decay);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptAdamW, AdamW,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("weight_decay"));
