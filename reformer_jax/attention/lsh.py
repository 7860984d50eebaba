"""LSH attention (Kitaev et al. 2020, section 3): hash, sort, attend within chunks, unsort.

1. Hash: shared query/keys are rotated by a random matrix and each round's bucket is
   `argmax([xR; -xR])` (a factorized list of bucket counts hashes each factor separately).
2. Sort: one stable sort over all rounds by (round, bucket, position).
3. Attend: the sorted sequence is cut into chunks of `chunk_len`; each chunk sees itself and
   `n_chunks_before` / `n_chunks_after` neighbours of the same round. Keys are the unit-normalized
   queries; causal, padding and self masks apply on original positions.
4. Unsort and combine: every round gives each query an output and the logsumexp of its logits;
   the rounds are mixed by a softmax over those logsumexps.

Memory is O(R * L * C) in the forward and backward pass: sorting and unsorting are gathers by a
permutation whose gradient is the gather by the inverse permutation (`permute`), never a
scatter or an `[L, L]` matrix.

Shapes: `[B, L, N, H]` in and out; see `common.py` for the axis legend.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from reformer_jax.attention import common

Buckets = int | Sequence[int] | None


def default_n_buckets(length: int, chunk_len: int) -> int | tuple[int, int]:
  """The automatic bucket count: the power of two nearest `2 * length / chunk_len`, at least 2.

  With this many buckets an average bucket holds half a chunk, so a bucket split by a chunk
  boundary still meets its other half through the look-back. Hashing costs `L * n_buckets / 2`
  rotated coordinates, which would outgrow the attention itself (`L * 2 * chunk_len` logits)
  at long lengths, so above `2 * chunk_len` buckets the count is factorized into two near-equal
  powers of two (as Hugging Face does): the same number of buckets for `~sqrt` the hashing cost.
  """
  power = max(1, round(math.log2(max(2 * length / max(chunk_len, 1), 2))))
  if 2 ** power <= 2 * chunk_len:
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
  factors = check_n_buckets(n_buckets)
  heads, head_dim = x.shape[1], x.shape[3]
  rot_cols = sum(f // 2 for f in factors)
  head_keys = jax.vmap(lambda n: jax.random.fold_in(rng, n))(jnp.arange(heads))
  rotations = jax.vmap(
      lambda key: jax.random.normal(key, (head_dim, n_hashes, rot_cols), jnp.float32))(head_keys)
  rotated = jnp.einsum('bnlh,nhrk->bnrlk', x.astype(jnp.float32), rotations)
  buckets = jnp.zeros(rotated.shape[:-1], jnp.int32)
  start, stride = 0, 1
  for f in factors:
    part = rotated[..., start:start + f // 2]
    buckets = buckets + stride * jnp.argmax(jnp.concatenate([part, -part], -1), -1).astype(jnp.int32)
    start, stride = start + f // 2, stride * f
  return buckets


@jax.custom_vjp
def permute(x: jax.Array, idx: jax.Array, inverse: jax.Array) -> jax.Array:
  """Gathers `x[..., idx[...], :]` along the second-to-last axis (or the last, for `idx.ndim == x.ndim`).

  `idx` must be a permutation along that axis and `inverse` its inverse: the gradient is then
  a gather by `inverse` rather than the scatter-add autodiff would emit.
  """
  return _gather(x, idx)


def _gather(x, idx):
  if x.ndim == idx.ndim:
    return jnp.take_along_axis(x, idx, axis=-1)
  return jnp.take_along_axis(x, idx[..., None], axis=-2)


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
  return jnp.take_along_axis(x, pos[..., None], axis=-2)


def _gather_rounds_fwd(x, pos, inverse, n_hashes):
  return gather_rounds(x, pos, inverse, n_hashes), (pos, inverse)


def _gather_rounds_bwd(n_hashes, res, g):
  pos, inverse = res
  g = _gather(g, inverse)  # [B, N, R * L, F] in (round, position) order
  g = g.reshape(*g.shape[:2], n_hashes, -1, g.shape[-1]).sum(axis=2)
  return g, None, None


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
  flat = buckets.reshape(-1, buckets.shape[-1])
  counts = jax.vmap(lambda b: jnp.zeros(total, jnp.int32).at[b].add(1))(flat)
  return jnp.mean(jnp.max(counts, axis=-1) * total / buckets.shape[-1]).astype(jnp.float32)


def lsh_attention(qk: jax.Array, v: jax.Array, *, rng: jax.Array | None, n_hashes: int = 1,
                  n_buckets: Buckets = None, chunk_len: int = 64, causal: bool = False,
                  mask: jax.Array | None = None, n_chunks_before: int = 1,
                  n_chunks_after: int = 0, buckets: jax.Array | None = None,
                  return_buckets: bool = False):
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

  qk_t = qk.transpose(0, 2, 1, 3)  # [B, N, L, H]
  v_t = v.transpose(0, 2, 1, 3)
  if buckets is None:
    if rng is None:
      raise ValueError('lsh_attention: pass rng= (a PRNG key for the random rotations) or buckets=')
    buckets = hash_vectors(qk_t, rng, n_hashes, n_buckets)
  elif buckets.shape != (batch, heads, n_hashes, length):
    raise ValueError(f'lsh_attention: buckets must be [B, N, R, L] = '
                     f'{(batch, heads, n_hashes, length)}, got {buckets.shape}')
  buckets = jax.lax.stop_gradient(buckets).astype(jnp.int32)

  # One stable sort over all rounds: bucket ids offset by round, ties kept in position order.
  # Padding sorts into an extra last bucket of its round, so what padding holds never moves
  # real tokens between chunks.
  slots = n_hashes * length
  sort_buckets = buckets if mask is None else jnp.where(mask[:, None, None, :], buckets,
                                                         total_buckets)
  keyed = (sort_buckets + (total_buckets + 1) * jnp.arange(n_hashes, dtype=jnp.int32)[:, None])
  keyed = keyed.reshape(batch, heads, slots)
  ticker = jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), keyed.shape)
  _, sort_idx = jax.lax.sort((keyed, ticker), num_keys=1)
  _, undo_idx = jax.lax.sort((sort_idx, ticker), num_keys=1)
  pos = sort_idx % length  # [B, N, S] original position of each sorted slot

  # One gather brings queries/keys and values into sorted order for every round.
  sorted_qkv = gather_rounds(jnp.concatenate([qk_t, v_t.astype(qk_t.dtype)], axis=-1), pos,
                             undo_idx, n_hashes)
  sqk, sv = sorted_qkv[..., :head_dim], sorted_qkv[..., head_dim:].astype(v.dtype)

  n_chunks = slots // chunk_len
  def chunk(x):  # [B, N, S, ...] -> [B, N, G, C, ...]
    return x.reshape(batch, heads, n_chunks, chunk_len, *x.shape[3:])

  q_pos = chunk(pos)
  k_valid = common.neighbour_valid(n_chunks, length // chunk_len, chunk_len, before, after)
  if mask is not None:
    smask = jnp.take_along_axis(jnp.broadcast_to(mask[:, None, :], (batch, heads, length)),
                                pos, axis=-1)
    k_valid = k_valid & common.look_around(chunk(smask), before, after)
  out, lse = common.masked_attend(
      chunk(sqk), common.look_around(chunk(common.unit_normalize(sqk)), before, after),
      common.look_around(chunk(sv), before, after), q_pos=q_pos,
      k_pos=common.look_around(q_pos, before, after), k_valid=k_valid[..., None, :],
      causal=causal, shared_qk=True, scale=1.0)

  # Unsort output and logsumexp together (one gather), then mix rounds by their logsumexp.
  packed = jnp.concatenate([out, lse[..., None]], axis=-1).reshape(batch, heads, slots, head_dim + 1)
  packed = permute(packed, undo_idx, sort_idx).reshape(batch, heads, n_hashes, length, head_dim + 1)
  out, lse = packed[..., :head_dim], packed[..., head_dim]
  weights = jax.nn.softmax(lse, axis=2)  # [B, N, R, L]
  out = jnp.einsum('bnrlh,bnrl->blnh', out, weights).astype(v.dtype)
  return (out, buckets) if return_buckets else out
