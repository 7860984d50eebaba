// ParallelFor over XLA's intra-op thread pool, shared by the CPU kernels (`cpu_kernel.py`).

#ifndef REFORMER_JAX_ATTENTION_PARALLEL_FOR_H_
#define REFORMER_JAX_ATTENTION_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace reformer_jax {

// Runs fn(begin, end) over [0, n) in blocks on XLA's intra-op pool and the calling thread.
// Workers that start after the work is gone return without touching `fn`, so the caller never
// waits on a task the pool has not started (a pool of one thread cannot deadlock).
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t block, const F& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> active{0};
    const F* fn;
    int64_t n, block;
  };
  auto state = std::make_shared<State>();
  state->fn = &fn;
  state->n = n;
  state->block = block;
  auto work = [](State& s) {
    s.active.fetch_add(1);
    for (;;) {
      const int64_t begin = s.next.fetch_add(s.block);
      if (begin >= s.n) break;
      (*s.fn)(begin, std::min(begin + s.block, s.n));
    }
    s.active.fetch_sub(1);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), (n + block - 1) / block) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state, work] { work(*state); });
  work(*state);
  while (state->active.load() != 0) std::this_thread::yield();
}

}  // namespace reformer_jax

#endif  // REFORMER_JAX_ATTENTION_PARALLEL_FOR_H_
