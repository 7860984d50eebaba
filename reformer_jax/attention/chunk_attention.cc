// LSH attention's chunk step on the CPU: what `lsh.attend_chunks` computes, forward and
// backward, as two XLA FFI calls (built and registered by `cpu_kernel.py`).
//
// XLA:CPU runs each batched `[C, H] x [H, K]` chunk product of the XLA version as one Eigen call
// per chunk on one thread (about 40% of a core's peak at C = H = 64), and materializes the
// look-around windows, masks and probabilities between them. Here a chunk's whole step (its
// products, masks and softmax) runs on one thread out of L1/L2, windows are read in place from
// the neighbouring chunks, and chunks are spread over XLA's intra-op thread pool.
//
// The sorted chunks are gathered here, as they are read, from the unsorted inputs: sorted slot
// (g, i) of row r is input row q_pos[r, g, i] of that row (XLA would first write the sorted
// copies out and read them back in).
//
// Layout (row-major, float32), leading axes flattened into rows r:
//   qk [R, L, H], v [R, L, Hv] (unsorted), q_pos [R, G, C] int32 (each sorted slot's position in
//   0 ... L - 1), k_valid [R, G, K] bool, K = (before + 1 + after) * C; window part j of chunk g
//   is chunk (g - before + j) mod G.
// Forward returns out [R, G, C, Hv], lse [R, G, C] and probs [R, G, C, K] (or, without
// `save_probs`, a [1] placeholder); backward takes them with d_out, d_lse and returns d_sqk
// [R, G, C, H] and d_sv [R, G, C, Hv] in sorted order. C, H and Hv must be multiples of 16 (the
// Python side falls back to XLA otherwise).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using reformer_jax::ParallelFor;

// common.MASK_VALUE, common.SELF_MASK_VALUE and unit_normalize's epsilon.
constexpr float kMask = -1e9f;
constexpr float kSelf = -5e4f;
constexpr float kEps = 1e-6f;

// The CPU's vector width in floats: GCC's generic vectors wider than the machine's registers
// are split into pieces it schedules poorly (16-float vectors ran the products at 7 GFLOP/s a
// core on an AVX2 CPU, about a tenth of its FMA peak).
#if defined(__AVX512F__)
constexpr int kW = 16;
#define REFORMER_LANES(F) F(0), F(1), F(2), F(3), F(4), F(5), F(6), F(7), F(8), F(9), F(10), \
    F(11), F(12), F(13), F(14), F(15)
#elif defined(__AVX__)
constexpr int kW = 8;
#define REFORMER_LANES(F) F(0), F(1), F(2), F(3), F(4), F(5), F(6), F(7)
#else
constexpr int kW = 4;  // SSE, NEON
#define REFORMER_LANES(F) F(0), F(1), F(2), F(3)
#endif

typedef float vf __attribute__((vector_size(4 * kW)));
typedef int32_t vi __attribute__((vector_size(4 * kW)));

inline vf Load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void Store(float* p, vf x) { std::memcpy(p, &x, sizeof(x)); }
inline vi LoadInt(const int32_t* p) {
  vi x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline float Sum(vf x) {
  float s = 0;
  for (int i = 0; i < kW; ++i) s += x[i];
  return s;
}
inline float Max(vf x) {
  float m = x[0];
  for (int i = 1; i < kW; ++i) m = std::max(m, x[i]);
  return m;
}

// exp(x) to about 2 ulp for x >= -87 (Cody-Waite reduction, degree-6 polynomial); 0 below.
inline vf Exp(vf x) {
  const vi under = x < -87.0f;
  x = x < -87.0f ? vf{} - 87.0f : x;
  x = x > 88.0f ? vf{} + 88.0f : x;
  const vf shift = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + shift) - shift;
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const vf y = p * scale;
  return under ? vf{} : y;
}

// Register tiles of the small products: up to kRows rows by kVecs vectors of kW columns
// (AVX-512, 6 x 4: ~80% of a core's FMA peak at 64 x 64 x 64 here, 4 x 4 ~58%).
#if defined(__AVX512F__)
constexpr int kRows = 6, kVecs = 4;  // 24 of the 32 zmm registers accumulate
#else
constexpr int kRows = 6, kVecs = 2;  // 12 of the 16 ymm (or xmm) registers
#endif

