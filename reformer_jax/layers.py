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

from reformer_jax.attention import cpu_kernel
from reformer_jax.attention import default_n_buckets, full_attention, local_attention, lsh_attention
from reformer_jax.attention.common import layer_norm, resolve_chunking
from reformer_jax.attention.lsh import attention_groups, lsh_self_attention
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
    return layer_norm(_norm_params(x.shape[-1], self.param_dtype, self), x, self.dtype,
                      self.epsilon)


def _layer_norm(cfg: ModelConfig, name: str) -> LayerNorm:
  return LayerNorm(dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype, name=name)


class _Params(nn.Module):
  """Declares parameters and returns them: `((name, init, shape, dtype), ...)` -> {name: array}.

  Lets a block run a layer as a pure function (e.g. a chunk of positions at a time under
  `lax.map`) while its parameters keep the names the layer's own module would give them.
  """
  specs: tuple

  @nn.compact
  def __call__(self):
    return {name: self.param(name, init, shape, dtype) for name, init, shape, dtype in self.specs}


def _norm_params(width: int, param_dtype, parent: nn.Module, name: str | None = None) -> dict:
  """The `{'scale', 'bias'}` of a `LayerNorm`; with `name`, under that child of `parent`."""
  specs = (('scale', nn.initializers.ones, (width,), param_dtype),
           ('bias', nn.initializers.zeros, (width,), param_dtype))
  if name is None:  # the LayerNorm module's own parameters
    return {n: parent.param(n, init, shape, dtype) for n, init, shape, dtype in specs}
  return _Params(specs, parent=parent, name=name)()


def _dense_init(key, shape, dtype, *, n_in: int):
  """`nn.DenseGeneral`'s kernel initialization: lecun normal of the flattened (in, out) matrix."""
  flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
  return nn.initializers.lecun_normal()(key, flat, dtype).reshape(shape)


def _kernel(cfg: ModelConfig, parent: nn.Module, name: str, shape: tuple[int, ...],
            n_in: int) -> jax.Array:
  """The kernel of the bias-free `nn.DenseGeneral` named `name` (same name, shape and init)."""
  init = functools.partial(_dense_init, n_in=n_in)
  return _Params((('kernel', init, shape, cfg.parameter_dtype),), parent=parent, name=name)()[
      'kernel']


# Per-token layers (LayerNorm and the attention projections) go a chunk of positions at a time
# once their float32 `[B, L, D]` activations exceed this (and every chunk stays below it):
# their full-length intermediates then never exist, in the forward or the backward pass.
TOKEN_CHUNK_BYTES = 2 ** 28


def token_chunks(batch: int, length: int, width: int) -> int:
  """How many chunks of positions the per-token layers use (1: the whole sequence at once)."""
  n = -(-4 * batch * length * width // TOKEN_CHUNK_BYTES)
  return next(d for d in range(max(1, min(n, length)), length + 1) if length % d == 0)


def map_positions(fn, x: jax.Array, n_chunks: int):
  """`fn(x)` for a per-position `fn`, over `n_chunks` chunks of the length axis of `x [B, L, ...]`.

  The chunks run under `lax.map` of a rematerialized `fn`: one chunk's intermediates exist at a
  time, in the forward and in the backward pass. `fn` maps `[B, l, ...]` to a pytree of
  `[B, l, ...]` arrays.
  """
  if n_chunks == 1:
    return fn(x)
  batch, length = x.shape[:2]
  size = length // n_chunks
  chunks = x.reshape(batch, n_chunks, size, *x.shape[2:]).swapaxes(0, 1)
  out = jax.lax.map(jax.checkpoint(fn, prevent_cse=False), chunks)
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(batch, length, *y.shape[3:]), out)


