// Float32 matrix products through OpenBLAS (the scipy-openblas32 package), as an XLA FFI call
// (built and registered by `cpu_kernel.py`; `layers.matmul` uses it on CPU).
//
// XLA:CPU runs its products through Eigen's tensor contraction: 170-180 GFLOP/s on the 2-core
// Zen 3 for the Reformer's forward products, and 110-150 for the weight gradients, whose left
// operand it reads transposed; OpenBLAS's sgemm ran both at 180-187 there, with its transpose
// flags at no extra cost. The product is split in two (or as many parts as XLA's intra-op pool
// has threads) along its longer output axis, and each part runs single-threaded OpenBLAS on one
// pool thread: no second thread pool competes with XLA's for the cores.
//
// out [M, N] = op(a) op(b), row-major: a [M, K] (or, trans_a, [K, M]), b [K, N] (or, trans_b,
// [N, K]).

#include <algorithm>
#include <cstdint>

#include "cblas.h"
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a_b, ffi::Buffer<ffi::F32> b_b,
                  ffi::ResultBuffer<ffi::F32> out_b, bool trans_a, bool trans_b) {
  const auto ad = a_b.dimensions(), bd = b_b.dimensions();
  if (ad.size() != 2 || bd.size() != 2)
    return ffi::Error::InvalidArgument("reformer_matmul takes two 2-D arrays");
  const int64_t m = trans_a ? ad[1] : ad[0], k = trans_a ? ad[0] : ad[1];
  const int64_t n = trans_b ? bd[0] : bd[1];
  if ((trans_b ? bd[1] : bd[0]) != k)
    return ffi::Error::InvalidArgument("reformer_matmul: contracted sizes differ");
  const float* a = a_b.typed_data();
  const float* b = b_b.typed_data();
  float* c = out_b->typed_data();
  const int64_t lda = trans_a ? m : k, ldb = trans_b ? k : n;
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = trans_b ? CblasTrans : CblasNoTrans;
  const int64_t parts = std::max<int64_t>(1, pool.num_threads());
  const bool rows = m >= n;  // split the longer output axis
  reformer_jax::ParallelFor(pool, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const int64_t size = rows ? m : n;
      const int64_t i0 = size * p / parts, i1 = size * (p + 1) / parts;
      if (i1 == i0) continue;
      if (rows)  // output rows [i0, i1): rows (or, transposed, columns) of a
        scipy_cblas_sgemm(CblasRowMajor, ta, tb, i1 - i0, n, k, 1.0f,
                          trans_a ? a + i0 : a + i0 * lda, lda, b, ldb, 0.0f, c + i0 * n, n);
      else  // output columns [i0, i1): columns (or, transposed, rows) of b
        scipy_cblas_sgemm(CblasRowMajor, ta, tb, m, i1 - i0, k, 1.0f, a, lda,
                          trans_b ? b + i0 * ldb : b + i0, ldb, 0.0f, c + i0, n);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// Called once after loading: each part's OpenBLAS call runs on its own calling thread.
extern "C" void ReformerBlasSingleThreaded() { scipy_openblas_set_num_threads(1); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ReformerMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
