"""Flax layers of a Reformer: attention (picks a kernel), chunked feed-forward, axial positions.

Axis legend: B batch, L length (T targets, S sources), D model width, F feed-forward width,
N heads, H head dim.

Blocks share one call signature so the reversible stack can treat them alike:

    block(x, *, context, mask, context_mask, key, buckets, train) -> (delta, buckets)

`delta` is the residual branch (pre-norm, dropout applied); `buckets` is the LSH layer's replay
data (None for other layers). Randomness comes only from `key`: `fold_in(key, 0)` draws hash
rotations, `fold_in(key, 1)` dropout masks.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from reformer_jax.attention import default_n_buckets, full_attention, local_attention, lsh_attention
from reformer_jax.model_config import ModelConfig

HASH, DROPOUT = 0, 1  # fold_in tags of a block's key


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout with an explicit key; identity when `key` is None or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _dropout_key(key, train):
  return jax.random.fold_in(key, DROPOUT) if train and key is not None else None


class LayerNorm(nn.Module):
  """Layer normalization over the last axis, statistics in float32.

  Written out rather than `nn.LayerNorm`: inside the reversible backward pass, XLA kept one
  extra `[B, L, D]` buffer per block with Flax's version (compiled memory grew with depth),
  and none with this one (tests/test_memory.py checks the flat profile).
  """
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (dim,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (dim,), self.param_dtype)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    y = centered * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


def _layer_norm(cfg: ModelConfig, name: str) -> LayerNorm:
  return LayerNorm(dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype, name=name)


class SelfAttention(nn.Module):
  """Projects `[B, L, D]` into heads, runs the `full | lsh | local` kernel, projects back."""
  cfg: ModelConfig
  attention_type: str
  causal: bool

  @nn.compact
  def __call__(self, x, *, mask=None, key=None, buckets=None):
    cfg = self.cfg
    dense = functools.partial(nn.DenseGeneral, features=(cfg.n_heads, cfg.head_dim_),
                              use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.parameter_dtype)
    shared = self.attention_type == 'lsh' or cfg.shared_qk
    q = dense(name='qk' if shared else 'query')(x)  # [B, L, N, H]
    k = None if shared else dense(name='key')(x)
    v = dense(name='value')(x)
    chunking = dict(chunk_len=cfg.chunk_len, n_chunks_before=cfg.n_chunks_before,
                    n_chunks_after=0 if self.causal else cfg.n_chunks_after)
    if self.attention_type == 'lsh':
      hash_key = None if key is None else jax.random.fold_in(key, HASH)
      n_buckets = cfg.n_buckets or default_n_buckets(x.shape[1], min(cfg.chunk_len, x.shape[1]))
      out, buckets = lsh_attention(q, v, rng=hash_key, n_hashes=cfg.n_hashes,
                                   n_buckets=n_buckets, causal=self.causal, mask=mask,
                                   buckets=buckets, return_buckets=True, **chunking)
      # The reversible stack keeps these for the backward pass: store them in the smallest int.
      total = math.prod((n_buckets,) if isinstance(n_buckets, int) else n_buckets)
      buckets = buckets.astype(jnp.int8 if total <= 127 else jnp.int16 if total <= 32767
                               else jnp.int32)
    elif self.attention_type == 'local':
      out = local_attention(q, k, v, causal=self.causal, mask=mask, **chunking)
    else:
      out = full_attention(q, k, v, causal=self.causal, mask=mask)
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
                          param_dtype=cfg.parameter_dtype, name='out')(out)
    return out, buckets


class AttentionBlock(nn.Module):
  """Pre-norm self-attention residual branch: `dropout(Attention(LayerNorm(x)))`."""
  cfg: ModelConfig
  attention_type: str
  causal: bool

  @nn.compact
  def __call__(self, x, *, context=None, mask=None, context_mask=None, key=None, buckets=None,
               train=False):
    del context, context_mask
    h = _layer_norm(self.cfg, 'norm')(x)
    h, buckets = SelfAttention(self.cfg, self.attention_type, self.causal, name='attention')(
        h, mask=mask, key=key, buckets=buckets)
    return dropout(h, self.cfg.dropout, _dropout_key(key, train)), buckets


class CrossAttentionBlock(nn.Module):
  """Pre-norm encoder-decoder attention: queries from `x [B, T, D]`, keys/values from `context [B, S, D]`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, context=None, mask=None, context_mask=None, key=None, buckets=None,
               train=False):
    del mask
    cfg = self.cfg
    dense = functools.partial(nn.DenseGeneral, features=(cfg.n_heads, cfg.head_dim_),
                              use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=cfg.parameter_dtype)
    h = _layer_norm(cfg, 'norm')(x)
    out = full_attention(dense(name='query')(h), dense(name='key')(context),
                         dense(name='value')(context), mask=context_mask)
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
                          param_dtype=cfg.parameter_dtype, name='out')(out)
    return dropout(out, cfg.dropout, _dropout_key(key, train)), buckets


