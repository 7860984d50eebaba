"""Local attention: the sequence is cut into fixed chunks that see themselves and their neighbours.

O(L * C) memory. Arrays are `[B, L, N, H]`; see `common.py` for the axis legend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reformer_jax.attention import common


def local_attention(q: jax.Array, k: jax.Array | None, v: jax.Array, *, chunk_len: int,
                    causal: bool = False, mask: jax.Array | None = None,
                    n_chunks_before: int = 1, n_chunks_after: int = 0) -> jax.Array:
  """Chunked attention: queries of chunk g see keys of chunks g - before ... g + after.

  Args:
    q: `[B, L, N, H]` queries.
    k: `[B, L, N, H]` keys, or None for shared query/key attention (see `full_attention`).
    v: `[B, L, N, H]` values.
    chunk_len: tokens per chunk; L must be a multiple (a chunk_len >= L is full attention).
    causal: a query at position i sees keys at positions <= i.
    mask: `[B, L]` booleans, False at padding.
    n_chunks_before, n_chunks_after: neighbours each chunk sees; chunks past either end of the
      sequence are masked, never wrapped around.
  Returns:
    `[B, L, N, H]` in the dtype of `v`.
  """
  shared_qk = k is None
  common.check_inputs(q, v, mask, 'local_attention')
  if shared_qk:
    k = common.unit_normalize(q)
  batch, length, heads, head_dim = q.shape
  chunk_len, before, after = common.resolve_chunking(length, chunk_len, n_chunks_before,
                                                     n_chunks_after, 'local_attention')
  n_chunks = length // chunk_len

  def chunk(x):  # [B, L, N, H] -> [B, N, G, C, H]
    return x.transpose(0, 2, 1, 3).reshape(batch, heads, n_chunks, chunk_len, head_dim)

  pos = jnp.arange(length).reshape(n_chunks, chunk_len)
  k_valid = common.neighbour_valid(n_chunks, n_chunks, chunk_len, before, after)  # [G, K]
  if mask is not None:
    mask_chunks = jnp.broadcast_to(mask.reshape(batch, 1, n_chunks, chunk_len),
                                   (batch, 1, n_chunks, chunk_len))
    k_valid = k_valid & common.look_around(mask_chunks, before, after)
  out, _ = common.masked_attend(
      chunk(q), common.look_around(chunk(k), before, after),
      common.look_around(chunk(v), before, after),
      q_pos=pos, k_pos=common.look_around(pos[None, None], before, after)[0, 0],
      k_valid=k_valid[..., None, :], causal=causal, shared_qk=shared_qk,
      scale=1.0 if shared_qk else head_dim ** -0.5)
  out = out.reshape(batch, heads, length, head_dim).transpose(0, 2, 1, 3)
  return out.astype(v.dtype)
