// LSH attention's sort on the CPU: each hash round's positions ordered by bucket, ties in position
// order, by a counting sort (built and registered by `cpu_kernel.py`, used by `lsh._sort_slots`).
//
// Buckets are small integers (fewer than `n_keys`, the bucket count plus one for padding), so
// one pass counts them, a prefix sum places each bucket, and a second pass in position order
// writes every position into its bucket's next slot: linear in the length and stable, where
// XLA:CPU's comparison sort of the same keys is O(L log L) (and the slowest single op of LSH
// attention at long lengths after the chunk step itself).
//
// Input: buckets [B, N, R, L] int32 in [0, n_keys). Outputs, each [B, N, R * L] int32, sorted
// slots round-major (round r fills [r * L, (r + 1) * L)):
//   sort_idx: the unsorted slot (r * L + position) each sorted slot takes,
//   undo_idx: its inverse (the sorted slot of each unsorted one),
//   pos:      the position each sorted slot takes (sort_idx mod L).

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using reformer_jax::ParallelFor;

ffi::Error BucketSort(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> buckets_b,
                      ffi::Result<ffi::Buffer<ffi::S32>> sort_idx_b,
                      ffi::Result<ffi::Buffer<ffi::S32>> undo_idx_b,
                      ffi::Result<ffi::Buffer<ffi::S32>> pos_b, int64_t n_keys) {
  const auto dims = buckets_b.dimensions();
  if (dims.size() != 4) return ffi::Error::InvalidArgument("buckets must be [B, N, R, L]");
  const int64_t rounds = dims[2], len = dims[3], rows = dims[0] * dims[1] * rounds;
  if (n_keys < 1) return ffi::Error::InvalidArgument("n_keys must be positive");
  const int32_t* buckets = buckets_b.typed_data();
  int32_t* sort_idx = sort_idx_b->typed_data();
  int32_t* undo_idx = undo_idx_b->typed_data();
  int32_t* pos = pos_b->typed_data();
  std::atomic<bool> out_of_range{false};

  // Row t is round t % R of head t / R; its slots are [t * L, (t + 1) * L) in every array.
  ParallelFor(pool, rows, 1, [&](int64_t first, int64_t last) {
    std::vector<int32_t> start(n_keys + 1);
    for (int64_t t = first; t < last; ++t) {
      const int32_t* b = buckets + t * len;
      const int32_t offset = static_cast<int32_t>(t % rounds * len);
      std::fill(start.begin(), start.end(), 0);
      for (int64_t l = 0; l < len; ++l) {
        if (b[l] < 0 || b[l] >= n_keys) {
          out_of_range = true;
          return;
        }
        ++start[b[l] + 1];
      }
      for (int64_t k = 0; k < n_keys; ++k) start[k + 1] += start[k];
      for (int64_t l = 0; l < len; ++l) {
        const int32_t slot = start[b[l]]++;
        sort_idx[t * len + slot] = offset + static_cast<int32_t>(l);
        pos[t * len + slot] = static_cast<int32_t>(l);
        undo_idx[t * len + l] = offset + slot;
      }
    }
  });
  if (out_of_range) return ffi::Error::InvalidArgument("a bucket outside [0, n_keys)");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ReformerBucketSort, BucketSort,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("n_keys"));