// c[i, n] (+)= sum_k a[i, k] b[k, n] for i < R, n < kW * V: `a` read with strides
// (a_row, a_col), so a matrix or a transposed one; `b` and `c` row-major.
template <int R, int V, bool kAcc>
inline void Tile(int64_t depth, const float* a, int64_t a_row, int64_t a_col, const float* b,
                 int64_t ldb, float* c, int64_t ldc) {
  vf acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = kAcc ? Load(c + i * ldc + kW * v) : vf{};
  for (int64_t k = 0; k < depth; ++k) {
    vf bv[V];
    for (int v = 0; v < V; ++v) bv[v] = Load(b + k * ldb + kW * v);
    for (int i = 0; i < R; ++i) {
      const float s = a[i * a_row + k * a_col];
      for (int v = 0; v < V; ++v) acc[i][v] += s * bv[v];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) Store(c + i * ldc + kW * v, acc[i][v]);
}

// Rows [i, i + R) of the product, all columns: full-width tiles, then kW-column ones.
template <int R, bool kAcc>
inline void Rows(int64_t n, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
                 const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + kW * kVecs <= n; j += kW * kVecs)
    Tile<R, kVecs, kAcc>(depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
  for (; j < n; j += kW) Tile<R, 1, kAcc>(depth, a, a_row, a_col, b + j, ldb, c + j, ldc);
}

// C[M, N] (+)= A[M, D] B[D, N]; M a multiple of 2, N of 16.
template <bool kAcc>
void Gemm(int64_t m, int64_t n, int64_t depth, const float* a, int64_t a_row, int64_t a_col,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kRows <= m; i += kRows)
    Rows<kRows, kAcc>(n, depth, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc);
  for (; i + 4 <= m; i += 4)
    Rows<4, kAcc>(n, depth, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc);
  for (; i < m; i += 2)
    Rows<2, kAcc>(n, depth, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc);
}

struct Dims {
  int64_t rows, len, g, c, h, hv, parts, before, k;
};

Dims GetDims(const ffi::AnyBuffer::Dimensions& qk, const ffi::AnyBuffer::Dimensions& v,
             const ffi::AnyBuffer::Dimensions& q_pos, int64_t before, int64_t after) {
  Dims d;
  const size_t rank = q_pos.size();
  d.rows = 1;
  for (size_t i = 0; i + 2 < rank; ++i) d.rows *= q_pos[i];
  d.g = q_pos[rank - 2];
  d.c = q_pos[rank - 1];
  d.len = qk[qk.size() - 2];
  d.h = qk[qk.size() - 1];
  d.hv = v[v.size() - 1];
  d.parts = before + 1 + after;
  d.before = before;
  d.k = d.parts * d.c;
  return d;
}

ffi::Error CheckDims(const Dims& d) {
  if (d.c % 16 || d.h % 16 || d.hv % 16)
    return ffi::Error::InvalidArgument("chunk_len and head dims must be multiples of 16");
  if (d.parts > 16) return ffi::Error::InvalidArgument("at most 16 chunks in a window");
  return ffi::Error::Success();
}

inline int64_t Wrap(int64_t g, int64_t n) { return ((g % n) + n) % n; }

// Sorted chunk w of row r gathered from `x` ([R, L, width]) into `out` ([C, width]).
void GatherChunk(const Dims& d, const float* x, int64_t width, const int32_t* q_pos, int64_t r,
                 int64_t w, float* out) {
  const int32_t* pos = q_pos + (r * d.g + w) * d.c;
  const float* row = x + r * d.len * width;
  for (int64_t i = 0; i < d.c; ++i)
    std::memcpy(out + i * width, row + pos[i] * width, width * sizeof(float));
}

