"""Reformer models: `ReformerLM` (decoder-only) and `ReformerEncoderDecoder`.

Axis legend: B batch, L length (S source, T target), D model width, V vocabulary.

Randomness is explicit: a call takes one `rng` key; the embedding dropout, every block's
dropout and every LSH layer's hash rotations derive from it by `fold_in`. Training passes
`fold_in(root, step)`, so rotations are fresh each step and differ per layer and head; with
`train=False` and `ModelConfig.hash_seed` set, rotations are fixed (reproducible evaluation).

Per-layer LSH bucket balance (largest bucket / mean bucket) is sown into the `diagnostics`
collection: `model.apply(v, x, rng=k, mutable=['diagnostics'])`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from reformer_jax import reversible
from reformer_jax.attention import bucket_balance, default_n_buckets
from reformer_jax.layers import (AttentionBlock, AxialPositionalEmbedding, CrossAttentionBlock,
                                 FeedForwardBlock, LayerNorm, dense_dot_general, dropout)
from reformer_jax.model_config import ModelConfig

EMBED, DECODER, ENCODER = 0, 1, 2  # fold_in tags of the call's key
# A reversible stack whose float32 `[B, L, D]` streams exceed this runs as a scan over layers.
SCAN_STREAM_BYTES = 2 ** 26


class Stack(nn.Module):
  """`n_layers` blocks of (self-attention, [cross-attention,] feed-forward) on `[B, L, D]`.

  Reversible (`cfg.reversible`): streams (x, x) go through `reversible.reversible_stack`, so the
  backward pass rebuilds activations instead of storing them, and the output is the mean of the
  two streams. Otherwise an ordinary pre-norm residual stack, `x + f(x)` per block.
  """
  cfg: ModelConfig
  n_layers: int
  causal: bool
  cross: bool = False

  def _specs(self):
    """(class, attributes, name) of every block, in order."""
    cfg = self.cfg
    specs = []
    for i in range(self.n_layers):
      specs.append((AttentionBlock, dict(cfg=cfg, attention_type=cfg.attention_type(i),
                                         causal=self.causal), f'attention_{i}'))
      if self.cross:
        specs.append((CrossAttentionBlock, dict(cfg=cfg), f'cross_attention_{i}'))
      specs.append((FeedForwardBlock, dict(cfg=cfg), f'feed_forward_{i}'))
    return specs

  @nn.compact
  def __call__(self, x, *, mask=None, context=None, context_mask=None, key=None, train=False):
    specs = self._specs()
    keys = [None if key is None else jax.random.fold_in(key, j) for j in range(len(specs))]
    consts = {'mask': mask, 'context_mask': context_mask}
    blocks = [cls(**attrs, name=name) for cls, attrs, name in specs]

    if not self.cfg.reversible:
      replays = []
      for block, k in zip(blocks, keys):
        delta, buckets = block(x, context=context, key=k, train=train, **(consts or {}))
        x = x + delta
        replays.append(buckets)
      self._sow_balance(specs, replays)
      return x

    if self.is_initializing():  # create the parameters through the bound blocks once
      for block, k in zip(blocks, keys):
        block(x, context=context, key=k, train=train, **(consts or {}))
    params = [self.variables['params'][name] for _, _, name in specs]
    fns = [_pure_block(cls(**attrs, parent=None), train) for cls, attrs, _ in specs]
    # Blocks repeat every layer (every len(attention_types) layers). Once the streams are big
    # the stack scans over those groups, so the compiler allocates for one group at a time (it
    # may otherwise start later blocks' buffers early: memory then grows with depth); small
    # ones keep the unrolled stack.
    cycle = len(self.cfg.attention_types)
    period = (len(specs) // self.n_layers * cycle
              if self.n_layers % cycle == 0 and 4 * x.size > SCAN_STREAM_BYTES else None)
    # The last `keep_last` functions (by default one, the last layer's feed-forward) keep their
    # activations: their forward pass is not run again in the backward pass.
    y1, y2, replays = reversible.reversible_stack(fns, params, x, x, keys=keys, context=context,
                                                  consts=consts, period=period,
                                                  keep_last=self.cfg.keep_last)
    self._sow_balance(specs, replays)
    return (y1 + y2) / 2

  def _sow_balance(self, specs, replays):
    length = next((r.shape[-1] for r in replays if r is not None), None)
    if length is None:
      return
    n_buckets = self.cfg.n_buckets or default_n_buckets(length, min(self.cfg.chunk_len, length))
    values = [bucket_balance(r, n_buckets) for (_, attrs, _), r in zip(specs, replays)
              if attrs.get('attention_type') == 'lsh']
    self.sow('diagnostics', 'bucket_balance', jax.lax.stop_gradient(jnp.stack(values)),
             init_fn=lambda: None, reduce_fn=lambda _, new: new)


def _pure_block(module: nn.Module, train: bool):
  """Wraps an unbound block as a residual function for `reversible.reversible_stack`.

  A chunked feed-forward block is per-position: it also gets the `chunk_len` and `chunk` that
  let the stack's backward pass go through it a chunk of positions at a time.
  """
  def fn(params, x, context, consts, key, replay):
    return module.apply({'params': params}, x, context=context, key=key, buckets=replay,
                        train=train, **(consts or {}))
  if isinstance(module, FeedForwardBlock) and module.cfg.ff_chunk_len:
    def chunk(params, x, context, consts, key, index):
      del context, consts
      return module.apply({'params': params}, x, key=key, train=train, chunk_index=index)[0]
    fn.chunk_len, fn.chunk = module.cfg.ff_chunk_len, chunk
  return fn


def _call_key(cfg: ModelConfig, rng: jax.Array | None, train: bool) -> jax.Array | None:
  """The key a call derives its randomness from, or a clear error when one is needed."""
  uses_lsh = 'lsh' in cfg.attention_types
  if not train and cfg.hash_seed is not None:
    return jax.random.PRNGKey(cfg.hash_seed)
  if rng is None and (uses_lsh or (train and cfg.dropout > 0)):
    raise ValueError('this model needs randomness: pass rng=<PRNG key> (LSH hash rotations'
                     + (', dropout' if train and cfg.dropout > 0 else '') + '), or for '
                     'evaluation set ModelConfig.hash_seed for fixed rotations')
  return rng


class Embedding(nn.Module):
  """Token embedding plus positions: `[B, L]` ids -> `[B, L, D]`."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.tokens = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=nn.initializers.normal(0.02),
                           dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype)
    if cfg.pos_embedding == 'axial':
      shape, dims = cfg.axial
      self.positions = AxialPositionalEmbedding(shape, dims, cfg.parameter_dtype)
    elif cfg.pos_embedding == 'learned':
      self.table = self.param('positions', nn.initializers.normal(0.02),
                              (cfg.max_len, cfg.d_model), cfg.parameter_dtype)

  def __call__(self, ids, *, key=None, train=False):
    cfg = self.cfg
    length = ids.shape[1]
    if length > cfg.max_len:
      raise ValueError(f'input length {length} exceeds max_len {cfg.max_len}: truncate the input '
                       f'or raise model.max_len (and axial_shape)')
    x = self.tokens(ids)
    if cfg.pos_embedding == 'axial':
      x = x + self.positions(length).astype(x.dtype)
    elif cfg.pos_embedding == 'learned':
      x = x + self.table[:length].astype(x.dtype)
    return dropout(x, cfg.dropout, key if train else None)

  def logits(self, x):
    return self.tokens.attend(x)