class SelfAttention(nn.Module):
  """Projects `[B, L, D]` into heads, runs the `full | lsh | local` kernel, projects back.

  With `norm` (a LayerNorm's parameters) the input is normalized first, inside the projection:
  long sequences then normalize and project a chunk of positions at a time (`token_chunks`),
  so neither the normalized `[B, L, D]` input nor its float32 intermediates exist whole.
  """
  cfg: ModelConfig
  attention_type: str
  causal: bool

  @nn.compact
  def __call__(self, x, *, norm=None, mask=None, key=None, buckets=None):
    cfg = self.cfg
    dtype, width = cfg.compute_dtype, cfg.d_model
    in_shape = (x.shape[-1], cfg.n_heads, cfg.head_dim_)
    shared = self.attention_type == 'lsh' or cfg.shared_qk
    names = ('qk',) if shared else ('query', 'key')
    kernels = [_kernel(cfg, self, name, in_shape, 1) for name in names + ('value',)]
    w_out = _kernel(cfg, self, 'out', (cfg.n_heads, cfg.head_dim_, width), 2)
    batch, length = x.shape[:2]
    n_chunks = token_chunks(batch, length, width)
    normalize = lambda x: (x if norm is None else layer_norm(norm, x, dtype)).astype(dtype)
    chunking = dict(chunk_len=cfg.chunk_len, n_chunks_before=cfg.n_chunks_before,
                    n_chunks_after=0 if self.causal else cfg.n_chunks_after)
    lsh = self.attention_type == 'lsh'
    if lsh:
      hash_key = None if key is None else jax.random.fold_in(key, HASH)
      n_buckets = cfg.n_buckets or default_n_buckets(length, min(cfg.chunk_len, length))
      chunk_len, before, after = resolve_chunking(length, cfg.chunk_len, chunking['n_chunks_before'],
                                                  chunking['n_chunks_after'], 'lsh_attention')
      parallel, _ = attention_groups(batch, length, cfg.n_heads, cfg.head_dim_, cfg.n_hashes,
                                     chunk_len, (before + 1 + after) * chunk_len)
    if lsh and parallel < cfg.n_heads:
      # Too big for all heads at once: project, attend and project back a group of heads at a
      # time, so no [B, L, N, H] activation (or gradient) is ever made whole.
      out, buckets = lsh_self_attention(
          x, *kernels, w_out, rng=hash_key, n_hashes=cfg.n_hashes, n_buckets=n_buckets,
          causal=self.causal, mask=mask, buckets=buckets, n_parallel_heads=parallel, norm=norm,
          dtype=dtype, **chunking)
    else:
      def project(x):  # [B, l, D] -> ([B, l, N, H] per kernel)
        # Over the flattened `[B * l, D]` tokens, as in `feed_forward`: plain GEMMs, forward
        # and backward (the `[B, l, ...]` einsum's weight gradients transposed their operands).
        h = normalize(x)
        tokens = h.reshape(-1, h.shape[-1])
        return tuple(matmul(tokens, k.reshape(k.shape[0], -1).astype(dtype)).reshape(
            *h.shape[:-1], *k.shape[1:]) for k in kernels)

      projected = map_positions(project, x, n_chunks)
      q, k, v = (projected[0], None, projected[1]) if shared else projected
      if lsh:
        out, buckets = lsh_attention(q, v, rng=hash_key, n_hashes=cfg.n_hashes,
                                     n_buckets=n_buckets, causal=self.causal, mask=mask,
                                     buckets=buckets, return_buckets=True, **chunking)
      elif self.attention_type == 'local':
        out = local_attention(q, k, v, causal=self.causal, mask=mask, **chunking)
      else:
        out = full_attention(q, k, v, causal=self.causal, mask=mask,
                             exclude_self=cfg.exclude_self)
      out = matmul(out.reshape(-1, out.shape[-2] * out.shape[-1]).astype(dtype),
                   w_out.reshape(-1, w_out.shape[-1]).astype(dtype)).reshape(x.shape)
    if lsh:
      # The reversible stack keeps these for the backward pass: store them in the smallest int
      # that holds 0 ... total - 1.
      total = math.prod((n_buckets,) if isinstance(n_buckets, int) else n_buckets)
      buckets = buckets.astype(jnp.int8 if total <= 128 else jnp.int16 if total <= 32768
                               else jnp.int32)
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
    norm = _norm_params(x.shape[-1], self.cfg.parameter_dtype, self, 'norm')
    h, buckets = SelfAttention(self.cfg, self.attention_type, self.causal, name='attention')(
        x, norm=norm, mask=mask, key=key, buckets=buckets)
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
    # Projections over flattened tokens, as in `SelfAttention` (plain GEMMs in the backward pass).
    def project(name, y):  # [B, l, D] -> [B, l, N, H]
      return dense(name=name)(y.reshape(-1, y.shape[-1])).reshape(*y.shape[:-1], cfg.n_heads,
                                                                  cfg.head_dim_)
    out = full_attention(project('query', h), project('key', context),
                         project('value', context), mask=context_mask)
    out = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=cfg.compute_dtype,
                          param_dtype=cfg.parameter_dtype, name='out')(
                              out.reshape(-1, *out.shape[-2:])).reshape(x.shape)
    return dropout(out, cfg.dropout, _dropout_key(key, train)), buckets