// One step of a kW x kW transpose in registers: rows i and i + S (i & S == 0) swap the
// S-wide blocks off their diagonal. After the steps S = kW / 2, ..., 2, 1 row k holds column k.
template <int S>
inline void SwapBlocks(vf* m) {
#define REFORMER_LO(k) (((k) & S) ? kW + (k) - S : (k))
#define REFORMER_HI(k) (((k) & S) ? kW + (k) : (k) + S)
  constexpr vi lo = {REFORMER_LANES(REFORMER_LO)};
  constexpr vi hi = {REFORMER_LANES(REFORMER_HI)};
#undef REFORMER_LO
#undef REFORMER_HI
  for (int i = 0; i < kW; ++i) {
    if (i & S) continue;
    const vf a = m[i], b = m[i + S];
    m[i] = __builtin_shuffle(a, b, lo);
    m[i + S] = __builtin_shuffle(a, b, hi);
  }
}

// dst[j, i] = src[i, j] * scale[i] (scale null: 1) for src [rows, cols] with row stride
// `ld_src` and dst [cols, rows] with row stride `ld_dst`; rows and cols multiples of 16.
void Transpose(const float* src, int64_t ld_src, int64_t rows, int64_t cols, const float* scale,
               float* dst, int64_t ld_dst) {
  vf m[kW];
  for (int64_t i0 = 0; i0 < rows; i0 += kW) {
    for (int64_t j0 = 0; j0 < cols; j0 += kW) {
      for (int i = 0; i < kW; ++i) {
        m[i] = Load(src + (i0 + i) * ld_src + j0);
        if (scale) m[i] *= scale[i0 + i];
      }
      if constexpr (kW >= 16) SwapBlocks<8>(m);
      if constexpr (kW >= 8) SwapBlocks<4>(m);
      SwapBlocks<2>(m);
      SwapBlocks<1>(m);
      for (int j = 0; j < kW; ++j) Store(dst + (j0 + j) * ld_dst + i0, m[j]);
    }
  }
}

// Chunk w of row r's unit-normalized keys, written transposed ([H, C]) or not ([C, H]), and
// the inverse norms [C].
void UnitKeys(const Dims& d, const float* x, float* unit, bool transposed, float* inv_norm) {
  for (int64_t i = 0; i < d.c; ++i) {
    const float* xi = x + i * d.h;
    vf ss{};
    for (int64_t e = 0; e < d.h; e += kW) {
      const vf xv = Load(xi + e);
      ss += xv * xv;
    }
    const float inv = 1.0f / std::sqrt(Sum(ss) + kEps);
    inv_norm[i] = inv;
    if (!transposed)
      for (int64_t e = 0; e < d.h; e += kW) Store(unit + i * d.h + e, Load(xi + e) * inv);
  }
  if (transposed) Transpose(x, d.h, d.c, d.h, inv_norm, unit, d.c);
}

// Chunk (r, g)'s window keys: their original positions and validity (-1 or 0), `[K]` each,
// read once per chunk so that each query's masks are two vector compares.
void WindowKeys(const Dims& d, const int32_t* q_pos, const bool* k_valid, int64_t r, int64_t g,
                int32_t* key_pos, int32_t* key_valid) {
  for (int64_t j = 0; j < d.parts; ++j) {
    const int64_t w = Wrap(g - d.before + j, d.g);
    std::memcpy(key_pos + j * d.c, q_pos + (r * d.g + w) * d.c, d.c * sizeof(int32_t));
  }
  const bool* valid = k_valid + (r * d.g + g) * d.k;
  for (int64_t kk = 0; kk < d.k; ++kk) key_valid[kk] = valid[kk] ? -1 : 0;
}

// The allowed and self masks of a query at original position `qp` against the kW window keys
// from column kk on.
struct Masks {
  vi allowed, self;
};
inline Masks ChunkMasks(const int32_t* key_pos, const int32_t* key_valid, int32_t qp, int64_t kk,
                        bool causal) {
  const vi kp = LoadInt(key_pos + kk);
  vi allowed = LoadInt(key_valid + kk);
  if (causal) allowed &= kp <= qp;
  return {allowed, kp == qp};
}

// A thread's scratch buffer `kSlot` of at least `n` elements, kept across blocks and calls: XLA's
// pool threads live as long as the runtime, so the kernels allocate and zero nothing per block.
// (Per-block vectors, ~1 MB a block, cost the peers step of experiments/peers.py about 1.5% of
// its time in malloc's search of the step's fragmented heap and in memset.) Kernel calls do not
// nest on a thread, and within one function every buffer has its own slot.
enum Slot { kRaw, kUnit, kValues, kInvNorm, kProbs, kKeysGrad, kValuesGrad, kValueRows, kKeyPos,
            kKeyValid };