class _OutputHead(nn.Module):
  """Final LayerNorm and projection to `[B, L, V]` float32 logits."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, embedding: Embedding):
    cfg = self.cfg
    x = LayerNorm(cfg.compute_dtype, cfg.parameter_dtype, name='norm')(x)
    # Over the flattened `[B * L, D]` tokens (see `layers.feed_forward`): the weight gradient is
    # then a plain GEMM rather than one over a `[V, B * L]` transposed copy of the logits'
    # gradient; `layers.matmul` (OpenBLAS on CPU) runs the untied head's products.
    tokens = x.reshape(-1, x.shape[-1])
    if cfg.tie_embeddings:
      logits = embedding.logits(tokens)
    else:
      logits = nn.Dense(cfg.vocab_size, dtype=cfg.compute_dtype, param_dtype=cfg.parameter_dtype,
                        dot_general=dense_dot_general, name='logits')(tokens)
    return logits.reshape(*x.shape[:-1], -1).astype(jnp.float32)


class ReformerLM(nn.Module):
  """Decoder-only causal language model.

  Call: `logits = model.apply(variables, tokens, mask=None, rng=key, train=False)`, with
  tokens `[B, L]` int ids (L <= max_len, a multiple of chunk_len for lsh/local layers), mask
  `[B, L]` booleans (False at padding), logits `[B, L, V]` float32.

  The call is `logits(features(tokens))`; both halves can be applied on their own
  (`method=ReformerLM.features`, `method=ReformerLM.logits`), so a loss over a long sequence
  can project the `[B, L, D]` features to logits a chunk of positions at a time
  (`train.chunked_token_sums`) instead of holding `[B, L, V]` logits.
  """
  cfg: ModelConfig

  def setup(self):
    self.embedding = Embedding(self.cfg)
    self.decoder = Stack(self.cfg, self.cfg.n_layers, causal=True)
    self.head = _OutputHead(self.cfg)

  def __call__(self, tokens, *, mask=None, rng=None, train=False):
    return self.logits(self.features(tokens, mask=mask, rng=rng, train=train))

  def features(self, tokens, *, mask=None, rng=None, train=False):
    """`[B, L]` ids -> `[B, L, D]` output of the decoder stack (before the head's LayerNorm)."""
    key = _call_key(self.cfg, rng, train)
    fold = (lambda tag: None) if key is None else (lambda tag: jax.random.fold_in(key, tag))
    x = self.embedding(tokens, key=fold(EMBED), train=train)
    return self.decoder(x, mask=mask, key=fold(DECODER), train=train)

  def logits(self, features):
    """`[..., D]` features (of any positions) -> `[..., V]` float32 logits."""
    return self.head(features, self.embedding)


class ReformerEncoderDecoder(nn.Module):
  """Encoder-decoder (translation): a non-causal encoder stack and a causal decoder stack with
  cross-attention; both reversible when `cfg.reversible`. Source and target share one vocabulary.

  Call: `logits = model.apply(variables, src, tgt, src_mask=..., tgt_mask=..., rng=key)` with
  src `[B, S]`, tgt `[B, T]` (the shifted-right targets), logits `[B, T, V]` float32.
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = Embedding(cfg)
    self.encoder = Stack(cfg, cfg.n_layers, causal=False)
    self.encoder_norm = LayerNorm(cfg.compute_dtype, cfg.parameter_dtype)
    self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross=True)
    self.head = _OutputHead(cfg)

  def encode(self, src, *, src_mask=None, rng=None, train=False):
    """`[B, S]` ids -> `[B, S, D]` encoded source."""
    key = _call_key(self.cfg, rng, train)
    fold = (lambda tag: None) if key is None else (lambda tag: jax.random.fold_in(key, tag))
    x = self.embedding(src, key=fold(EMBED), train=train)
    return self.encoder_norm(self.encoder(x, mask=src_mask, key=fold(ENCODER), train=train))

  def decode(self, tgt, encoded, *, src_mask=None, tgt_mask=None, rng=None, train=False):
    """`[B, T]` target ids and `[B, S, D]` encoded source -> `[B, T, V]` logits."""
    key = _call_key(self.cfg, rng, train)
    fold = (lambda tag: None) if key is None else (lambda tag: jax.random.fold_in(key, tag))
    # Distinct from the source's embedding-dropout key.
    x = self.embedding(tgt, key=None if key is None else jax.random.fold_in(fold(EMBED), 1),
                       train=train)
    x = self.decoder(x, mask=tgt_mask, context=encoded, context_mask=src_mask,
                     key=fold(DECODER), train=train)
    return self.head(x, self.embedding)

  def __call__(self, src, tgt, *, src_mask=None, tgt_mask=None, rng=None, train=False):
    encoded = self.encode(src, src_mask=src_mask, rng=rng, train=train)
    return self.decode(tgt, encoded, src_mask=src_mask, tgt_mask=tgt_mask, rng=rng, train=train)
