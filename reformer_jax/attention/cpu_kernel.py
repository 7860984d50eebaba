"""LSH attention's chunk step as a compiled CPU kernel (`chunk_attention.cc`, XLA FFI).

`lsh.attend_sorted_chunks` runs each sorted chunk's attention over its look-around window. On
CPU, XLA runs the batched `[C, H] x [H, K]` products of that step one chunk at a time on one
thread and materializes the sorted copies of the inputs, the windows, masks and probabilities in
between; `chunk_attention.cc` gathers a chunk's rows from the unsorted inputs as it reads them,
does the chunk's whole step out of cache and spreads chunks over XLA's intra-op threads. It is
compiled on first use with the machine's C++ compiler (`-O3 -march=native`, a few seconds) into
a cache directory and registered as the FFI targets `reformer_chunk_attention_fwd` / `_bwd`.
The same library holds LSH's counting sort of the buckets (`bucket_sort.cc`, FFI target
`reformer_bucket_sort`, used by `lsh._sort_slots`). A second library, `matmul.cc` linked against
OpenBLAS from the `scipy-openblas32` package, runs float32 matrix products (FFI target
`reformer_matmul`, `matmul` below): `layers.matmul`, every projection of the models, uses it on
CPU.

`REFORMER_JAX_CPU_KERNEL`: `auto` (default) uses the kernels where they apply (float32; for the
chunk step, chunk and head widths multiples of 16; the CPU backend) and falls back to the XLA
versions, with one warning per library, when no compiler (or no OpenBLAS) is found or the build
fails; `0` always uses XLA; `1` makes a failed build an error. `REFORMER_JAX_CACHE` overrides the
cache directory (default `$XDG_CACHE_HOME/reformer_jax` or `~/.cache/reformer_jax`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from reformer_jax import machine

_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / 'chunk_attention.cc', _HERE / 'bucket_sort.cc')  # one library
BLAS_SOURCES = (_HERE / 'matmul.cc',)  # the other, linked against OpenBLAS
HEADERS = (_HERE / 'parallel_for.h',)
FORWARD, BACKWARD = 'reformer_chunk_attention_fwd', 'reformer_chunk_attention_bwd'
SORT = 'reformer_bucket_sort'
MATMUL = 'reformer_matmul'
FLAGS = ('-O3', '-march=native', '-std=c++17', '-ffp-contract=fast', '-fPIC', '-shared',
         '-Wno-attributes', '-Wno-return-type')
ENV = 'REFORMER_JAX_CPU_KERNEL'


def mode() -> str:
  """`REFORMER_JAX_CPU_KERNEL`, checked: 'auto', '0' or '1'."""
  value = os.environ.get(ENV, 'auto').strip().lower() or 'auto'
  if value not in ('auto', '0', '1'):
    raise ValueError(f'{ENV}={value!r}: use auto (the kernel where it applies), 0 (always XLA) '
                     'or 1 (the kernel, and an error if it cannot be built)')
  return value


def cache_dir() -> pathlib.Path:
  root = os.environ.get('REFORMER_JAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'reformer_jax')
  return pathlib.Path(root) / 'kernels'


def _compiler() -> str | None:
  return os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++') or shutil.which(
      'clang++')


def _openblas_flags() -> list[str]:
  """Compiler and linker flags for scipy-openblas32's headers and library; raises `RuntimeError`
  when the package is missing."""
  try:
    import scipy_openblas32  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise RuntimeError('the scipy-openblas32 package is not installed (pip install '
                       'scipy-openblas32, a dependency of reformer_jax)') from e
  lib = scipy_openblas32.get_lib_dir()
  return [f'-I{scipy_openblas32.get_include_dir()}', f'-L{lib}',
          f'-l{scipy_openblas32.get_library()}', f'-Wl,-rpath,{lib}']


def build(blas: bool = False) -> pathlib.Path:
  """Compiles `chunk_attention.cc` and `bucket_sort.cc` into one library (or, `blas`,
  `matmul.cc` against OpenBLAS into another), once per sources, compiler, flags, jaxlib and CPU,
  and returns its path. Raises `RuntimeError` with the compiler's message when it fails."""
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError('no C++ compiler found (set CXX, or install g++)')
  files, extra = (BLAS_SOURCES, _openblas_flags()) if blas else (SOURCES, [])
  sources = [f.read_bytes() for f in (*files, *HEADERS)]
  key = hashlib.sha256(b'\0'.join([
      *sources, compiler.encode(), ' '.join(FLAGS + tuple(extra)).encode(),
      jax.__version__.encode(), machine.cpu_flags().encode()])).hexdigest()[:16]  # -march=native
  target = cache_dir() / f'{"matmul" if blas else "chunk_attention"}-{key}.so'
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    built = pathlib.Path(tmp) / target.name
    command = [compiler, *FLAGS, f'-I{jax.ffi.include_dir()}', *map(str, files), '-o',
               str(built), *extra]
    logging.info('Compiling CPU kernels: %s', ' '.join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr[-4000:]}')
    os.replace(built, target)  # atomic: a concurrent build of the same key is the same file
  return target


