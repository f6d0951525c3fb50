// What gpt/*.cc share: the per-ISA build of their loops, a vectorisable exp, and a parallel
// loop on XLA's intra-op thread pool.
#ifndef GPT_CPU_KERNELS_H_
#define GPT_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace gpt {

namespace ffi = xla::ffi;

// One build serves machines with and without AVX-512: the loops are compiled per
// ISA and picked when the library loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ROW_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ROW_KERNEL
#endif

// exp(x) for x <= 0 as the kernels use it (a logit or score minus its row's max): Cody-Waite
// range reduction and Cephes' degree-6 polynomial (tests/test_cross_entropy.py holds the loss
// to optax's distance from float64), with no branch or call so that every ISA's loop vectorises
// (built with -fno-trapping-math, so the clamp is a select).
// x below -87 counts as -87: exp(-87) = 1.6e-38, below any sum it could change.
__attribute__((always_inline)) inline float Exp(float x) {
  x = std::max(x, -87.0f);
  // Rounds to nearest by adding and subtracting 1.5 * 2^23: SSE2 has no vector round.
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// Calls body(begin, end) on blocks of [0, n) from the calling thread and XLA's intra-op pool,
// with as many threads in all as the pool has: the caller may be a thread outside the pool,
// and one thread more than the pool's would share a core.
// The caller waits for blocks, not for tasks: a task that starts after the work is claimed
// finds none and returns, so a busy pool delays nothing and cannot deadlock.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t block, const Body& body) {
  const int64_t blocks = (n + block - 1) / block;
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable all_done;
  };
  auto work = std::make_shared<Work>();
  auto run = [work, blocks, block, n, &body] {  // body is only touched while the caller waits
    for (int64_t b; (b = work->next.fetch_add(1)) < blocks;) {
      body(b * block, std::min(n, (b + 1) * block));
      if (work->done.fetch_add(1) + 1 == blocks) {
        std::lock_guard<std::mutex> lock(work->mu);
        work->all_done.notify_all();
      }
    }
  };
  for (int64_t t = std::min<int64_t>(pool.num_threads() - 1, blocks - 1); t > 0; --t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->done.load() == blocks; });
}

}  // namespace gpt

#endif  // GPT_CPU_KERNELS_H_
