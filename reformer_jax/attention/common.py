"""Pieces shared by the attention kernels: masks, chunking and the masked softmax.

Axis legend used across `reformer_jax.attention`:
  B batch, L length, N heads, H head dim, R hash rounds, S = R * L sorted slots,
  G chunks (groups), C chunk length, K keys a query may see (C times the chunks in its window).

Every kernel takes and returns `[B, L, N, H]` arrays, the layout of
`jax.nn.dot_product_attention`. Logits, the softmax and the logsumexp are computed in float32
for float32, bfloat16 and float16 inputs (float64 inputs stay float64, for gradient checks);
the output is cast back to the dtype of `v`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit given to a key a query must not see (causal, padding, another hash round, out of range).
# Finite, so a fully masked row gives a uniform average instead of NaN, and representable in
# bfloat16 (same exponent range as float32).
MASK_VALUE = -1e9
# Logit of a query's own key under shared query/key attention. It sits above MASK_VALUE, so a
# token with no other key it may see attends to itself, and far below any real logit
# (|q . k_hat| <= |q|), so it never wins while another key is allowed.
SELF_MASK_VALUE = -5e4


def unit_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Scales the last axis to unit length (computed in float32, returned in `x.dtype`)."""
  xf = x.astype(accumulation_dtype(x.dtype))
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def layer_norm(params: dict, x: jax.Array, dtype, epsilon: float = 1e-6) -> jax.Array:
  """Layer normalization of the last axis, statistics in float32: what `LayerNorm` computes.

  Args:
    params: {'scale': [D], 'bias': [D]}.
    x: `[..., D]`.
  Returns:
    `[..., D]` in `dtype`.
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  centered = xf - mean
  var = jnp.mean(centered * centered, axis=-1, keepdims=True)
  y = centered * jax.lax.rsqrt(var + epsilon) * params['scale'] + params['bias']
  return y.astype(dtype)


def zeros_after(x: jax.Array, shape=None, dtype=None) -> jax.Array:
  """Zeros of `shape` and `dtype` (default: those of `x`) that XLA computes only once `x` exists.

  For big accumulators (an output or gradient summed over groups or chunks): XLA:CPU's default
  scheduler places a constant broadcast as early as it can, so a plain `jnp.zeros` buffer would
  be allocated at the start of its computation and stay live through everything before its
  loop (the previous layer's work, the whole forward pass). Computed from an element of `x`
  (finite or not, the result is 0), the buffer is made after `x` is.
  """
  s = jax.lax.stop_gradient(x).reshape(-1)[0]
  zero = jnp.where(jnp.isfinite(s), s * 0, 0).astype(dtype or x.dtype)
  return jnp.broadcast_to(zero, x.shape if shape is None else shape)


def accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for float32 and narrower inputs (bfloat16, float16); float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


def check_inputs(q: jax.Array, v: jax.Array, mask: jax.Array | None, name: str) -> None:
  """Validates `[B, L, N, H]` shapes and a `[B, L]` padding mask, with errors that say what to pass."""
  if q.ndim != 4 or v.ndim != 4:
    raise ValueError(
        f'{name}: expected [batch, length, heads, head_dim] arrays, got query {q.shape} and '
        f'values {v.shape}; add the missing axes (e.g. x[:, :, None, :] for one head)')
  if q.shape[:3] != v.shape[:3] and name != 'full_attention':
    raise ValueError(f'{name}: query {q.shape} and values {v.shape} differ in batch, length or heads')
  if mask is not None and (mask.ndim != 2 or mask.shape != (v.shape[0], v.shape[1])):
    raise ValueError(
        f'{name}: mask must be [batch, length] = {(v.shape[0], v.shape[1])} booleans '
        f'(True = real token), got {mask.shape}')


def resolve_chunking(length: int, chunk_len: int, n_chunks_before: int, n_chunks_after: int,
                     name: str) -> tuple[int, int, int]:
  """Returns the effective (chunk_len, n_chunks_before, n_chunks_after) for `length`.

  A chunk at least as long as the sequence means one chunk that sees everything, so it has no
  neighbours. Otherwise the length must be a multiple of the chunk length.
  """
  if chunk_len < 1:
    raise ValueError(f'{name}: chunk_len must be a positive int, got {chunk_len}')
  if n_chunks_before < 0 or n_chunks_after < 0:
    raise ValueError(f'{name}: n_chunks_before and n_chunks_after must be >= 0, got '
                     f'{n_chunks_before} and {n_chunks_after}')
  if chunk_len >= length:
    return length, 0, 0
  if length % chunk_len:
    padded = -(-length // chunk_len) * chunk_len
    raise ValueError(
        f'{name}: sequence length {length} is not a multiple of chunk_len {chunk_len}: pad the '
        f'input to {padded} (and pass mask=) or choose a chunk_len that divides {length}')
  return chunk_len, n_chunks_before, n_chunks_after


def look_around(x: jax.Array, before: int, after: int) -> jax.Array:
  """Concatenates each chunk with its neighbours along the within-chunk axis.

  Args:
    x: `[B, N, G, C, ...]` chunked array.
  Returns:
    `[B, N, G, (before + 1 + after) * C, ...]`; chunk g holds chunks g - before ... g + after,
    wrapping around at the ends (`neighbour_valid` masks what wrapped or left its round).
  """
  if before == 0 and after == 0:
    return x
  parts = [jnp.roll(x, -offset, axis=2) for offset in range(-before, after + 1)]
  return jnp.concatenate(parts, axis=3)


def neighbour_valid(n_chunks: int, chunks_per_round: int, chunk_len: int, before: int,
                    after: int, chunks: jax.Array | None = None) -> jax.Array:
  """`[G, K]` booleans: True where a key slot of `look_around` comes from a real neighbour.

  A neighbour is real when it did not wrap around the ends and lies in the same hash round as
  the query's chunk (chunks of another round hold other rounds' copies of the keys).

  Args:
    chunks: `[G]` ids of the query chunks to give rows for (a slice of the sequence's chunks);
      None: all `n_chunks` of them.
  """
  g = (jnp.arange(n_chunks) if chunks is None else chunks)[:, None]
  src = g + jnp.arange(-before, after + 1)[None, :]
  ok = (src >= 0) & (src < n_chunks) & (src // chunks_per_round == g // chunks_per_round)
  return jnp.repeat(ok, chunk_len, axis=1)


def masked_attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array,
                  k_pos: jax.Array, k_valid: jax.Array | None, causal: bool, shared_qk: bool,
                  scale: float) -> tuple[jax.Array, jax.Array]:
  """Softmax attention of queries over their key window, with all masks applied.

  Args:
    q: `[..., Q, H]` queries.
    k, v: `[..., K, H]` keys and values.
    q_pos, k_pos: `[..., Q]` and `[..., K]` original positions (for causal and self masks).
    k_valid: booleans broadcastable to `[..., Q, K]` (or to `[..., K]` after adding a query
      axis by the caller); False keys get `MASK_VALUE`.
    causal: mask keys after the query.
    shared_qk: give the query's own key `SELF_MASK_VALUE` (shared query/key attention).
    scale: multiplies the logits.
  Returns:
    `out [..., Q, H]` and `lse [..., Q]`, the logsumexp of the masked logits, both in
    `accumulation_dtype(v.dtype)` (float32 unless the inputs are float64).
  """
  acc = accumulation_dtype(v.dtype)
  logits = jnp.einsum('...qh,...kh->...qk', q, k, preferred_element_type=acc)
  if scale != 1.0:
    logits = logits * scale
  qp = q_pos[..., :, None]
  kp = k_pos[..., None, :]
  if shared_qk:
    logits = jnp.where(qp == kp, SELF_MASK_VALUE, logits)
  allowed = k_valid
  if causal:
    allowed = (kp <= qp) if allowed is None else allowed & (kp <= qp)
  if allowed is not None:
    logits = jnp.where(allowed, logits, MASK_VALUE)
  lse = jax.nn.logsumexp(logits, axis=-1)
  probs = jnp.exp(logits - lse[..., None])
  out = jnp.einsum('...qk,...kh->...qh', probs.astype(v.dtype), v, preferred_element_type=acc)
  return out, lse