def _open(blas: bool, what: str, fallback: str) -> ctypes.CDLL | None:
  """The library of `build(blas)`, compiling it if needed; None, with one warning naming the
  `fallback`, where it cannot be built (an error under `REFORMER_JAX_CPU_KERNEL=1`)."""
  try:
    return ctypes.CDLL(str(build(blas)))
  except (RuntimeError, OSError) as e:
    if mode() == '1':
      raise RuntimeError(f'{ENV}=1 but {what} cannot be built: {e}') from e
    logging.warning('%s (%s=auto): %s', fallback, ENV, e)
    return None


def _register(library: ctypes.CDLL, targets: dict[str, str]) -> None:
  for name, symbol in targets.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform='cpu')


@functools.cache
def _load() -> bool:
  """Builds and registers the kernel once per process; False (with a warning) if it cannot."""
  library = _open(False, 'the LSH chunk kernel',
                  'LSH attention uses the XLA version of its chunk step on CPU')
  if library is None:
    return False
  _register(library, {FORWARD: 'ReformerChunkAttentionFwd', BACKWARD: 'ReformerChunkAttentionBwd',
                      SORT: 'ReformerBucketSort'})
  return True


@functools.cache
def _load_blas() -> bool:
  """Builds and registers the OpenBLAS product once per process; False (with a warning) if it
  cannot."""
  library = _open(True, 'the OpenBLAS matrix product', "Matrix products use XLA's dot on CPU")
  if library is None:
    return False
  library.ReformerBlasSingleThreaded()
  _register(library, {MATMUL: 'ReformerMatmul'})
  return True


def available() -> bool:
  """Whether the library is on (not `REFORMER_JAX_CPU_KERNEL=0`) and built (compiling it on
  first call): what `bucket_sort` needs."""
  return mode() != '0' and _load()


def applies(qk: jax.Array, v: jax.Array, chunk_len: int, before: int, after: int) -> bool:
  """Whether the kernel can run this chunk step: float32, `C`, `H` and `H_v` multiples of 16,
  at most 16 chunks per window, not switched off, and built (compiling it on first call)."""
  if (mode() == '0' or qk.dtype != jnp.float32 or v.dtype != jnp.float32
      or chunk_len % 16 or qk.shape[-1] % 16 or v.shape[-1] % 16 or before + 1 + after > 16):
    return False
  return _load()


def _attrs(before: int, after: int, causal: bool) -> dict:
  return dict(before=np.int64(before), after=np.int64(after), causal=bool(causal))


