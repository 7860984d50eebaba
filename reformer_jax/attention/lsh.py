"""LSH attention (Kitaev et al. 2020, section 3): hash, sort, attend within chunks, unsort.

1. Hash: shared query/keys are rotated by a random matrix and each round's bucket is
   `argmax([xR; -xR])` (a factorized list of bucket counts hashes each factor separately).
2. Sort: one stable sort over all rounds by (round, bucket, position); the inverse permutation,
   for unsorting, is a scatter of slot numbers.
3. Attend: the sorted sequence is cut into chunks of `chunk_len`; each chunk sees itself and
   `n_chunks_before` / `n_chunks_after` neighbours of the same round. Keys are the unit-normalized
   queries; causal, padding and self masks apply on original positions.
4. Unsort and combine: every round gives each query an output and the logsumexp of its logits;
   the rounds are mixed by a softmax over those logsumexps.

Memory is O(R * L * C) in the forward and backward pass: sorting and unsorting are gathers by a
permutation whose gradient is the gather by the inverse permutation (`permute`), never a
scatter-add or an `[L, L]` matrix; each chunk's attention has a written-out backward pass
(`attend_chunks`).

Long sequences bound the working set further (`attention_groups` picks when): heads go in
groups, one after another (`n_parallel_heads`, as trax names it), and each group's sorted query
chunks in steps that gather their own chunks and neighbours (`query_chunk_groups`), both
rematerialized in the backward pass; only one step's logits then exist at a time, whatever the
heads and rounds. `lsh_self_attention` also runs the projections by groups of heads, so no
`[B, L, N, H]` activation of the layer exists whole.

Shapes: `[B, L, N, H]` in and out; see `common.py` for the axis legend.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reformer_jax.attention import common, cpu_kernel

Buckets = int | Sequence[int] | None

# Working-set sizes behind the automatic `n_parallel_heads` and `query_chunk_groups` of
# `lsh_attention` (see `attention_groups`), and the hashing block size of `hash_vectors`.
SINGLE_PASS_LOGITS_BYTES = 2 ** 30   # one pass over all heads and chunks up to 1 GiB of logits
HEAD_GROUP_BYTES = 2 ** 28           # beyond: heads per group, by their sorted outputs
QUERY_GROUP_LOGITS_BYTES = 2 ** 26   # and query chunks per step, by their logits
HASH_SINGLE_PASS_BYTES = 2 ** 30     # rotated vectors hashed at once up to 1 GiB
HASH_BLOCK_BYTES = 2 ** 26           # beyond, in blocks of positions of at most this
# `lsh_self_attention` projects a group of heads a chunk of positions at a time beyond this
# (float32 `[B, L, D]` input bytes), so the kernels' gradients (sums over positions) are too.
PROJECTION_CHUNK_BYTES = 2 ** 26


def _divisor_at_least(n: int, k: int) -> int:
  """The smallest divisor of `n` that is at least `k` (`n` itself when `k >= n`)."""
  return next(d for d in range(max(1, min(k, n)), n + 1) if n % d == 0)


def attention_groups(batch: int, length: int, heads: int, head_dim: int, n_hashes: int,
                     chunk_len: int, window: int,
                     n_parallel_heads: int | None = None) -> tuple[int, int]:
  """The automatic `(n_parallel_heads, query_chunk_groups)` of `lsh_attention`.

  While the float32 logits of all heads and rounds, `[B, N, R * L, window]`, take at most
  `SINGLE_PASS_LOGITS_BYTES`, everything is attended at once: `(heads, 1)`, the fastest. Beyond,
  heads go in groups whose sorted outputs `[B, n, R * L, H + 1]` take at most `HEAD_GROUP_BYTES`
  (one head at least), and each group's query chunks in steps whose logits take at most
  `QUERY_GROUP_LOGITS_BYTES`: the working set is then bounded whatever the length, heads and
  rounds.

  Args:
    window: keys each query sees, `(n_chunks_before + 1 + n_chunks_after) * chunk_len`.
    n_parallel_heads: given heads per group (then only the query chunk groups are chosen).
  """
  slots = n_hashes * length
  head_logits = 4 * batch * slots * window
  single = heads * head_logits <= SINGLE_PASS_LOGITS_BYTES
  parallel = n_parallel_heads
  if parallel is None:
    head_out = 4 * batch * slots * (head_dim + 1)
    parallel = heads if single else max(
        [d for d in range(1, heads + 1) if heads % d == 0 and d * head_out <= HEAD_GROUP_BYTES]
        or [1])
  if single and parallel == heads:
    return heads, 1
  return parallel, _divisor_at_least(slots // chunk_len,
                                     -(-parallel * head_logits // QUERY_GROUP_LOGITS_BYTES))


def default_n_buckets(length: int, chunk_len: int) -> int | tuple[int, int]:
  """The automatic bucket count: the power of two nearest `2 * length / chunk_len`, at least 2.

  With this many buckets an average bucket holds half a chunk, so a bucket split by a chunk
  boundary still meets its other half through the look-back. Hashing costs `L * n_buckets / 2`
  rotated coordinates, which would rival the attention itself (`L * 2 * chunk_len` logits) at
  long lengths, so above `chunk_len` buckets the count is factorized into two near-equal powers
  of two (Hugging Face factorizes above `2 * chunk_len`): the same number of buckets for `~sqrt`
  the hashing cost. (With the old `2 * chunk_len` threshold, 4K tokens in chunks of 64 hashed
  into 128 unfactorized buckets: the CPU timing curve of commit 35c47d3 shows LSH-1 and LSH-2
  1.49x and 1.33x slower per token there than at 1K; experiments/results/attention_timing_cpu.json
  now has no such bump.)
  """
  power = max(1, round(math.log2(max(2 * length / max(chunk_len, 1), 2))))
  if 2 ** power <= chunk_len:
    return 2 ** power
  return 2 ** (power // 2), 2 ** (power - power // 2)


def check_n_buckets(n_buckets: Buckets) -> tuple[int, ...]:
  """Returns the bucket factors of an even int or a list of even ints, or raises naming the fix."""
  factors = (n_buckets,) if isinstance(n_buckets, int) else tuple(n_buckets)
  if not factors or any(not isinstance(f, int) or f < 2 or f % 2 for f in factors):
    raise ValueError(
        f'n_buckets must be an even int >= 2 or a list of them (factorized hashing), got '
        f'{n_buckets!r}: each random rotation gives two buckets (xR and -xR), so round it to '
        f'an even number, or leave it unset for about 2 * length / chunk_len')
  return factors


def hash_vectors(x: jax.Array, rng: jax.Array, n_hashes: int, n_buckets: Buckets) -> jax.Array:
  """Random-rotation LSH buckets.

  Args:
    x: `[B, N, L, H]` vectors (shared query/keys, head-major).
    rng: key; head n uses rotations drawn from `fold_in(rng, n)`, so heads hash independently.
    n_hashes: R, independent hash rounds.
    n_buckets: an even int, or a list of even ints whose product is the bucket count.
  Returns:
    `[B, N, R, L]` int32 buckets in `[0, prod(n_buckets))`.
  """
  return _hash(x, rng, n_hashes, n_buckets, heads_first=True)


def _hash(x: jax.Array, rng: jax.Array, n_hashes: int, n_buckets: Buckets, *,
          heads_first: bool, first_head: jax.Array | int = 0) -> jax.Array:
  """`hash_vectors` of `[B, N, L, H]` (`heads_first`) or `[B, L, N, H]` vectors.

  The rotated vectors `[B, N, R, L, n_buckets / 2]` of a long sequence would outweigh the
  attention itself, so beyond `HASH_SINGLE_PASS_BYTES` they are made and reduced to buckets one
  block of positions (of at most `HASH_BLOCK_BYTES`) at a time, under `lax.map`.

  Args:
    first_head: index of the first head of `x` among all heads (its rotations are drawn from
      `fold_in(rng, first_head + n)`), when `x` holds a group of heads.
  """
  factors = check_n_buckets(n_buckets)
  x = jax.lax.stop_gradient(x)
  length_axis = 2 if heads_first else 1
  batch, head_dim = x.shape[0], x.shape[3]
  length, heads = x.shape[length_axis], x.shape[3 - length_axis]
  rot_cols = sum(f // 2 for f in factors)
  head_keys = jax.vmap(lambda n: jax.random.fold_in(rng, n))(first_head + jnp.arange(heads))
  rotations = jax.vmap(
      lambda key: jax.random.normal(key, (head_dim, n_hashes, rot_cols), jnp.float32))(head_keys)
  # Positions minor: every reduction over the rotations below is elementwise across rows.
  spec = 'bnlh,nhrk->bnrkl' if heads_first else 'blnh,nhrk->bnrkl'

  def hash_block(xb):  # a block of positions -> [B, N, R, l]
    rotated = jnp.einsum(spec, xb.astype(jnp.float32), rotations)  # [B, N, R, k, l]
    buckets = jnp.zeros(rotated.shape[:3] + rotated.shape[4:], jnp.int32)
    start, stride = 0, 1
    for f in factors:
      # argmax([p; -p]), its first maximum, without the concatenation or a variadic (value,
      # index) reduction (XLA:CPU runs those one element at a time): the top of [p; -p] is
      # max(p) if max(p) >= -min(p), else min(p) on the -p side; its index is the first i with
      # p_i equal to it.
      part = rotated[:, :, :, start:start + f // 2]
      hi, lo = jnp.max(part, axis=3), jnp.min(part, axis=3)
      plus = hi >= -lo
      top_value = jnp.where(plus, hi, lo)[:, :, :, None]
      index = jax.lax.broadcasted_iota(jnp.int32, part.shape, 3)
      top = jnp.min(jnp.where(part == top_value, index, f // 2), axis=3)
      buckets = buckets + stride * (top + jnp.where(plus, 0, f // 2))
      start, stride = start + f // 2, stride * f
    return buckets

  rotated_bytes = 4 * batch * heads * n_hashes * length * rot_cols
  if rotated_bytes <= HASH_SINGLE_PASS_BYTES:
    return hash_block(x)
  blocks = _divisor_at_least(length, -(-rotated_bytes // HASH_BLOCK_BYTES))
  size = length // blocks
  out = jax.lax.map(
      lambda i: hash_block(jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=length_axis)),
      jnp.arange(blocks))  # [blocks, B, N, R, size]
  return jnp.moveaxis(out, 0, 3).reshape(batch, heads, n_hashes, length)


@jax.custom_vjp
def permute(x: jax.Array, idx: jax.Array, inverse: jax.Array) -> jax.Array:
  """Gathers `x[..., idx[...], :]` along the second-to-last axis (or the last, for `idx.ndim == x.ndim`).

  `idx` must be a permutation along that axis and `inverse` its inverse: the gradient is then
  a gather by `inverse` rather than the scatter-add autodiff would emit.
  """
  return _gather(x, idx)


def take(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
  """`jnp.take_along_axis` for indices known to be in range (sorted slots, positions): no
  bounds checks, negative-index wrapping or fill-value selects in the gather (or in the loop
  fusions XLA builds around it)."""
  return jnp.take_along_axis(x, idx, axis=axis, mode='promise_in_bounds',
                             wrap_negative_indices=False)


def _gather(x, idx):
  if x.ndim == idx.ndim:
    return take(x, idx, axis=-1)
  return take(x, idx[..., None], axis=-2)


def _permute_fwd(x, idx, inverse):
  return _gather(x, idx), (idx, inverse)


def _permute_bwd(res, g):
  idx, inverse = res
  return _gather(g, inverse), None, None


permute.defvjp(_permute_fwd, _permute_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gather_rounds(x: jax.Array, pos: jax.Array, inverse: jax.Array, n_hashes: int) -> jax.Array:
  """Gathers `[B, N, L, F]` rows into sorted order over all rounds: `[B, N, R * L, F]`.

  `pos` are the original positions of the sorted slots and `inverse` the permutation that
  unsorts them. The gradient unsorts by a gather and sums the rounds, instead of the
  scatter-add autodiff would emit (and without tiling `x` R times first).
  """
  return take(x, pos[..., None], axis=-2)


def _gather_rounds_fwd(x, pos, inverse, n_hashes):
  return gather_rounds(x, pos, inverse, n_hashes), (pos, inverse)


def _gather_rounds_bwd(n_hashes, res, g):
  _, inverse = res
  return _unsort_rounds(g, inverse, n_hashes), None, None


def _unsort_rounds(g: jax.Array, inverse: jax.Array, n_hashes: int) -> jax.Array:
  """Sorted-order rows `[B, N, R * L, F]` back to `[B, N, L, F]`, the rounds summed."""
  g = _gather(g, inverse)  # [B, N, R * L, F] in (round, position) order
  return g.reshape(*g.shape[:2], n_hashes, -1, g.shape[-1]).sum(axis=2)


gather_rounds.defvjp(_gather_rounds_fwd, _gather_rounds_bwd)


def bucket_balance(buckets: jax.Array, n_buckets: Buckets) -> jax.Array:
  """Largest bucket over the mean bucket size, averaged over batch, heads and rounds.

  1.0 is perfectly balanced; a value near `n_buckets` means one bucket holds nearly everything,
  so chunks cut it and most of its pairs go unseen.

  Args:
    buckets: `[B, N, R, L]` ints from `hash_vectors`.
  Returns:
    a float32 scalar.
  """
  total = functools.reduce(lambda a, b: a * b, check_n_buckets(n_buckets))
  flat = buckets.reshape(-1, buckets.shape[-1]).astype(jnp.int32)  # int16 buckets may hold 32767
  counts = jax.vmap(lambda b: jnp.zeros(total, jnp.int32).at[b].add(1))(flat)
  return jnp.mean(jnp.max(counts, axis=-1) * total / buckets.shape[-1]).astype(jnp.float32)


def lsh_attention(qk: jax.Array, v: jax.Array, *, rng: jax.Array | None, n_hashes: int = 1,
                  n_buckets: Buckets = None, chunk_len: int = 64, causal: bool = False,
                  mask: jax.Array | None = None, n_chunks_before: int = 1,
                  n_chunks_after: int = 0, buckets: jax.Array | None = None,
                  return_buckets: bool = False, n_parallel_heads: int | None = None,
                  query_chunk_groups: int | None = None):
  """LSH self-attention with shared query/keys.

  Args:
    qk: `[B, L, N, H]` shared queries/keys (keys are these, unit-normalized; logits unscaled).
    v: `[B, L, N, H]` values.
    rng: key for the random rotations (ignored when `buckets` is given).
    n_hashes: R hash rounds; more rounds, fewer missed neighbours, proportionally more work.
    n_buckets: even int or list of even ints (factorized); None picks `default_n_buckets`.
    chunk_len: C; L must be a multiple of it (a chunk_len >= L is exact shared-QK attention).
    causal: a query at position i sees keys at original positions <= i.
    mask: `[B, L]` booleans, False at padding keys.
    n_chunks_before, n_chunks_after: neighbouring chunks (of the same round) each chunk sees.
    buckets: `[B, N, R, L]` buckets to reuse instead of hashing (the reversible backward pass
      replays the forward pass's buckets, since rebuilt activations may hash differently).
    return_buckets: also return the `[B, N, R, L]` int32 buckets.
    n_parallel_heads: heads sorted and attended together (trax's name); the groups of heads
      run one after another, and the backward pass redoes one group at a time. Must divide N.
    query_chunk_groups: each group of heads attends its `R * L / C` sorted query chunks in
      this many steps (a rematerialized `lax.map`), each gathering its chunks and their
      neighbours' keys; 1 attends all chunks at once. Must divide `R * L / C`.
      Both None: `attention_groups` picks them, one pass while that is small (the same
      function either way, up to float rounding; only the memory and speed differ).
  Returns:
    `[B, L, N, H]` in the dtype of `v`, and the buckets if `return_buckets`.

  Causality note: with causal=True no output before position j depends on the *values* at
  positions >= j. Future query/keys do move through the sort, so they can shift which earlier
  keys share a chunk with an earlier query; outputs before j can then change when the token at
  j changes. That is a property of LSH attention, not a leak of future values.
  """
  common.check_inputs(qk, v, mask, 'lsh_attention')
  batch, length, heads, head_dim = qk.shape
  chunk_len, before, after = common.resolve_chunking(length, chunk_len, n_chunks_before,
                                                     n_chunks_after, 'lsh_attention')
  if n_hashes < 1:
    raise ValueError(f'lsh_attention: n_hashes must be >= 1, got {n_hashes}')
  if n_buckets is None:
    n_buckets = default_n_buckets(length, chunk_len)
  factors = check_n_buckets(n_buckets)
  total_buckets = functools.reduce(lambda a, b: a * b, factors)
  n_chunks = n_hashes * length // chunk_len
  if n_parallel_heads is not None and (n_parallel_heads < 1 or heads % n_parallel_heads):
    raise ValueError(f'lsh_attention: n_parallel_heads {n_parallel_heads} does not divide the '
                     f'{heads} heads; pick a divisor of {heads} (or None for automatic)')
  parallel, groups = attention_groups(batch, length, heads, head_dim, n_hashes, chunk_len,
                                      (before + 1 + after) * chunk_len, n_parallel_heads)
  groups = query_chunk_groups or groups
  if groups < 1 or n_chunks % groups:
    raise ValueError(f'lsh_attention: query_chunk_groups {groups} does not divide the '
                     f'{n_chunks} sorted chunks (n_hashes * length / chunk_len); pick a divisor '
                     f'(or None for automatic)')

  # Head-major copies for one pass over all heads; groups of heads read them from qk and v.
  qk_t, v_t = ((qk.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if parallel == heads
               else (None, None))
  if buckets is None:
    if rng is None:
      raise ValueError('lsh_attention: pass rng= (a PRNG key for the random rotations) or buckets=')
    buckets = (_hash(qk, rng, n_hashes, n_buckets, heads_first=False) if qk_t is None
               else hash_vectors(qk_t, rng, n_hashes, n_buckets))
  elif buckets.shape != (batch, heads, n_hashes, length):
    raise ValueError(f'lsh_attention: buckets must be [B, N, R, L] = '
                     f'{(batch, heads, n_hashes, length)}, got {buckets.shape}')
  buckets = jax.lax.stop_gradient(buckets).astype(jnp.int32)

  attend = functools.partial(_attend_heads, total_buckets=total_buckets, chunk_len=chunk_len,
                             before=before, after=after, causal=causal, groups=groups)
  if parallel == heads:
    out = attend(qk_t, v_t, buckets, mask)
  else:
    out = _in_head_groups(attend, parallel, qk, v, buckets, mask)
  return (out, buckets) if return_buckets else out


def lsh_self_attention(x: jax.Array, w_qk: jax.Array, w_v: jax.Array, w_out: jax.Array, *,
                       rng: jax.Array | None, n_hashes: int = 1, n_buckets: Buckets = None,
                       chunk_len: int = 64, causal: bool = False, mask: jax.Array | None = None,
                       n_chunks_before: int = 1, n_chunks_after: int = 0,
                       buckets: jax.Array | None = None, n_parallel_heads: int,
                       query_chunk_groups: int | None = None, norm: dict | None = None,
                       dtype=None):
  """LSH self-attention with its projections, by groups of heads: `[B, L, D]` -> `[B, L, D]`.

  Computes `lsh_attention(h W_qk, h W_v) W_out` of `h = LayerNorm(x)` (or `x` without `norm`;
  the same function, up to float rounding), one group of `n_parallel_heads` heads after
  another: the group's queries/keys and values are projected from `h`, attended, projected
  back and added to the output. Only one group's `[B, L, n, H]` activations exist at a time, in
  the forward and in the backward pass (which redoes one group at a time), so none of the
  `[B, L, N, H]` queries, values, attention outputs or their gradients is ever made whole; nor
  is `h` or its gradient (normalized, and differentiated, a chunk of positions at a time):
  besides `x` and the output, the working set is one group's.

  Args:
    x: `[B, L, D]`.
    w_qk, w_v: `[D, N, H]` kernels of the shared query/key and value projections.
    w_out: `[N, H, D]` kernel of the output projection.
    n_parallel_heads: heads per group (dividing N).
    norm: `{'scale', 'bias'}` of a LayerNorm applied to `x` first (statistics in float32),
      or None.
    dtype: dtype of `h` and the projections (default `x.dtype`).
    Others: as `lsh_attention` (`buckets` replays given buckets; otherwise each group hashes
      its heads with the rotations `lsh_attention` would draw for them).
  Returns:
    `([B, L, D] output in `dtype`, [B, N, R, L] int32 buckets)`.
  """
  batch, length, _ = x.shape
  heads, head_dim = w_qk.shape[1], w_qk.shape[2]
  chunk_len, before, after = common.resolve_chunking(length, chunk_len, n_chunks_before,
                                                     n_chunks_after, 'lsh_self_attention')
  if heads % n_parallel_heads:
    raise ValueError(f'lsh_self_attention: n_parallel_heads {n_parallel_heads} does not divide '
                     f'the {heads} heads; pick a divisor of {heads}')
  if n_buckets is None:
    n_buckets = default_n_buckets(length, chunk_len)
  total_buckets = functools.reduce(lambda a, b: a * b, check_n_buckets(n_buckets))
  _, groups = attention_groups(batch, length, heads, head_dim, n_hashes, chunk_len,
                               (before + 1 + after) * chunk_len, n_parallel_heads)
  groups = query_chunk_groups or groups
  if buckets is None:
    if rng is None:
      raise ValueError('lsh_self_attention: pass rng= (a PRNG key for the random rotations) or '
                       'buckets=')
    hashing = tuple(n_buckets) if isinstance(n_buckets, (list, tuple)) else n_buckets
  else:
    hashing, rng = None, None
    buckets = jax.lax.stop_gradient(buckets).astype(jnp.int32)
  attend = functools.partial(_attend_heads, total_buckets=total_buckets, chunk_len=chunk_len,
                             before=before, after=after, causal=causal, groups=groups)
  return _projected_head_groups(attend, hashing, n_parallel_heads, n_hashes,
                                jnp.dtype(dtype or x.dtype), x, norm, w_qk, w_v, w_out, buckets,
                                rng, mask)


def _position_chunks(x: jax.Array) -> int:
  """Chunks of positions for `x [B, L, ...]`: each at most `PROJECTION_CHUNK_BYTES` in float32."""
  return _divisor_at_least(x.shape[1], -(-4 * x.size // PROJECTION_CHUNK_BYTES))


def _normalize(norm, x: jax.Array, dtype) -> jax.Array:
  """`x` (a chunk of positions), layer-normalized with `norm` unless it is None, in `dtype`."""
  return x.astype(dtype) if norm is None else common.layer_norm(norm, x, dtype)


def _over_positions(fn, x: jax.Array) -> jax.Array:
  """`fn(x)` for a per-position `fn` (not differentiated), a chunk of the length axis of
  `x [B, L, ...]` at a time, written into the result in place (no reshaped copy of `x`)."""
  n = _position_chunks(x)
  if n == 1:
    return fn(x)
  size = x.shape[1] // n
  out = jax.eval_shape(fn, jax.ShapeDtypeStruct((x.shape[0], size, *x.shape[2:]), x.dtype))
  total = common.zeros_after(x, (x.shape[0], x.shape[1], *out.shape[2:]), out.dtype)
  return _add_over_positions(total, fn, x, add=False)


def _add_over_positions(total: jax.Array, fn, x: jax.Array, add: bool = True) -> jax.Array:
  """`total + fn(x)` (or `fn(x)` into `total`'s buffer, `add=False`) for a per-position `fn`,
  written into `total [B, L, ...]` in place a chunk of positions of `x [B, L, ...]` at a time
  (`fn(x)` never exists whole)."""
  n = _position_chunks(x)
  size = x.shape[1] // n
  chunk = lambda a, c: jax.lax.dynamic_slice_in_dim(a, c * size, size, axis=1)

  def step(c, total):
    value = fn(chunk(x, c)).astype(total.dtype)
    return jax.lax.dynamic_update_slice_in_dim(total, chunk(total, c) + value if add else value,
                                               c * size, 1)
  return jax.lax.fori_loop(0, n, step, total)


def _group_qkv(x: jax.Array, norm, dtype, w_qk: jax.Array, w_v: jax.Array) -> jax.Array:
  """One group's projections of the normalized `x`, `[B, L, D]` -> `[B, n, L, 2H]` (query/keys,
  then values)."""
  w_in = jnp.concatenate([w_qk, w_v], axis=-1).astype(dtype)
  return _over_positions(lambda c: jnp.einsum('bld,dnk->blnk', _normalize(norm, c, dtype), w_in),
                         x).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _projected_head_groups(attend, hashing, parallel, n_hashes, dtype, x, norm, w_qk, w_v, w_out,
                           buckets, rng, mask):
  """`lsh_self_attention`'s loop over groups of heads, with its own backward loop (autodiff of
  the loop would add a full-size zero-padded gradient of each group's slice of the inputs).

  `hashing` is the bucket count to hash with (`buckets` None), or None to replay `buckets`.
  """
  return _projected_head_groups_fwd(attend, hashing, parallel, n_hashes, dtype, x, norm, w_qk,
                                    w_v, w_out, buckets, rng, mask)[0]


def _projected_head_groups_fwd(attend, hashing, parallel, n_hashes, dtype, x, norm, w_qk, w_v,
                               w_out, buckets, rng, mask):
  batch, length, width = x.shape
  heads = w_qk.shape[1]

  head_dim = w_qk.shape[-1]

  def step(g, carry):
    out, all_buckets = carry
    qkv = _group_qkv(x, norm, dtype, _heads(w_qk, g, parallel, 1), _heads(w_v, g, parallel, 1))
    qk, v = qkv[..., :head_dim], qkv[..., head_dim:]
    if hashing is None:
      group_buckets = _heads(all_buckets, g, parallel, 1)
    else:
      group_buckets = _hash(qk, rng, n_hashes, hashing, heads_first=True,
                            first_head=g * parallel)
      all_buckets = jax.lax.dynamic_update_slice_in_dim(all_buckets, group_buckets, g * parallel, 1)
    w_o = _heads(w_out, g, parallel, 0).astype(dtype)
    out = _add_over_positions(out, lambda c: jnp.einsum('blnh,nhd->bld', c, w_o),
                              attend(qk, v, group_buckets, mask))
    return out, all_buckets

  init_buckets = (common.zeros_after(x, (batch, heads, n_hashes, length), jnp.int32)
                  if buckets is None else buckets)
  out, buckets = jax.lax.fori_loop(0, heads // parallel, step,
                                   (common.zeros_after(x, (batch, length, width), dtype),
                                    init_buckets))
  return (out, buckets), (x, norm, w_qk, w_v, w_out, buckets, mask)


def _projected_head_groups_bwd(attend, hashing, parallel, n_hashes, dtype, residuals, cotangents):
  """One group of heads at a time: redo its projections and attention, pull the output's
  cotangent back through them, and add the group's share of the input gradient into it a chunk
  of positions at a time (through the LayerNorm, whose backward pass is linear in the
  cotangent, so the groups' shares add up). Written out (not `jax.vjp` of the group): the
  group's input gradient and the kernel gradients (sums over positions) then never exist as
  whole `[B, L, D]` arrays."""
  del hashing, n_hashes
  x, norm, w_qk, w_v, w_out, buckets, mask = residuals
  g_out, _ = cotangents  # buckets are integers: no cotangent
  acc = common.accumulation_dtype(dtype)
  length, head_dim = x.shape[1], w_qk.shape[-1]
  n_pos = _position_chunks(x)
  size = length // n_pos
  positions = lambda a, c: jax.lax.dynamic_slice_in_dim(a, c * size, size, axis=1)

  def group_step(g, grads):
    d_x, d_norm, d_qk, d_v, d_out = grads
    w_in = jnp.concatenate([_heads(w_qk, g, parallel, 1), _heads(w_v, g, parallel, 1)], -1)
    w_o = _heads(w_out, g, parallel, 0)  # [n, H, D]
    qkv = _group_qkv(x, norm, dtype, _heads(w_qk, g, parallel, 1), _heads(w_v, g, parallel, 1))
    out, attend_vjp = jax.vjp(lambda qk, v: attend(qk, v, _heads(buckets, g, parallel, 1), mask),
                              qkv[..., :head_dim], qkv[..., head_dim:])
    d_att = _over_positions(lambda c: jnp.einsum('bld,nhd->blnh', c, w_o.astype(c.dtype)), g_out)
    d_qkv = jnp.concatenate(attend_vjp(d_att.astype(out.dtype)), -1).transpose(0, 2, 1, 3)

    def position_step(c, sums):  # [B, l, ...] chunks of positions
      d_x, d_norm, d_in, d_o = sums
      d_c = positions(d_qkv, c)
      h, norm_vjp = jax.vjp(lambda x, norm: _normalize(norm, x, dtype), positions(x, c), norm)
      d_h = jnp.einsum('blnk,dnk->bld', d_c, w_in.astype(d_c.dtype), preferred_element_type=acc)
      d_xc, d_nc = norm_vjp(d_h.astype(h.dtype))
      d_x = jax.lax.dynamic_update_slice_in_dim(d_x, positions(d_x, c) + d_xc, c * size, 1)
      # Kernel gradients as products over the flattened `[B * l, ...]` positions: contracted
      # over `b` and `l` both, XLA:CPU transposes an operand in memory first (see
      # `layers.feed_forward`).
      flat = lambda a: a.reshape(-1, math.prod(a.shape[2:]))
      d_in = d_in + jnp.matmul(flat(h).T, flat(d_c),
                               preferred_element_type=acc).reshape(d_in.shape)
      d_o = d_o + jnp.matmul(flat(positions(out, c)).T, flat(positions(g_out, c)),
                             preferred_element_type=acc).reshape(d_o.shape)
      return d_x, jax.tree.map(jnp.add, d_norm, d_nc), d_in, d_o
    d_x, d_norm, d_in, d_o = jax.lax.fori_loop(
        0, n_pos, position_step, (d_x, d_norm, jnp.zeros(w_in.shape, acc),
                                  jnp.zeros(w_o.shape, acc)))
    put = lambda total, d, axis: jax.lax.dynamic_update_slice_in_dim(
        total, d.astype(total.dtype), g * parallel, axis)
    return (d_x, d_norm, put(d_qk, d_in[..., :head_dim], 1), put(d_v, d_in[..., head_dim:], 1),
            put(d_out, d_o, 0))

  zeros = lambda a: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), a)
  d_x, d_norm, d_qk, d_v, d_out = jax.lax.fori_loop(
      0, w_qk.shape[1] // parallel, group_step,
      (common.zeros_after(g_out, x.shape, x.dtype), zeros(norm), zeros(w_qk), zeros(w_v),
       zeros(w_out)))
  return d_x, d_norm, d_qk, d_v, d_out, None, None, None


_projected_head_groups.defvjp(_projected_head_groups_fwd, _projected_head_groups_bwd)


def _heads(x: jax.Array, group: jax.Array, parallel: int, axis: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, group * parallel, parallel, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _in_head_groups(attend, parallel, qk, v, buckets, mask):
  """`attend` over groups of `parallel` heads, one group after another.

  Group g reads its heads straight from the `[B, L, N, H]` inputs and writes its output into
  the `[B, L, N, H]` result, so no head-major copy of the whole inputs, output or gradients is
  made. The backward pass redoes one group at a time (forward and backward) and writes its
  gradients into the inputs' gradients in place: only the inputs are kept in between, and one
  group's working set exists at a time. (Written as a custom VJP: autodiff of the loop would
  add a zero-padded full-size copy of each group's gradient into the accumulated gradient.)

  Args:
    attend: `(qk_t [B, n, L, H], v_t [B, n, L, H], buckets [B, n, R, L], mask) -> [B, L, n, H]`.
  """
  return _in_head_groups_fwd(attend, parallel, qk, v, buckets, mask)[0]


def _in_head_groups_fwd(attend, parallel, qk, v, buckets, mask):
  def step(g, out):
    o = attend(_heads(qk, g, parallel, 2).transpose(0, 2, 1, 3),
               _heads(v, g, parallel, 2).transpose(0, 2, 1, 3), _heads(buckets, g, parallel, 1),
               mask)
    return jax.lax.dynamic_update_slice_in_dim(out, o, g * parallel, 2)
  out = jax.lax.fori_loop(0, qk.shape[2] // parallel, step, jnp.zeros(v.shape, v.dtype))
  return out, (qk, v, buckets, mask)


def _in_head_groups_bwd(attend, parallel, residuals, g_out):
  qk, v, buckets, mask = residuals

  def step(g, grads):
    def group(qk_g, v_g):
      return attend(qk_g.transpose(0, 2, 1, 3), v_g.transpose(0, 2, 1, 3),
                    _heads(buckets, g, parallel, 1), mask)
    _, vjp = jax.vjp(group, _heads(qk, g, parallel, 2), _heads(v, g, parallel, 2))
    return tuple(jax.lax.dynamic_update_slice_in_dim(acc, d, g * parallel, 2)
                 for acc, d in zip(grads, vjp(_heads(g_out, g, parallel, 2))))
  d_qk, d_v = jax.lax.fori_loop(0, qk.shape[2] // parallel, step,
                                (jnp.zeros(qk.shape, qk.dtype), jnp.zeros(v.shape, v.dtype)))
  return d_qk, d_v, None, None


_in_head_groups.defvjp(_in_head_groups_fwd, _in_head_groups_bwd)


def _sort_slots(buckets: jax.Array, mask: jax.Array | None, total_buckets: int):
  """One stable sort over all rounds: bucket ids offset by round, ties kept in position order.

  Padding sorts into an extra last bucket of its round, so what padding holds never moves real
  tokens between chunks. On CPU where `cpu_kernel` is built, a counting sort
  (`bucket_sort.cc`, linear in the length); elsewhere XLA's comparison sort.

  Args:
    buckets: `[B, N, R, L]` int32.
  Returns:
    `(sort_idx, undo_idx, pos)`, each `[B, N, S]` int32: the slot (round-major) each sorted
    position takes, its inverse permutation, and the original position of each sorted slot.
  """
  sort_buckets = buckets if mask is None else jnp.where(mask[:, None, None, :], buckets,
                                                         total_buckets)
  if cpu_kernel.available():
    # On CPU a counting sort (linear in L); elsewhere XLA's sort below.
    return jax.lax.platform_dependent(
        sort_buckets, cpu=lambda b: cpu_kernel.bucket_sort(b, total_buckets + 1),
        default=functools.partial(_xla_sort_slots, total_buckets=total_buckets))
  return _xla_sort_slots(sort_buckets, total_buckets=total_buckets)


def _xla_sort_slots(sort_buckets: jax.Array, *, total_buckets: int):
  """`_sort_slots` of buckets with padding already in bucket `total_buckets`, by XLA's sort."""
  batch, heads, n_hashes, length = sort_buckets.shape
  slots = n_hashes * length
  keyed = (sort_buckets + (total_buckets + 1) * jnp.arange(n_hashes, dtype=jnp.int32)[:, None])
  keyed = keyed.reshape(batch, heads, slots)
  if (total_buckets + 1) * slots <= np.iinfo(np.int32).max:
    # One int32 array holding (round-offset bucket, position), keys all distinct: XLA:CPU
    # sorts it much faster than the (key, slot) pair with its comparator.
    slot = jnp.arange(slots, dtype=jnp.uint32)
    position = slot % length
    packed = jax.lax.sort(keyed * length + position.astype(jnp.int32))
    # Each round's keys sort after the previous round's, so round r fills sorted slots
    # [r * length, (r + 1) * length): only the position needs unpacking, a remainder taken
    # unsigned (an AND for a power-of-two length). XLA fuses this unpacking into every gather by
    # the sorted order, once per gathered element, so it has to stay this cheap.
    pos = (packed.astype(jnp.uint32) % length).astype(jnp.int32)
    sort_idx = (slot - position).astype(jnp.int32) + pos
  else:  # too many buckets x slots for one int32: the stable pair sort
    ticker = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), keyed.shape)
    _, sort_idx = jax.lax.sort((keyed, ticker), num_keys=1)
    pos = sort_idx % length
  # The inverse permutation by a scatter (undo[sort_idx[s]] = s): linear, where a second sort
  # cost as much as the first.
  undo_idx = jax.vmap(lambda idx: jnp.zeros_like(idx).at[idx].set(
      jnp.arange(slots, dtype=idx.dtype), unique_indices=True, mode='promise_in_bounds'))(
          sort_idx.reshape(-1, slots)).reshape(sort_idx.shape)
  return sort_idx, undo_idx, pos


def _attend_heads(qk_t, v_t, buckets, mask, *, total_buckets, chunk_len, before, after, causal,
                  groups):
  """Sorts, attends within chunks, unsorts and mixes the rounds of some heads.

  Args:
    qk_t, v_t: `[B, n, L, H]` (head-major) shared query/keys and values.
    buckets: `[B, n, R, L]` int32.
  Returns:
    `[B, L, n, H]` in the dtype of `v_t`.
  """
  n_hashes = buckets.shape[2]
  sort_idx, undo_idx, pos = _sort_slots(buckets, mask, total_buckets)
  attend = _attend_sorted if groups == 1 else functools.partial(_attend_in_groups, groups=groups)
  packed = attend(qk_t, v_t, pos, undo_idx, mask=mask, n_hashes=n_hashes, chunk_len=chunk_len,
                  before=before, after=after, causal=causal)  # [B, n, S, H + 1] sorted order

  # Unsort output and logsumexp together (one gather), then mix rounds by their logsumexp.
  batch, heads, slots, width = packed.shape
  packed = permute(packed, undo_idx, sort_idx).reshape(batch, heads, n_hashes, slots // n_hashes,
                                                       width)
  out, lse = packed[..., :-1], packed[..., -1]
  weights = jax.nn.softmax(lse, axis=2)  # [B, n, R, L]
  # A weighted sum over rounds, as one elementwise pass (as an einsum, XLA:CPU lowered it to
  # a batched matrix-vector product).
  out = jnp.sum(out * weights[..., None], axis=2)  # [B, n, L, H]
  return out.transpose(0, 2, 1, 3).astype(v_t.dtype)


def _attend_sorted(qk_t, v_t, pos, undo_idx, *, mask, n_hashes, chunk_len, before, after, causal):
  """All chunks at once: gathers every round into sorted order, then attends each chunk.

  Returns:
    `[B, n, S, H + 1]`: each sorted slot's output and logsumexp.
  """
  batch, heads, length, _ = qk_t.shape
  slots = n_hashes * length
  n_chunks = slots // chunk_len
  def chunk(x):  # [B, n, S, ...] -> [B, n, G, C, ...]
    return x.reshape(batch, heads, n_chunks, chunk_len, *x.shape[3:])

  q_pos = chunk(pos)
  k_valid = common.neighbour_valid(n_chunks, length // chunk_len, chunk_len, before, after)
  if mask is not None:
    smask = take(jnp.broadcast_to(mask[:, None, :], (batch, heads, length)), pos, axis=-1)
    k_valid = k_valid & common.look_around(chunk(smask), before, after)
  if cpu_kernel.applies(qk_t, v_t, chunk_len, before, after):
    out, lse = attend_sorted_chunks(qk_t, v_t, q_pos, undo_idx, k_valid, before, after, causal)
  else:
    # Queries/keys and values into sorted order for every round (two gathers: one of the two
    # concatenated would cost a concatenation and two strided slices more).
    sqk = gather_rounds(qk_t, pos, undo_idx, n_hashes)
    sv = gather_rounds(v_t, pos, undo_idx, n_hashes)
    out, lse = attend_chunks(chunk(sqk), chunk(sv), q_pos, k_valid, before, after, causal)
  return jnp.concatenate([out, lse[..., None]], axis=-1).reshape(batch, heads, slots, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def attend_chunks(sqk: jax.Array, sv: jax.Array, q_pos: jax.Array, k_valid: jax.Array,
                  before: int, after: int, causal: bool) -> tuple[jax.Array, jax.Array]:
  """Shared-QK attention of each sorted chunk over itself and its neighbours.

  What `common.masked_attend` computes on `look_around` windows with unit-normalized keys, with
  its backward pass written out: the gradient of each window's keys and values is added back
  into the chunks it came from (a roll per neighbour), and the probabilities saved in the
  forward pass give every logit gradient in one elementwise pass. (Autodiff's version left
  XLA:CPU a chain of pads, selects and a transposed read that it fused into the unsorting
  gather and recomputed for every gathered row.)

  Args:
    sqk: `[B, n, G, C, H]` sorted shared query/keys, chunked.
    sv: `[B, n, G, C, H_v]` sorted values, chunked.
    q_pos: `[B, n, G, C]` int original positions of the sorted slots.
    k_valid: booleans broadcastable to `[B, n, G, K]`, `K = (before + 1 + after) * C`: False
      for window keys from a wrapped or other-round chunk, or padding.
  Returns:
    `out [B, n, G, C, H_v]` and `lse [B, n, G, C]` in `accumulation_dtype(sv.dtype)`.
  """
  return _attend_chunks_fwd(sqk, sv, q_pos, k_valid, before, after, causal)[0]


def _chunk_masks(q_pos, k_valid, before, after, causal):
  """`(is_self, allowed)`, `[B, n, G, C, K]` booleans: the query's own key, and keys it may see."""
  qp = q_pos[..., :, None]
  kp = common.look_around(q_pos, before, after)[..., None, :]
  allowed = k_valid[..., None, :]
  if causal:
    allowed = allowed & (kp <= qp)
  return qp == kp, allowed


def _attend_chunks_fwd(sqk, sv, q_pos, k_valid, before, after, causal):
  acc = common.accumulation_dtype(sv.dtype)
  keys = common.look_around(common.unit_normalize(sqk), before, after)
  logits = jnp.einsum('...qh,...kh->...qk', sqk, keys, preferred_element_type=acc)
  is_self, allowed = _chunk_masks(q_pos, k_valid, before, after, causal)
  logits = jnp.where(allowed, jnp.where(is_self, common.SELF_MASK_VALUE, logits),
                     common.MASK_VALUE)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - lse[..., None])
  out = jnp.einsum('...qk,...kh->...qh', probs.astype(sv.dtype),
                   common.look_around(sv, before, after), preferred_element_type=acc)
  return (out, lse), (sqk, sv, q_pos, k_valid, probs, out)


def _unlook_around(x: jax.Array, before: int, after: int) -> jax.Array:
  """The transpose of `common.look_around`: `[B, n, G, K, ...]` -> `[B, n, G, C, ...]`, each
  window slot's value added into the chunk it was read from."""
  parts = before + 1 + after
  if parts == 1:
    return x
  x = x.reshape(*x.shape[:3], parts, x.shape[3] // parts, *x.shape[4:])
  return sum(jnp.roll(x[:, :, :, j], j - before, axis=2) for j in range(parts))


def _attend_chunks_bwd(before, after, causal, residuals, cotangents):
  sqk, sv, q_pos, k_valid, probs, out = residuals
  d_out, d_lse = cotangents
  acc = probs.dtype
  x = sqk.astype(acc)
  inv_norm = jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
  unit = x * inv_norm  # what `common.unit_normalize` computes, in `acc`
  keys = common.look_around(unit.astype(sqk.dtype), before, after)
  d_out = d_out.astype(acc)
  d_probs = jnp.einsum('...qh,...kh->...qk', d_out, common.look_around(sv, before, after),
                       preferred_element_type=acc)
  # d logits = p * (dp - sum(dp * p) + d lse), zero where the logit is a mask constant.
  delta = jnp.sum(d_out * out, axis=-1, keepdims=True) - d_lse.astype(acc)[..., None]
  is_self, allowed = _chunk_masks(q_pos, k_valid, before, after, causal)
  d_logits = jnp.where(allowed & ~is_self, probs * (d_probs - delta), 0).astype(sqk.dtype)
  d_q = jnp.einsum('...qk,...kh->...qh', d_logits, keys, preferred_element_type=acc)
  d_keys = _unlook_around(jnp.einsum('...qk,...qh->...kh', d_logits, sqk,
                                     preferred_element_type=acc), before, after)
  d_v = _unlook_around(jnp.einsum('...qk,...qh->...kh', probs.astype(sv.dtype),
                                  d_out.astype(sv.dtype), preferred_element_type=acc),
                       before, after)
  # Through the unit normalization: d x = (d k - k <k, d k>) / |x|.
  d_x = inv_norm * (d_keys - unit * jnp.sum(unit * d_keys, axis=-1, keepdims=True))
  return (d_q + d_x).astype(sqk.dtype), d_v.astype(sv.dtype), None, None


attend_chunks.defvjp(_attend_chunks_fwd, _attend_chunks_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def attend_sorted_chunks(qk_t: jax.Array, v_t: jax.Array, q_pos: jax.Array, undo_idx: jax.Array,
                         k_valid: jax.Array, before: int, after: int,
                         causal: bool) -> tuple[jax.Array, jax.Array]:
  """`attend_chunks` of the sorted chunks of `qk_t` and `v_t`, gathered as they are read.

  Sorted slot `(g, i)` of a row holds input row `q_pos[..., g, i]`: the same function as
  `attend_chunks(chunk(gather_rounds(qk_t, ...)), chunk(gather_rounds(v_t, ...)), ...)`. On
  CPU the chunk kernel (`cpu_kernel`, built where `cpu_kernel.applies`) reads each chunk's rows
  straight from the unsorted inputs, so their sorted copies are never written out (nor kept for
  the backward pass), and the forward pass outside differentiation keeps no probabilities; on
  other backends XLA gathers the sorted copies and runs `attend_chunks`'s step. The gradient
  is unsorted back to the input rows and summed over rounds, as `gather_rounds`'s is.

  Args:
    qk_t, v_t: `[B, n, L, H]` and `[B, n, L, H_v]` unsorted query/keys and values.
    q_pos: `[B, n, G, C]` int32, the sorted slots' positions (rounds after one another).
    undo_idx: `[B, n, R * L]` int32, the permutation that unsorts the slots.
    k_valid: as `attend_chunks`.
  Returns:
    `out [B, n, G, C, H_v]` and `lse [B, n, G, C]`, float32, in sorted order.
  """
  del undo_idx

  def kernel(qk_t, v_t, q_pos, k_valid):
    return tuple(cpu_kernel.forward(qk_t, v_t, q_pos, k_valid, before, after, causal,
                                    save_probs=False)[:2])

  def xla(qk_t, v_t, q_pos, k_valid):
    return _attend_chunks_fwd(*_sorted_chunks(qk_t, v_t, q_pos), q_pos, k_valid, before, after,
                              causal)[0]
  return jax.lax.platform_dependent(qk_t, v_t, q_pos, k_valid, cpu=kernel, default=xla)


def _sorted_chunks(qk_t: jax.Array, v_t: jax.Array, q_pos: jax.Array):
  """`[B, n, L, F]` query/key and value rows gathered into sorted chunks `[B, n, G, C, F]` by
  `q_pos [B, n, G, C]` (what the XLA version of `attend_sorted_chunks` attends)."""
  idx = q_pos.reshape(*q_pos.shape[:2], -1, 1)
  return tuple(take(x, idx, axis=-2).reshape(*q_pos.shape, x.shape[-1]) for x in (qk_t, v_t))


def _attend_sorted_chunks_fwd(qk_t, v_t, q_pos, undo_idx, k_valid, before, after, causal):
  def kernel(qk_t, v_t, q_pos, k_valid):
    out, lse, probs = cpu_kernel.forward(qk_t, v_t, q_pos, k_valid, before, after, causal)
    return (out, lse), probs

  def xla(qk_t, v_t, q_pos, k_valid):
    (out, lse), residuals = _attend_chunks_fwd(*_sorted_chunks(qk_t, v_t, q_pos), q_pos,
                                               k_valid, before, after, causal)
    return (out, lse), residuals[4]
  (out, lse), probs = jax.lax.platform_dependent(qk_t, v_t, q_pos, k_valid, cpu=kernel,
                                                 default=xla)
  return (out, lse), (qk_t, v_t, q_pos, undo_idx, k_valid, probs, out)


def _attend_sorted_chunks_bwd(before, after, causal, residuals, cotangents):
  qk_t, v_t, q_pos, undo_idx, k_valid, probs, out = residuals

  def kernel(qk_t, v_t, q_pos, k_valid, probs, out, cotangents):
    return cpu_kernel.backward(qk_t, v_t, q_pos, k_valid, probs, out, *cotangents, before,
                               after, causal)

  def xla(qk_t, v_t, q_pos, k_valid, probs, out, cotangents):
    residuals = (*_sorted_chunks(qk_t, v_t, q_pos), q_pos, k_valid, probs, out)
    return _attend_chunks_bwd(before, after, causal, residuals, cotangents)[:2]
  d_sqk, d_sv = jax.lax.platform_dependent(qk_t, v_t, q_pos, k_valid, probs, out, cotangents,
                                           cpu=kernel, default=xla)
  n_hashes = undo_idx.shape[-1] // qk_t.shape[2]

  def unsort(d, x):  # [B, n, G, C, F] sorted -> [B, n, L, F], rounds summed
    return _unsort_rounds(d.reshape(*undo_idx.shape, -1), undo_idx, n_hashes).astype(x.dtype)
  return unsort(d_sqk, qk_t), unsort(d_sv, v_t), None, None, None


attend_sorted_chunks.defvjp(_attend_sorted_chunks_fwd, _attend_sorted_chunks_bwd)


def _attend_in_groups(qk_t, v_t, pos, undo_idx, *, mask, n_hashes, chunk_len, before, after,
                      causal, groups):
  """The chunks in `groups` steps: the same as `_attend_sorted`, with a bounded working set.

  Step g gathers the query/keys and values of its `G / groups` chunks and their neighbours
  straight from the unsorted inputs (by the sorted slots' positions) and attends them, under a
  rematerialized `lax.map`: one step's logits exist at a time, in the forward and the backward
  pass, and the sorted copies of the inputs never exist whole. Their gradient is scattered
  back into the inputs step by step.

  Returns:
    `[B, n, S, H + 1]`: each sorted slot's output and logsumexp.
  """
  del undo_idx
  batch, heads, length, head_dim = qk_t.shape
  slots = n_hashes * length
  n_chunks = slots // chunk_len
  per_step = n_chunks // groups
  span = before + per_step + after
  qkv = jnp.concatenate([qk_t, v_t.astype(qk_t.dtype)], axis=-1)  # [B, n, L, H + H_v]
  # Chunk ids of each step's window: its chunks and their neighbours, wrapping around the ends
  # like `look_around` (`neighbour_valid` masks what wrapped or lies in another round).
  window = (np.arange(groups)[:, None] * per_step
            + np.arange(-before, per_step + after)[None, :]) % n_chunks  # [groups, span]
  window_pos = pos.reshape(batch, heads, n_chunks, chunk_len)[:, :, window]
  window_pos = jnp.moveaxis(window_pos, 2, 0)  # [groups, B, n, span, C]

  def around(x):  # [B, n, span, C, ...] -> [B, n, per_step, K, ...], as `look_around`
    return jnp.concatenate([x[:, :, t:t + per_step] for t in range(before + 1 + after)], axis=3)

  def step(args):
    g, w_pos = args
    flat = w_pos.reshape(batch, heads, span * chunk_len)
    kv = take(qkv, flat[..., None], axis=2).reshape(batch, heads, span, chunk_len, -1)
    wqk, wv = kv[..., :head_dim], kv[..., head_dim:].astype(v_t.dtype)
    k_valid = common.neighbour_valid(n_chunks, length // chunk_len, chunk_len, before, after,
                                     chunks=g * per_step + jnp.arange(per_step))
    if mask is not None:
      smask = take(jnp.broadcast_to(mask[:, None, :], (batch, heads, length)), flat, axis=-1)
      k_valid = k_valid & around(smask.reshape(w_pos.shape))
    out, lse = common.masked_attend(
        wqk[:, :, before:before + per_step], around(common.unit_normalize(wqk)), around(wv),
        q_pos=w_pos[:, :, before:before + per_step], k_pos=around(w_pos),
        k_valid=k_valid[..., None, :], causal=causal, shared_qk=True, scale=1.0)
    return jnp.concatenate([out, lse[..., None]], axis=-1).reshape(batch, heads,
                                                                    per_step * chunk_len, -1)

  packed = jax.lax.map(jax.checkpoint(step, prevent_cse=False), (jnp.arange(groups), window_pos))
  return jnp.moveaxis(packed, 0, 2).reshape(batch, heads, slots, -1)