def feed_forward(params: dict, x: jax.Array, *, chunk_len: int = 0, rate: float = 0.0,
                 key: jax.Array | None = None) -> jax.Array:
  """`dropout(gelu(x W1 + b1)) W2 + b2`, optionally over chunks of the length axis.

  With `chunk_len` > 0 the chunks run under `lax.map` of a rematerialized function: the
  `[B, chunk_len, F]` hidden activations of one chunk exist at a time, in the forward pass and
  in the backward pass (which recomputes them chunk by chunk).

  Args:
    params: {'w1': [D, F], 'b1': [F], 'w2': [F, D], 'b2': [D]}.
    x: `[B, L, D]`; L must be a multiple of `chunk_len` when chunking.
    key: dropout key (chunk i uses `fold_in(key, i)`), or None for no dropout.
  Returns:
    `[B, L, D]`.
  """
  def apply(x_chunk, chunk_key):
    h = jnp.einsum('bld,df->blf', x_chunk, params['w1'].astype(x_chunk.dtype)) + params['b1']
    h = dropout(jax.nn.gelu(h).astype(x_chunk.dtype), rate, chunk_key)
    return (jnp.einsum('blf,fd->bld', h, params['w2'].astype(h.dtype)) + params['b2']).astype(
        x_chunk.dtype)

  batch, length, width = x.shape
  if not chunk_len or chunk_len >= length:
    return apply(x, key)
  if length % chunk_len:
    raise ValueError(f'feed_forward: length {length} is not a multiple of ff_chunk_len '
                     f'{chunk_len}: pad the input or pick an ff_chunk_len that divides it')
  n = length // chunk_len
  chunks = x.reshape(batch, n, chunk_len, width).swapaxes(0, 1)  # [n, B, chunk_len, D]

  def body(args):
    x_chunk, i = args
    return apply(x_chunk, None if key is None else jax.random.fold_in(key, i))

  out = jax.lax.map(jax.checkpoint(body), (chunks, jnp.arange(n)))
  return out.swapaxes(0, 1).reshape(batch, length, width)


class FeedForwardBlock(nn.Module):
  """Pre-norm feed-forward residual branch, chunked along the length when `cfg.ff_chunk_len`."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, context=None, mask=None, context_mask=None, key=None, buckets=None,
               train=False):
    del context, mask, context_mask
    cfg = self.cfg
    init = nn.initializers.lecun_normal()
    params = {
        'w1': self.param('w1', init, (cfg.d_model, cfg.d_ff), cfg.parameter_dtype),
        'b1': self.param('b1', nn.initializers.zeros, (cfg.d_ff,), cfg.parameter_dtype),
        'w2': self.param('w2', init, (cfg.d_ff, cfg.d_model), cfg.parameter_dtype),
        'b2': self.param('b2', nn.initializers.zeros, (cfg.d_model,), cfg.parameter_dtype),
    }
    params = jax.tree.map(lambda p: p.astype(cfg.compute_dtype), params)
    h = _layer_norm(cfg, 'norm')(x)
    drop_key = _dropout_key(key, train)
    ff_key = None if drop_key is None else jax.random.fold_in(drop_key, 0)
    out = feed_forward(params, h, chunk_len=cfg.ff_chunk_len, rate=cfg.dropout, key=ff_key)
    return dropout(out, cfg.dropout, drop_key), buckets


class AxialPositionalEmbedding(nn.Module):
  """Factorized positions (Reformer section 5): position p = (p_1, ..., p_k) in `shape`.

  Factor i has a table `[shape[i], dims[i]]`; a position's embedding concatenates the rows of
  its coordinates, so a `[prod(shape), D]` table costs only `sum(shape[i] * dims[i])` parameters.
  """
  shape: tuple[int, ...]
  dims: tuple[int, ...]
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, length: int) -> jax.Array:
    """Returns `[length, sum(dims)]` for `length <= prod(shape)` (the table's first rows)."""
    if length > math.prod(self.shape):
      raise ValueError(f'AxialPositionalEmbedding: length {length} exceeds axial_shape '
                       f'{self.shape} (product {math.prod(self.shape)}); enlarge axial_shape')
    # Row-major coordinates of each position; only the `length` rows needed are gathered.
    coords, rest = [], jnp.arange(length)
    for size in reversed(self.shape):
      coords.append(rest % size)
      rest = rest // size
    coords.reverse()
    parts = [self.param(f'axis_{i}', nn.initializers.normal(0.02), (size, dim), self.param_dtype)[c]
             for i, (size, dim, c) in enumerate(zip(self.shape, self.dims, coords))]
    return jnp.concatenate(parts, axis=-1)