template <typename T, Slot kSlot>
T* Scratch(int64_t n) {
  static thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// A row's chunks go in blocks of about kBlock consecutive chunks, one block per task. A block
// keeps its window chunks' normalized keys (and values) in a local cache: "offset" o of block
// [g0, g1) is chunk g0 - before + o (mod G), o < g1 - g0 + before + after.
constexpr int64_t kBlock = 16;

struct Blocks {
  int64_t per_row, count;
  Blocks(const Dims& d) : per_row(std::max<int64_t>(1, d.g / kBlock)), count(d.rows * per_row) {}
  // Block i of its row: chunks [begin, end), sizes differing by at most one (at least kBlock
  // unless the row is shorter, so at least before + after when a row has several blocks).
  int64_t begin(const Dims& d, int64_t i) const { return i * d.g / per_row; }
  int64_t end(const Dims& d, int64_t i) const { return (i + 1) * d.g / per_row; }
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer sqk_b, ffi::AnyBuffer sv_b,
                   ffi::Buffer<ffi::S32> q_pos_b, ffi::Buffer<ffi::PRED> k_valid_b,
                   ffi::Result<ffi::AnyBuffer> out_b, ffi::Result<ffi::AnyBuffer> lse_b,
                   ffi::Result<ffi::AnyBuffer> probs_b, int64_t before, int64_t after,
                   bool causal, bool save_probs) {
  const Dims d = GetDims(sqk_b.dimensions(), sv_b.dimensions(), q_pos_b.dimensions(), before,
                         after);
  if (ffi::Error e = CheckDims(d); e.failure()) return e;
  const float* sqk = sqk_b.typed_data<float>();
  const float* sv = sv_b.typed_data<float>();
  const int32_t* q_pos = q_pos_b.typed_data();
  const bool* k_valid = k_valid_b.typed_data();
  float* out = out_b->typed_data<float>();
  float* lse = lse_b->typed_data<float>();
  float* probs = probs_b->typed_data<float>();
  const Blocks blocks(d);
  const int64_t chunk_qk = d.c * d.h, chunk_v = d.c * d.hv;

  ParallelFor(pool, blocks.count, 1, [&](int64_t first, int64_t last) {
    float* inv_norm = Scratch<float, kInvNorm>(d.c);  // one chunk's, used for its transposed keys
    // One chunk's probabilities, where they are not saved.
    float* scratch = save_probs ? nullptr : Scratch<float, kProbs>(d.c * d.k);
    int32_t* key_pos = Scratch<int32_t, kKeyPos>(d.k);
    int32_t* key_valid = Scratch<int32_t, kKeyValid>(d.k);
    for (int64_t bi = first; bi < last; ++bi) {
      const int64_t r = bi / blocks.per_row, i = bi % blocks.per_row;
      const int64_t g0 = blocks.begin(d, i), g1 = blocks.end(d, i);
      const int64_t offsets = g1 - g0 + d.parts - 1;
      float* raw = Scratch<float, kRaw>(offsets * chunk_qk);       // [offsets, C, H]
      float* unit_t = Scratch<float, kUnit>(offsets * chunk_qk);   // transposed [offsets, H, C]
      float* vals = Scratch<float, kValues>(offsets * chunk_v);    // [offsets, C, Hv]
      for (int64_t o = 0; o < offsets; ++o) {
        const int64_t w = Wrap(g0 - d.before + o, d.g);
        GatherChunk(d, sqk, d.h, q_pos, r, w, raw + o * chunk_qk);
        GatherChunk(d, sv, d.hv, q_pos, r, w, vals + o * chunk_v);
        UnitKeys(d, raw + o * chunk_qk, unit_t + o * chunk_qk, true, inv_norm);
      }
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t t = r * d.g + g;
        const float* q = raw + (g - g0 + d.before) * chunk_qk;
        float* p = save_probs ? probs + t * d.c * d.k : scratch;
        WindowKeys(d, q_pos, k_valid, r, g, key_pos, key_valid);
        for (int64_t j = 0; j < d.parts; ++j)  // logits = q k^T, window part j: offset g - g0 + j
          Gemm<false>(d.c, d.c, d.h, q, d.h, 1, unit_t + (g - g0 + j) * chunk_qk, d.c,
                      p + j * d.c, d.k);
        for (int64_t qi = 0; qi < d.c; ++qi) {
          float* row = p + qi * d.k;
          vf mx = vf{} + kMask;
          const int32_t qp = q_pos[t * d.c + qi];
          for (int64_t kk = 0; kk < d.k; kk += kW) {
            const Masks m = ChunkMasks(key_pos, key_valid, qp, kk, causal);
            vf x = Load(row + kk);
            x = m.self ? vf{} + kSelf : x;
            x = m.allowed ? x : vf{} + kMask;
            Store(row + kk, x);
            mx = mx > x ? mx : x;
          }
          const float top = Max(mx);
          vf total{};
          for (int64_t kk = 0; kk < d.k; kk += kW) {
            const vf e = Exp(Load(row + kk) - top);
            Store(row + kk, e);
            total += e;
          }
          const float sum = Sum(total);
          lse[t * d.c + qi] = top + std::log(sum);
          const float inv = 1.0f / sum;
          for (int64_t kk = 0; kk < d.k; kk += kW) Store(row + kk, Load(row + kk) * inv);
        }
        // out = p v: the window's values are consecutive offsets, so one product of depth K.
        Gemm<false>(d.c, d.hv, d.k, p, d.k, 1, vals + (g - g0) * chunk_v, d.hv,
                    out + t * chunk_v, d.hv);
      }
    }
  });
  return ffi::Error::Success();
}