_GELU_C = math.sqrt(2 / math.pi)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """`jax.nn.gelu` (the tanh approximation) with its derivative written out.

  `0.5 x (1 + tanh(u))`, `u = c (x + 0.044715 x^3)`, has derivative
  `0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 * 0.044715 x^2)`, `t = tanh(u)`: one elementwise pass
  from the saved input instead of autodiff's chain of products. (Interleaved A/Bs of the
  6-layer, 4K-token peers step on the 2-core CPU measured 0.95-0.98x the step time with it,
  within that machine's noise.)
  """
  return jax.nn.gelu(x)


def _gelu_fwd(x):
  return jax.nn.gelu(x), x


def _gelu_bwd(x, g):
  acc = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(acc)
  t = jnp.tanh(_GELU_C * (xf + 0.044715 * xf * xf * xf))
  d = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * xf * xf)
  return ((g.astype(acc) * d).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def _product(a: jax.Array, b: jax.Array, trans_a: bool = False,
             trans_b: bool = False) -> jax.Array:
  """`op(a) @ op(b)` of 2-D arrays (`op` transposes where asked): OpenBLAS on CPU
  (`cpu_kernel.matmul`) where it applies, XLA's dot elsewhere."""
  def xla(a, b):
    return jax.lax.dot_general(a, b, (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ())))
  if not cpu_kernel.matmul_applies(a, b):
    return xla(a, b)
  return jax.lax.platform_dependent(
      a, b, cpu=lambda a, b: cpu_kernel.matmul(a, b, trans_a, trans_b), default=xla)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x [T, F] @ w [F, D]` over flattened tokens: every projection of the models.

  On CPU, float32 products (forward, input and weight gradients) run through OpenBLAS's sgemm
  (`cpu_kernel.matmul`, with its transpose flags) instead of XLA:CPU's Eigen contraction, which
  ran the Reformer's forward products at 170-180 GFLOP/s on the 2-core Zen 3 and the weight
  gradients `x^T dy`, whose left operand it reads transposed, at 110-150; OpenBLAS ran both at
  180-187 there. (The 6-layer, 4K-token training step of experiments/peers.py: 0.948x the
  time with XLA's dots, in 20 alternated steps in one process; a side check.) Elsewhere, and
  for other dtypes, XLA's dot.
  """
  return _product(x, w)


def _matmul_fwd(x, w):
  return _product(x, w), (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  return (_product(dy, w.astype(dy.dtype), trans_b=True),
          _product(x, dy.astype(x.dtype), trans_a=True).astype(w.dtype))


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`jax.lax.dot_general` for `nn.Dense(dot_general=...)`: a plain `[T, F] @ [F, D]` product
  (the LM head over flattened tokens) goes through `matmul`."""
  if (lhs.ndim == 2 and rhs.ndim == 2 and preferred_element_type is None
      and dimension_numbers == (((1,), (0,)), ((), ()))):
    return matmul(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def feed_forward(params: dict, x: jax.Array, *, chunk_len: int = 0, rate: float = 0.0,
                 key: jax.Array | None = None, norm: dict | None = None,
                 out_key: jax.Array | None = None,
                 chunk_index: jax.Array | int | None = None) -> jax.Array:
  """`dropout(dropout(gelu(x W1 + b1)) W2 + b2)`, optionally over chunks of the length axis.

  With `chunk_len` > 0 the chunks run under `lax.map` of a rematerialized function: the
  `[B, chunk_len, F]` hidden activations of one chunk exist at a time, in the forward pass and
  in the backward pass (which recomputes them chunk by chunk).

  Args:
    params: {'w1': [D, F], 'b1': [F], 'w2': [F, D], 'b2': [D]}.
    x: `[B, L, D]`; L must be a multiple of `chunk_len` when chunking.
    key: dropout key of the hidden activations (chunk i uses `fold_in(key, i)`), or None for
      no dropout.
    norm: LayerNorm parameters to normalize `x` with first (chunk by chunk when chunking, so
      the normalized `[B, L, D]` input never exists whole); the result keeps `x`'s dtype.
    out_key: dropout key of the output (chunk i uses `fold_in(out_key, i)`), or None.
    chunk_index: `x` is chunk `chunk_index` (of `chunk_len` positions) of a longer sequence:
      returns that chunk of the longer sequence's result (its dropout masks included), so the
      result can be computed, or differentiated, one chunk at a time by the caller.
  Returns:
    `[B, L, D]`.
  """
  fold = lambda k, i: None if k is None or i is None else jax.random.fold_in(k, i)

  def apply(x_chunk, i):  # i: the chunk's index, None unchunked
    if norm is not None:
      x_chunk = layer_norm(norm, x_chunk, x_chunk.dtype)
    # Products over the flattened `[B * l, D]` tokens: the weight gradients are then products
    # with one contracting axis, which XLA:CPU runs as plain GEMMs (contracted over both `b` and
    # `l`, it transposed the `[B * l, F]` gradient in memory and ran the product at a third of
    # the rate).
    tokens = x_chunk.reshape(-1, x_chunk.shape[-1])
    h = matmul(tokens, params['w1'].astype(tokens.dtype)) + params['b1']
    h = dropout(gelu(h).astype(tokens.dtype), rate, key if i is None else fold(key, i))
    out = (matmul(h, params['w2'].astype(h.dtype)) + params['b2']).astype(
        x_chunk.dtype)
    return dropout(out.reshape(x_chunk.shape), rate, out_key if i is None else fold(out_key, i))

  batch, length, width = x.shape
  if chunk_index is not None:
    return apply(x, chunk_index)
  if not chunk_len or chunk_len >= length:
    return apply(x, None)
  if length % chunk_len:
    raise ValueError(f'feed_forward: length {length} is not a multiple of ff_chunk_len '
                     f'{chunk_len}: pad the input or pick an ff_chunk_len that divides it')
  n = length // chunk_len
  chunks = x.reshape(batch, n, chunk_len, width).swapaxes(0, 1)  # [n, B, chunk_len, D]
  out = jax.lax.map(jax.checkpoint(lambda args: apply(*args)), (chunks, jnp.arange(n)))
  return out.swapaxes(0, 1).reshape(batch, length, width)


class FeedForwardBlock(nn.Module):
  """Pre-norm feed-forward residual branch, chunked along the length when `cfg.ff_chunk_len`.

  With `chunk_index`, `x` is that chunk (of `cfg.ff_chunk_len` positions) of a longer sequence
  and the result is the longer sequence's branch at those positions, dropout masks included:
  the reversible stack's backward pass goes through the branch a chunk at a time this way.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, context=None, mask=None, context_mask=None, key=None, buckets=None,
               train=False, chunk_index=None):
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
    norm = _norm_params(x.shape[-1], cfg.parameter_dtype, self, 'norm')
    drop_key = _dropout_key(key, train)
    ff_key = None if drop_key is None else jax.random.fold_in(drop_key, 0)
    out = feed_forward(params, x.astype(cfg.compute_dtype), chunk_len=cfg.ff_chunk_len,
                       rate=cfg.dropout, key=ff_key, norm=norm, out_key=drop_key,
                       chunk_index=chunk_index)
    return out, buckets


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