def forward(qk, v, q_pos, k_valid, before: int, after: int, causal: bool,
            save_probs: bool = True):
  """`(out, lse, probs)` of `lsh.attend_sorted_chunks`, whose sorted chunk slot `(g, i)` is row
  `q_pos[..., g, i]` of `qk [B, n, L, H]` and `v [B, n, L, H_v]`: `out [B, n, G, C, H_v]`,
  `lse [B, n, G, C]` and `probs [B, n, G, C, K]` (a `[1]` placeholder without `save_probs`)."""
  *lead, groups, chunk_len = q_pos.shape
  window = (before + 1 + after) * chunk_len
  k_valid = jnp.broadcast_to(k_valid, (*lead, groups, window))
  f32 = jnp.float32
  shapes = (jax.ShapeDtypeStruct((*lead, groups, chunk_len, v.shape[-1]), f32),
            jax.ShapeDtypeStruct((*lead, groups, chunk_len), f32),
            jax.ShapeDtypeStruct((*lead, groups, chunk_len, window) if save_probs else (1,), f32))
  return jax.ffi.ffi_call(FORWARD, shapes, vmap_method='broadcast_all')(
      qk, v, q_pos.astype(jnp.int32), k_valid, save_probs=bool(save_probs),
      **_attrs(before, after, causal))


def backward(qk, v, q_pos, k_valid, probs, out, d_out, d_lse, before: int, after: int,
             causal: bool):
  """`(d_sqk [B, n, G, C, H], d_sv [B, n, G, C, H_v])`, in sorted order, of `forward` given its
  `probs`, `out` and the cotangents of `out` and `lse`."""
  *lead, groups, chunk_len = q_pos.shape
  k_valid = jnp.broadcast_to(k_valid, (*lead, groups, probs.shape[-1]))
  shapes = (jax.ShapeDtypeStruct((*lead, groups, chunk_len, qk.shape[-1]), jnp.float32),
            jax.ShapeDtypeStruct((*lead, groups, chunk_len, v.shape[-1]), jnp.float32))
  return jax.ffi.ffi_call(BACKWARD, shapes, vmap_method='broadcast_all')(
      qk, v, q_pos.astype(jnp.int32), k_valid, probs, out, d_out.astype(jnp.float32),
      d_lse.astype(jnp.float32), **_attrs(before, after, causal))


def matmul_applies(a: jax.Array, b: jax.Array) -> bool:
  """Whether `matmul` can run `a @ b`: 2-D float32 arrays, one device in the process, not
  switched off, and built (compiling it on first call). With several devices (a CPU mesh) a
  product may be sharded, and XLA's partitioner would gather a custom call's operands whole on
  every device; its own dot it partitions."""
  if (mode() == '0' or a.ndim != 2 or b.ndim != 2 or a.dtype != jnp.float32
      or b.dtype != jnp.float32 or jax.device_count() > 1):
    return False
  return _load_blas()


def matmul(a, b, trans_a: bool = False, trans_b: bool = False):
  """`op(a) @ op(b)` by OpenBLAS's sgemm (`matmul.cc`), `op` transposing where asked: `a [M, K]`
  (or `[K, M]`), `b [K, N]` (or `[N, K]`) float32 -> `[M, N]` float32."""
  m = a.shape[1] if trans_a else a.shape[0]
  n = b.shape[0] if trans_b else b.shape[1]
  return jax.ffi.ffi_call(MATMUL, jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method='sequential')(a, b, trans_a=bool(trans_a),
                                                    trans_b=bool(trans_b))


def bucket_sort(buckets, n_keys: int):
  """`(sort_idx, undo_idx, pos)`, each `[B, N, R * L]` int32, of `buckets [B, N, R, L]` int32 in
  `[0, n_keys)`: every round's positions ordered by bucket, ties in position order (a counting
  sort, `bucket_sort.cc`), rounds after one another; what `lsh._sort_slots` returns."""
  *lead, rounds, length = buckets.shape
  shape = jax.ShapeDtypeStruct((*lead, rounds * length), jnp.int32)
  return jax.ffi.ffi_call(SORT, (shape,) * 3, vmap_method='broadcast_all')(
      buckets.astype(jnp.int32), n_keys=np.int64(n_keys))