// d x of chunk t given its keys' gradient: (d k - k <k, d k>) / |x|, added into d_sqk.
void AddUnitGradient(const Dims& d, const float* unit, const float* inv_norm, const float* dk,
                     float* d_sqk) {
  for (int64_t i = 0; i < d.c; ++i) {
    vf dot{};
    for (int64_t e = 0; e < d.h; e += kW) dot += Load(unit + i * d.h + e) * Load(dk + i * d.h + e);
    const float proj = Sum(dot), inv = inv_norm[i];
    for (int64_t e = 0; e < d.h; e += kW) {
      const vf dx = (Load(dk + i * d.h + e) - Load(unit + i * d.h + e) * proj) * inv;
      Store(d_sqk + i * d.h + e, Load(d_sqk + i * d.h + e) + dx);
    }
  }
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::AnyBuffer sqk_b, ffi::AnyBuffer sv_b,
                    ffi::Buffer<ffi::S32> q_pos_b, ffi::Buffer<ffi::PRED> k_valid_b,
                    ffi::AnyBuffer probs_b, ffi::AnyBuffer out_b, ffi::AnyBuffer d_out_b,
                    ffi::AnyBuffer d_lse_b, ffi::Result<ffi::AnyBuffer> d_sqk_b,
                    ffi::Result<ffi::AnyBuffer> d_sv_b, int64_t before, int64_t after,
                    bool causal) {
  const Dims d = GetDims(sqk_b.dimensions(), sv_b.dimensions(), q_pos_b.dimensions(), before,
                         after);
  if (ffi::Error e = CheckDims(d); e.failure()) return e;
  const float* sqk = sqk_b.typed_data<float>();
  const float* sv = sv_b.typed_data<float>();
  const int32_t* q_pos = q_pos_b.typed_data();
  const bool* k_valid = k_valid_b.typed_data();
  const float* probs = probs_b.typed_data<float>();
  const float* out = out_b.typed_data<float>();
  const float* d_out = d_out_b.typed_data<float>();
  const float* d_lse = d_lse_b.typed_data<float>();
  float* d_sqk = d_sqk_b->typed_data<float>();
  float* d_sv = d_sv_b->typed_data<float>();
  const Blocks blocks(d);
  const int64_t chunk_qk = d.c * d.h, chunk_v = d.c * d.hv;
  // A block's keys/values gradient is complete for its interior chunks [g0 + after, g1 - before)
  // (no other block's window reaches them); for the `edge` offsets at either end, other blocks
  // add to the same chunks, so those partial sums wait in `halo_*` for the second pass.
  const int64_t edge = d.parts - 1;
  // (Not zeroed: the second pass reads only the slots the first one wrote.)
  std::unique_ptr<float[]> halo_k(new float[blocks.count * 2 * edge * chunk_qk]);
  std::unique_ptr<float[]> halo_v(new float[blocks.count * 2 * edge * chunk_v]);
  auto halo_slot = [&](int64_t offsets, int64_t o) { return o < edge ? o : o - offsets + 2 * edge; };

  ParallelFor(pool, blocks.count, 1, [&](int64_t first, int64_t last) {
    float* ds = Scratch<float, kProbs>(d.c * d.k);
    float* v_rows = Scratch<float, kValueRows>(chunk_v);
    int32_t* key_pos = Scratch<int32_t, kKeyPos>(d.k);
    int32_t* key_valid = Scratch<int32_t, kKeyValid>(d.k);
    for (int64_t bi = first; bi < last; ++bi) {
      const int64_t r = bi / blocks.per_row, i = bi % blocks.per_row;
      const int64_t g0 = blocks.begin(d, i), g1 = blocks.end(d, i);
      const int64_t offsets = g1 - g0 + edge;
      float* raw = Scratch<float, kRaw>(offsets * chunk_qk);
      float* unit = Scratch<float, kUnit>(offsets * chunk_qk);
      float* inv_norm = Scratch<float, kInvNorm>(offsets * d.c);
      float* v_t = Scratch<float, kValues>(offsets * chunk_v);
      float* dk = Scratch<float, kKeysGrad>(offsets * chunk_qk);
      float* dv = Scratch<float, kValuesGrad>(offsets * chunk_v);
      std::fill(dk, dk + offsets * chunk_qk, 0.0f);
      std::fill(dv, dv + offsets * chunk_v, 0.0f);
      for (int64_t o = 0; o < offsets; ++o) {
        const int64_t w = Wrap(g0 - d.before + o, d.g);
        GatherChunk(d, sqk, d.h, q_pos, r, w, raw + o * chunk_qk);
        UnitKeys(d, raw + o * chunk_qk, unit + o * chunk_qk, false,
                 inv_norm + o * d.c);
        GatherChunk(d, sv, d.hv, q_pos, r, w, v_rows);
        Transpose(v_rows, d.hv, d.c, d.hv, nullptr, v_t + o * chunk_v, d.c);
      }
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t t = r * d.g + g;
        const float* p = probs + t * d.c * d.k;
        const float* dout = d_out + t * chunk_v;
        const float* q = raw + (g - g0 + d.before) * chunk_qk;
        WindowKeys(d, q_pos, k_valid, r, g, key_pos, key_valid);
        for (int64_t j = 0; j < d.parts; ++j)  // d probs = d_out v^T
          Gemm<false>(d.c, d.c, d.hv, dout, d.hv, 1, v_t + (g - g0 + j) * chunk_v, d.c,
                      ds + j * d.c, d.k);
        for (int64_t qi = 0; qi < d.c; ++qi) {  // d logits = p (d probs - <d_out, out> + d_lse)
          vf dot{};
          for (int64_t e = 0; e < d.hv; e += kW)
            dot += Load(dout + qi * d.hv + e) * Load(out + t * chunk_v + qi * d.hv + e);
          const float delta = Sum(dot) - d_lse[t * d.c + qi];
          float* row = ds + qi * d.k;
          const int32_t qp = q_pos[t * d.c + qi];
          for (int64_t kk = 0; kk < d.k; kk += kW) {
            const Masks m = ChunkMasks(key_pos, key_valid, qp, kk, causal);
            const vf x = Load(p + qi * d.k + kk) * (Load(row + kk) - delta);
            Store(row + kk, (m.allowed & ~m.self) ? x : vf{});
          }
        }
        // d q = d logits k: the window's keys are consecutive offsets, one product of depth K.
        Gemm<false>(d.c, d.h, d.k, ds, d.k, 1, unit + (g - g0) * chunk_qk, d.h,
                    d_sqk + t * chunk_qk, d.h);
        for (int64_t j = 0; j < d.parts; ++j) {
          const int64_t o = g - g0 + j;
          const float* ds_j = ds + j * d.c;
          // d k += d logits^T q and d v += p^T d_out, for the chunk at offset o.
          Gemm<true>(d.c, d.h, d.c, ds_j, 1, d.k, q, d.h, dk + o * chunk_qk, d.h);
          Gemm<true>(d.c, d.hv, d.c, p + j * d.c, 1, d.k, dout, d.hv, dv + o * chunk_v,
                     d.hv);
        }
      }
      for (int64_t o = 0; o < offsets; ++o) {
        const int64_t g = g0 - d.before + o;
        if (g >= g0 + after && g < g1 - d.before) {  // interior: complete here
          const int64_t t = r * d.g + g;
          AddUnitGradient(d, unit + o * chunk_qk, inv_norm + o * d.c,
                          dk + o * chunk_qk, d_sqk + t * chunk_qk);
          std::memcpy(d_sv + t * chunk_v, dv + o * chunk_v, chunk_v * sizeof(float));
        } else {
          const int64_t s = bi * 2 * edge + halo_slot(offsets, o);
          std::memcpy(&halo_k[s * chunk_qk], dk + o * chunk_qk, chunk_qk * sizeof(float));
          std::memcpy(&halo_v[s * chunk_v], dv + o * chunk_v, chunk_v * sizeof(float));
        }
      }
    }
  });
  if (edge == 0) return ffi::Error::Success();
  // Chunks at block edges: the partial sums of this block and its neighbours (in its row, the
  // first and last blocks neighbours through the wrap-around) that hold the same chunk.
  ParallelFor(pool, blocks.count, 4, [&](int64_t first, int64_t last) {
    float* raw = Scratch<float, kRaw>(chunk_qk);
    float* unit = Scratch<float, kUnit>(chunk_qk);
    float* inv_norm = Scratch<float, kInvNorm>(d.c);
    float* dk = Scratch<float, kKeysGrad>(chunk_qk);
    for (int64_t bi = first; bi < last; ++bi) {
      const int64_t r = bi / blocks.per_row, i = bi % blocks.per_row;
      const int64_t g0 = blocks.begin(d, i), g1 = blocks.end(d, i);
      int64_t near[3] = {i, 0, 0}, n_near = 1;  // this block and its neighbours, once each
      for (int64_t step : {-1, 1}) {
        const int64_t b = Wrap(i + step, blocks.per_row);
        if (std::find(near, near + n_near, b) == near + n_near) near[n_near++] = b;
      }
      for (int64_t g = g0; g < g1; ++g) {
        if (g >= g0 + after && g < g1 - d.before) continue;
        const int64_t t = r * d.g + g;
        std::fill(dk, dk + chunk_qk, 0.0f);
        float* dv = d_sv + t * chunk_v;
        std::fill(dv, dv + chunk_v, 0.0f);
        for (int64_t n = 0; n < n_near; ++n) {
          const int64_t b2 = r * blocks.per_row + near[n];
          const int64_t h0 = blocks.begin(d, near[n]), h1 = blocks.end(d, near[n]);
          const int64_t offsets = h1 - h0 + edge;
          for (int64_t o = 0; o < offsets; ++o) {
            const int64_t h = h0 - d.before + o;
            if (h >= h0 + after && h < h1 - d.before) continue;  // interior of that block
            if (Wrap(h, d.g) != g) continue;
            const int64_t s = b2 * 2 * edge + halo_slot(offsets, o);
            for (int64_t e = 0; e < chunk_qk; e += kW)
              Store(&dk[e], Load(&dk[e]) + Load(&halo_k[s * chunk_qk + e]));
            for (int64_t e = 0; e < chunk_v; e += kW)
              Store(dv + e, Load(dv + e) + Load(&halo_v[s * chunk_v + e]));
          }
        }
        GatherChunk(d, sqk, d.h, q_pos, r, g, raw);
        UnitKeys(d, raw, unit, false, inv_norm);
        AddUnitGradient(d, unit, inv_norm, dk, d_sqk + t * chunk_qk);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ReformerChunkAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("before")
                                  .Attr<int64_t>("after")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("save_probs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ReformerChunkAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("before")
                                  .Attr<int64_t>("after")
                                  .Attr<bool>("causal"));
