"""`ModelConfig`: every architecture choice of a Reformer, validated once, up front.

Errors name the field and the fix, so a bad sweep point fails before compiling anything.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTION_TYPES = ('lsh', 'full', 'local')
POS_EMBEDDINGS = ('axial', 'learned', 'none')
DTYPES = ('float32', 'bfloat16', 'float16')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a `ReformerLM` or `ReformerEncoderDecoder`."""
  vocab_size: int = 256                   # tokens, padding (id 0) included
  d_model: int = 256                      # width of the residual streams
  d_ff: int = 512                         # hidden width of the feed-forward layers
  n_heads: int = 4                        # attention heads
  head_dim: int | None = None             # per-head width; None: d_model // n_heads
  n_layers: int = 2                       # blocks (the encoder's, for an encoder-decoder)
  n_decoder_layers: int | None = None     # decoder blocks of an encoder-decoder; None: n_layers
  attention_types: tuple[str, ...] = ('lsh',)  # per layer, cycled: e.g. ('lsh', 'full')
  max_len: int = 1024                     # longest sequence (positional table size)
  chunk_len: int = 64                     # LSH and local attention chunk length
  n_chunks_before: int = 1                # chunks each chunk also sees, before it
  n_chunks_after: int = 0                 # ... and after it (non-causal layers only)
  n_hashes: int = 2                       # LSH hash rounds
  n_buckets: int | tuple[int, ...] | None = None  # even int or factors; None: ~2 * len / chunk
  hash_seed: int | None = None            # fixed hash rotations when not training (evaluation)
  shared_qk: bool = True                  # shared query/key for full/local (LSH always shares)
  exclude_self: bool = True               # shared query/key: a token sees its own key only when
                                          # no other is allowed; False: like any other (full only)
  reversible: bool = True                 # False: ordinary pre-norm residual Transformer
  ff_chunk_len: int = 0                   # tokens per feed-forward chunk; 0: unchunked
  keep_last: int = 1                      # last residual functions that keep their forward
                                          # activations for the backward pass instead of
                                          # running again there (1: the last feed-forward;
                                          # 2: the last block, faster, one attention's
                                          # activations more; 0: least memory)
  dropout: float = 0.0                    # residual, embedding and feed-forward dropout
  pos_embedding: str = 'axial'            # 'axial' | 'learned' | 'none'
  axial_shape: tuple[int, ...] | None = None  # factors of the position table; None: near-square
  axial_dims: tuple[int, ...] | None = None   # their widths, summing to d_model; None: halves
  tie_embeddings: bool = False            # output layer shares the token embedding
  dtype: str = 'float32'                  # compute dtype
  param_dtype: str = 'float32'            # parameter dtype

  def __post_init__(self):
    for name in ('attention_types', 'axial_shape', 'axial_dims'):
      value = getattr(self, name)
      if isinstance(value, str):
        value = (value,)
      if value is not None:
        object.__setattr__(self, name, tuple(value))
    if isinstance(self.n_buckets, (list, tuple)):
      object.__setattr__(self, 'n_buckets', tuple(self.n_buckets))
    self.validate()

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> 'ModelConfig':
    """Builds a config from a dict or `ml_collections.ConfigDict`, rejecting unknown fields."""
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'config.model has unknown fields {unknown}; valid fields: {sorted(known)}')
    return cls(**values)

  # Derived values.
  @property
  def head_dim_(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def decoder_layers(self) -> int:
    return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def parameter_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def axial(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(shape, dims) of the axial positional table, filling in the defaults."""
    shape = self.axial_shape
    if shape is None:
      first = 2 ** math.ceil(math.log2(max(self.max_len, 1)) / 2)
      shape = (first, -(-self.max_len // first))
    dims = self.axial_dims
    if dims is None:
      dims = (self.d_model // 2, self.d_model - self.d_model // 2)
    return tuple(shape), tuple(dims)

  def attention_type(self, layer: int) -> str:
    return self.attention_types[layer % len(self.attention_types)]

  def validate(self) -> None:
    """Raises ValueError naming the first bad field and how to fix it."""
    def fail(msg):
      raise ValueError(f'ModelConfig: {msg}')

    for name in ('vocab_size', 'd_model', 'd_ff', 'n_heads', 'n_layers', 'max_len', 'chunk_len',
                 'n_hashes'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        fail(f'{name} must be a positive int, got {value!r}')
    if self.head_dim is None and self.d_model % self.n_heads:
      fail(f'd_model {self.d_model} is not divisible by n_heads {self.n_heads}: change one, or '
           f'set head_dim explicitly')
    if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
      fail(f'n_decoder_layers must be >= 1 or None, got {self.n_decoder_layers}')
    if not self.attention_types:
      fail("attention_types is empty: give at least one of 'lsh', 'full', 'local'")
    for t in self.attention_types:
      if t not in ATTENTION_TYPES:
        fail(f'attention_types has {t!r}; choose from {ATTENTION_TYPES}')
    chunked = any(t in ('lsh', 'local') for t in self.attention_types)
    if chunked and self.max_len > self.chunk_len and self.max_len % self.chunk_len:
      fail(f'max_len {self.max_len} is not a multiple of chunk_len {self.chunk_len}: use '
           f'max_len {-(-self.max_len // self.chunk_len) * self.chunk_len} (pad shorter inputs) '
           f'or a chunk_len that divides it')
    if self.n_chunks_before < 0 or self.n_chunks_after < 0:
      fail('n_chunks_before and n_chunks_after must be >= 0')
    if self.n_buckets is not None:
      factors = (self.n_buckets,) if isinstance(self.n_buckets, int) else self.n_buckets
      if not factors or any(not isinstance(f, int) or f < 2 or f % 2 for f in factors):
        fail(f'n_buckets must be an even int >= 2 or a tuple of them, got {self.n_buckets!r}: '
             f'each random rotation makes two buckets (xR, -xR); round up to an even number or '
             f'leave it None for about 2 * max_len / chunk_len')
    if not self.exclude_self and (not self.shared_qk or set(self.attention_types) != {'full'}):
      fail(f'exclude_self=False needs shared_qk=True and full attention in every layer (got '
           f'shared_qk={self.shared_qk}, attention_types={self.attention_types}): it lets a '
           'token attend to its own shared query/key; LSH and local attention always exclude '
           'it, and separate keys have nothing to exclude')
    if 'lsh' in self.attention_types and not self.shared_qk:
      fail("shared_qk=False cannot be used with 'lsh' layers: LSH attention hashes one shared "
           "query/key; set shared_qk=True or drop 'lsh' from attention_types")
    if self.ff_chunk_len < 0 or (self.ff_chunk_len and self.max_len > self.ff_chunk_len
                                 and self.max_len % self.ff_chunk_len):
      fail(f'ff_chunk_len {self.ff_chunk_len} must be 0 (off) or divide max_len {self.max_len}')
    if not isinstance(self.keep_last, int) or self.keep_last < 0:
      fail(f'keep_last must be an int >= 0, got {self.keep_last!r}: 0 recomputes every '
           f'function in the backward pass (least memory), 1 keeps the last feed-forward\'s '
           f'activations, 2 the last block\'s')
    if not 0.0 <= self.dropout < 1.0:
      fail(f'dropout must be in [0, 1), got {self.dropout}')
    if self.pos_embedding not in POS_EMBEDDINGS:
      fail(f'pos_embedding {self.pos_embedding!r} is not one of {POS_EMBEDDINGS}')
    if self.pos_embedding == 'axial':
      shape, dims = self.axial
      if len(shape) != len(dims):
        fail(f'axial_shape {shape} and axial_dims {dims} must have the same number of factors')
      if math.prod(shape) < self.max_len:
        fail(f'axial_shape {shape} covers {math.prod(shape)} positions, fewer than max_len '
             f'{self.max_len}: make its product at least {self.max_len}')
      if sum(dims) != self.d_model:
        fail(f'axial_dims {dims} sum to {sum(dims)}, not d_model {self.d_model}: make them add '
             f'up to d_model')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        fail(f'{name} {getattr(self, name)!r} is not one of {DTYPES}')

  def replace(self, **changes) -> 'ModelConfig':
    return dataclasses.replace(self, **changes)

