"""Cached incremental decoding for `ReformerLM` (and the decoder of `ReformerEncoderDecoder`) and
the strategies built on it.

Axis legend: B batch, K beams, P prompt length, T new tokens, V vocabulary, D model width,
N heads, H head dim, R hash rounds, W cache slots.

The cache
---------
`init_cache` gives every self-attention layer a fixed-size ring buffer of W slots holding keys,
values, the absolute position of the token in each slot (-1 = empty) and, for LSH layers, the
token's bucket in every hash round. `decode_step` feeds one token per row: it embeds it at that
row's own position, runs the stack (reversible: the pair of streams through the blocks in order;
plain: `x + f(x)`), and each attention layer writes the token into slot `position % W` and
attends over the slots. When a row has seen more than W tokens the oldest slides out (its slot
is overwritten); nothing else is wiped.

* full: W = `cache_len` (default: the positional table size). While the context fits, logits
  equal `ReformerLM.apply` on the whole sequence; past that it is sliding-window attention.
* local: W = (n_chunks_before + 1) * chunk_len, exactly the keys `local_attention` lets a query
  see (its own chunk up to itself and `n_chunks_before` chunks before). Logits equal full
  recomputation at any length, so the window slides without changing results.
* lsh: W = `cache_len`. Each token is hashed once, with fixed rotations (from `hash_key`, or
  `ModelConfig.hash_seed`, derived per layer exactly as `ReformerLM.apply(train=False)` does).
  A new token attends to the cached tokens that share its bucket in at least one round, and to
  itself only when none does (the shared-QK self mask). The approximation, against the training
  kernel: (1) no chunks: a query sees every same-bucket key in the window, where the kernel sees
  only those its sort put in its chunk or the one before, plus different-bucket neighbours that
  happen to share the chunk; (2) one softmax over the union of the rounds' buckets, each key once,
  where the kernel mixes per-round softmaxes by their logsumexp; (3) only the last W tokens.
  Tests bound the resulting logit distance by the distance between two hash seeds of the model.
  The bucket count is `ModelConfig.n_buckets`, or when unset `default_n_buckets(W, chunk_len)`
  (what the model picks for a sequence of W tokens).

Encoder-decoder: `encode_source` encodes the source once and projects it to every decoder
layer's cross-attention keys and values; `decode_step(..., source=...)` then runs each decoder
layer's self-attention (cached as above), cross-attention over the source and feed-forward.
`translate` is beam search on it.

Positions are absolute per row (the count of real tokens the row has consumed), so a batch of
prompts of different lengths, left- or right-padded with a mask, decodes exactly as each prompt
alone: padding is never written to the cache and does not advance the position. Positions index
the positional table directly, so prompt length + new tokens must fit it (`max_len`, or the axial
table); this is checked when tracing. A cache shorter than that is fine (slides); with
`pos_embedding='none'` there is no limit.

Prompts: the training inputs start with id 0 (`train.decoder_inputs`), which is also PAD_ID, so
pass `prompt_mask` (True at real tokens, the leading 0 included) rather than letting ids decide.

Strategies (each one jitted, with `lax.while_loop` over steps and static shapes): `generate`
(greedy at temperature 0, temperature sampling, top-k, top-p), `beam_search`, and `mbr_decode`
(jitted sampling, then ROUGE-L selection on the host).

Cost: prompts are fed through the same `decode_step` as generated tokens, one position per loop
step (no parallel prefill yet), so a P-token prompt costs P steps of O(W) attention each; beam
search feeds the prompt to all K beam rows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from reformer_jax.attention import common, default_n_buckets, hash_vectors
from reformer_jax.data.tokenizer import EOS_ID, PAD_ID
from reformer_jax.layers import HASH, LayerNorm, feed_forward
from reformer_jax.model_config import ModelConfig
from reformer_jax.models import DECODER, ReformerEncoderDecoder


class LayerCache(NamedTuple):
  """One attention layer's ring buffer."""
  k: jax.Array        # [B, N, W, H] keys (unit-normalized for shared query/key)
  v: jax.Array        # [B, N, W, H] values
  pos: jax.Array      # [B, W] int32 absolute position of each slot, -1 when empty
  buckets: jax.Array | None  # [B, N, R, W] int32 LSH buckets (None for full/local)


class Cache(NamedTuple):
  """Decoding state of a `ReformerLM`: every leaf has the batch axis first."""
  length: jax.Array   # [B] int32 real tokens consumed per row (= the next token's position)
  layers: tuple[LayerCache, ...]


def position_limit(cfg: ModelConfig) -> int | None:
  """Positions the model can embed (None: unlimited)."""
  if cfg.pos_embedding == 'axial':
    return math.prod(cfg.axial[0])
  if cfg.pos_embedding == 'learned':
    return cfg.max_len
  return None


def layer_window(cfg: ModelConfig, layer: int, cache_len: int | None = None) -> int:
  """W, the slots of layer `layer`'s cache (see the module docstring)."""
  if cfg.attention_type(layer) == 'local':
    return (cfg.n_chunks_before + 1) * cfg.chunk_len
  return cache_len or position_limit(cfg) or cfg.max_len


def _n_buckets(cfg: ModelConfig, window: int):
  return cfg.n_buckets or default_n_buckets(window, min(cfg.chunk_len, window))


def init_cache(cfg: ModelConfig, batch: int, cache_len: int | None = None, *,
               layers: int | None = None) -> Cache:
  """An empty cache for `batch` rows; `cache_len` sets W of full and LSH layers. `layers`: the
  self-attention layers (default `cfg.n_layers`; an encoder-decoder's decoder has
  `cfg.decoder_layers`)."""
  caches = []
  for i in range(cfg.n_layers if layers is None else layers):
    w = layer_window(cfg, i, cache_len)
    kv = jnp.zeros((batch, cfg.n_heads, w, cfg.head_dim_), cfg.compute_dtype)
    buckets = (jnp.zeros((batch, cfg.n_heads, cfg.n_hashes, w), jnp.int32)
               if cfg.attention_type(i) == 'lsh' else None)
    caches.append(LayerCache(kv, kv, jnp.full((batch, w), -1, jnp.int32), buckets))
  return Cache(jnp.zeros((batch,), jnp.int32), tuple(caches))


def _hash_key(cfg: ModelConfig, hash_key: jax.Array | None) -> jax.Array | None:
  """The model-level key of the hash rotations (as `models._call_key` with train=False)."""
  if 'lsh' not in cfg.attention_types:
    return None
  if hash_key is not None:
    return hash_key
  if cfg.hash_seed is None:
    raise ValueError('decoding LSH layers needs fixed rotations: pass hash_key=<PRNG key> (the '
                     'rng= you would give ReformerLM.apply) or set ModelConfig.hash_seed')
  return jax.random.PRNGKey(cfg.hash_seed)


def _dense(cfg, p, x, features, axis=-1):
  return nn.DenseGeneral(features, axis=axis, use_bias=False, dtype=cfg.compute_dtype,
                         param_dtype=cfg.parameter_dtype).apply({'params': p}, x)


def _norm(cfg, p, x):
  return LayerNorm(cfg.compute_dtype, cfg.parameter_dtype).apply({'params': p}, x)


def _attention_step(cfg: ModelConfig, layer: int, p, h, lc: LayerCache, length, real, key):
  """One token of one self-attention layer: `h [B, 1, D]` normed input -> `[B, 1, D]`."""
  attention_type = cfg.attention_type(layer)
  features = (cfg.n_heads, cfg.head_dim_)
  shared = attention_type == 'lsh' or cfg.shared_qk
  q = _dense(cfg, p['qk' if shared else 'query'], h, features)[:, 0]  # [B, N, H]
  k = common.unit_normalize(q) if shared else _dense(cfg, p['key'], h, features)[:, 0]
  v = _dense(cfg, p['value'], h, features)[:, 0]
  width = lc.k.shape[2]
  slot = length % width  # ring buffer: each row writes its token at its own slot
  rows = jnp.arange(q.shape[0])
  keep = real[:, None, None, None]
  k_cache = jnp.where(keep, lc.k.at[rows, :, slot].set(k.astype(lc.k.dtype)), lc.k)
  v_cache = jnp.where(keep, lc.v.at[rows, :, slot].set(v.astype(lc.v.dtype)), lc.v)
  pos = jnp.where(real[:, None], lc.pos.at[rows, slot].set(length), lc.pos)
  k_valid = (pos >= 0)[:, None, :]  # [B, 1, W]
  if attention_type == 'local':
    first = (length // cfg.chunk_len - cfg.n_chunks_before) * cfg.chunk_len
    k_valid = k_valid & (pos >= first[:, None])[:, None, :]
  buckets = lc.buckets
  if attention_type == 'lsh':
    hashed = hash_vectors(q[:, :, None, :], jax.random.fold_in(key, HASH), cfg.n_hashes,
                          _n_buckets(cfg, width))  # [B, N, R, 1]
    buckets = jnp.where(keep, buckets.at[rows, :, :, slot].set(hashed[..., 0]), buckets)
    k_valid = k_valid & jnp.any(buckets == hashed, axis=2)  # [B, N, W]
  out, _ = common.masked_attend(
      q[:, :, None, :], k_cache, v_cache, q_pos=length[:, None, None], k_pos=pos[:, None, :],
      k_valid=k_valid[:, :, None, :], causal=True, shared_qk=shared and cfg.exclude_self,
      scale=1.0 if shared else cfg.head_dim_ ** -0.5)
  out = out.astype(v.dtype)[:, :, 0][:, None]  # [B, 1, N, H]
  out = _dense(cfg, p['out'], out, cfg.d_model, axis=(-2, -1))
  return out, LayerCache(k_cache, v_cache, pos, buckets)


class Source(NamedTuple):
  """An encoder-decoder's encoded source as its cross-attention layers read it: projected once,
  before decoding."""
  k: tuple[jax.Array, ...]   # per decoder layer, [B, N, S, H] keys
  v: tuple[jax.Array, ...]   # per decoder layer, [B, N, S, H] values
  mask: jax.Array            # [B, S] True at real source tokens


def encode_source(cfg: ModelConfig, params, src: jax.Array, src_mask: jax.Array) -> Source:
  """Encodes `[B, S]` source ids with a `ReformerEncoderDecoder(cfg)` and projects the result to
  every decoder layer's cross-attention keys and values."""
  model = ReformerEncoderDecoder(cfg)
  encoded = model.apply({'params': params}, src, src_mask=src_mask, method=model.encode)
  features = (cfg.n_heads, cfg.head_dim_)
  project = lambda p: _dense(cfg, p, encoded, features).transpose(0, 2, 1, 3)
  cross = [params['decoder'][f'cross_attention_{i}'] for i in range(cfg.decoder_layers)]
  return Source(tuple(project(p['key']) for p in cross), tuple(project(p['value']) for p in cross),
                src_mask)


def _cross_step(cfg: ModelConfig, p, h, k, v, mask):
  """One token of one cross-attention layer (`layers.CrossAttentionBlock`): `h [B, 1, D]` normed
  input, `k, v [B, N, S, H]` from `encode_source` -> `[B, 1, D]`."""
  q = _dense(cfg, p['query'], h, (cfg.n_heads, cfg.head_dim_)).transpose(0, 2, 1, 3)
  out, _ = common.masked_attend(q, k, v, q_pos=jnp.zeros((1,), jnp.int32),
                                k_pos=jnp.arange(k.shape[2]), k_valid=mask[:, None, None, :],
                                causal=False, shared_qk=False, scale=cfg.head_dim_ ** -0.5)
  out = out.astype(v.dtype).transpose(0, 2, 1, 3)  # [B, 1, N, H]
  return _dense(cfg, p['out'], out, cfg.d_model, axis=(-2, -1))


def _embed(cfg: ModelConfig, p, tokens, positions):
  """`[B]` ids at `[B]` positions -> `[B, 1, D]` (the model's `Embedding` at those positions)."""
  embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                   param_dtype=cfg.parameter_dtype)
  x = embed.apply({'params': p['tokens']}, tokens[:, None])
  if cfg.pos_embedding == 'axial':
    shape, _ = cfg.axial
    coords, rest = [], positions
    for size in reversed(shape):
      coords.append(rest % size)
      rest = rest // size
    coords.reverse()
    pos = jnp.concatenate([p['positions'][f'axis_{i}'][c] for i, c in enumerate(coords)], -1)
    x = x + pos[:, None].astype(x.dtype)
  elif cfg.pos_embedding == 'learned':
    x = x + p['positions'][positions][:, None].astype(x.dtype)
  return x


def _head(cfg: ModelConfig, params, x):
  x = _norm(cfg, params['head']['norm'], x)
  if cfg.tie_embeddings:
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                     param_dtype=cfg.parameter_dtype)
    logits = embed.apply({'params': params['embedding']['tokens']}, x, method='attend')
  else:
    logits = nn.Dense(cfg.vocab_size, dtype=cfg.compute_dtype,
                      param_dtype=cfg.parameter_dtype).apply({'params': params['head']['logits']}, x)
  return logits.astype(jnp.float32)


def decode_step(cfg: ModelConfig, params, cache: Cache, tokens: jax.Array, *,
                real: jax.Array | None = None, hash_key: jax.Array | None = None,
                source: Source | None = None) -> tuple[jax.Array, Cache]:
  """Feeds one token per row through a `ReformerLM`, or with `source` through the decoder of a
  `ReformerEncoderDecoder` (self-attention, cross-attention over the source, feed-forward).

  Args:
    cfg: the model's config.
    params: the model's `params` collection.
    cache: from `init_cache` or a previous step.
    tokens: `[B]` int ids.
    real: `[B]` booleans, False for rows whose token is padding (not cached, position kept).
    hash_key: the key LSH rotations derive from (as `rng=` of `ReformerLM.apply`); defaults to
      `PRNGKey(cfg.hash_seed)`.
    source: an encoder-decoder's `encode_source` (cache from `init_cache(...,
      layers=cfg.decoder_layers)`); None for a `ReformerLM`.
  Returns:
    `[B, V]` float32 next-token logits (meaningless where `real` is False) and the new cache.
  """
  real = jnp.ones(tokens.shape, bool) if real is None else real
  model_key = _hash_key(cfg, hash_key)
  stack_key = None if model_key is None else jax.random.fold_in(model_key, DECODER)
  dec = params['decoder']
  x = _embed(cfg, params['embedding'], tokens, cache.length)
  # Reversible: streams (a, b), each block reads b and gives (b, a + delta), as
  # `reversible._forward`; plain: one stream x -> x + delta. Either way a block reads streams[-1].
  streams = (x, x) if cfg.reversible else (x,)

  def add(streams, delta):
    return (streams[1], streams[0] + delta) if cfg.reversible else (streams[0] + delta,)

  layers = []
  per_layer = 2 if source is None else 3  # blocks per layer, in `models.Stack` order
  for i in range(len(cache.layers)):
    block_key = None if stack_key is None else jax.random.fold_in(stack_key, per_layer * i)
    ap, fp = dec[f'attention_{i}'], dec[f'feed_forward_{i}']
    delta, lc = _attention_step(cfg, i, ap['attention'], _norm(cfg, ap['norm'], streams[-1]),
                                cache.layers[i], cache.length, real, block_key)
    layers.append(lc)
    streams = add(streams, delta)
    if source is not None:
      cp = dec[f'cross_attention_{i}']
      streams = add(streams, _cross_step(cfg, cp, _norm(cfg, cp['norm'], streams[-1]),
                                         source.k[i], source.v[i], source.mask))
    ffp = {name: fp[name].astype(cfg.compute_dtype) for name in ('w1', 'b1', 'w2', 'b2')}
    streams = add(streams, feed_forward(ffp, _norm(cfg, fp['norm'], streams[-1])))
  x = (streams[0] + streams[1]) / 2 if cfg.reversible else streams[0]
  logits = _head(cfg, params, x)[:, 0]
  return logits, Cache(cache.length + real.astype(jnp.int32), tuple(layers))


def _check_positions(cfg: ModelConfig, total: int) -> None:
  limit = position_limit(cfg)
  if limit is not None and total > limit:
    raise ValueError(f'prompt length + new tokens = {total} exceeds the {limit} positions of the '
                     f'positional table: shorten the prompt (drop the oldest context) or ask for '
                     f'fewer new tokens')


def prefill(cfg: ModelConfig, params, prompt: jax.Array, prompt_mask: jax.Array | None = None,
            *, cache_len: int | None = None, hash_key: jax.Array | None = None
            ) -> tuple[jax.Array, Cache]:
  """Feeds `[B, P]` prompts (padding anywhere, marked False in `prompt_mask`) token by token.

  Returns the logits after each row's last real token `[B, V]` and the cache. Every row needs
  at least one real token.
  """
  batch, length = prompt.shape
  mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else prompt_mask.astype(bool)
  cache = init_cache(cfg, batch, cache_len)

  def body(carry, inputs):
    last, cache = carry
    tokens, real = inputs
    logits, cache = decode_step(cfg, params, cache, tokens, real=real, hash_key=hash_key)
    return (jnp.where(real[:, None], logits, last), cache), None

  last = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
  (last, cache), _ = jax.lax.scan(body, (last, cache), (prompt.T, mask.T))
  return last, cache


@functools.partial(jax.jit, static_argnames=('cfg', 'cache_len'))
def teacher_forced_logits(cfg: ModelConfig, params, tokens: jax.Array,
                          mask: jax.Array | None = None, *, cache_len: int | None = None,
                          hash_key: jax.Array | None = None) -> jax.Array:
  """`[B, L]` tokens fed one at a time through the cache -> `[B, L, V]` logits after each.

  The cached counterpart of `ReformerLM.apply` (tests compare the two; the benchmark times it).
  """
  batch = tokens.shape[0]
  real = jnp.ones(tokens.shape, bool) if mask is None else mask.astype(bool)

  def body(cache, inputs):
    t, r = inputs
    logits, cache = decode_step(cfg, params, cache, t, real=r, hash_key=hash_key)
    return cache, logits

  _, logits = jax.lax.scan(body, init_cache(cfg, batch, cache_len), (tokens.T, real.T))
  return logits.transpose(1, 0, 2)


def _stop_ids(eos_id: int | Sequence[int]) -> jax.Array:
  """`[S]` int32 ids that end a row (traced: changing them does not recompile, their count does)."""
  return jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32))


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature=1.0, top_k=0,
                  top_p=1.0) -> jax.Array:
  """`[B, V]` logits -> `[B]` ids: argmax at temperature 0, else a sample from
  `softmax(logits / temperature)` restricted to the `top_k` most likely ids (0: all) and to the
  smallest set of most likely ids whose probability reaches `top_p` (1.0: all).

  The three settings may be traced values, so one compiled decoder serves every setting.
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-30)
  order = jnp.argsort(-scaled, axis=-1)  # most likely first
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the more likely ids
  rank = jnp.arange(vocab)
  k = jnp.where(top_k > 0, top_k, vocab)
  keep_sorted = (rank < k) & ((before < top_p) | (rank == 0))  # the best id always stays
  choice = jax.random.categorical(rng, jnp.where(keep_sorted, sorted_logits, -jnp.inf), axis=-1)
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
  return jnp.where(temperature == 0.0, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)


def generate(cfg: ModelConfig, params, prompt: jax.Array, prompt_mask: jax.Array | None = None,
             *, max_new_tokens: int, rng: jax.Array | None = None, temperature=0.0,
             top_k=0, top_p=1.0, cache_len: int | None = None,
             hash_key: jax.Array | None = None, eos_id: int | Sequence[int] = EOS_ID,
             pad_id: int = PAD_ID) -> jax.Array:
  """Greedy (temperature 0) or sampled continuation of `[B, P]` prompts.

  Returns `[B, max_new_tokens]` ids: a row stops after its first `eos_id` (included) and is
  `pad_id` from there on. `eos_id` may be several ids, any of which stops a row (a dialogue model
  stops at EOS or where it starts the next speaker's label). The loop ends early once every row
  has stopped. One compilation per (cfg, prompt shape, max_new_tokens, cache_len): `temperature`,
  `top_k`, `top_p`, `eos_id` and `pad_id` are traced. Sampling needs `rng`; without one,
  `PRNGKey(0)` (greedy ignores it).
  """
  _check_positions(cfg, prompt.shape[1] + max_new_tokens)
  mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), _stop_ids(eos_id),
              jnp.int32(pad_id))
  return _generate(cfg, max_new_tokens, cache_len, params, jnp.asarray(prompt, jnp.int32), mask,
                   jax.random.PRNGKey(0) if rng is None else rng, _hash_key(cfg, hash_key),
                   settings)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(cfg, max_new_tokens, cache_len, params, prompt, mask, rng, hash_key, settings):
  """One `while_loop` over prompt and reply: step s < P feeds prompt column s (prefill), later
  steps feed the token drawn from the last real logits, so `decode_step` is compiled once."""
  temperature, top_k, top_p, eos_id, pad_id = settings
  batch, length = prompt.shape
  total = length + max_new_tokens

  def cond(carry):
    s, _, _, _, done = carry
    return (s < total) & ~((s >= length) & jnp.all(done))

  def body(carry):
    s, out, last, cache, done = carry
    in_prompt = s < length
    drawn = jax.lax.cond(
        in_prompt, lambda: jnp.zeros((batch,), jnp.int32),
        lambda: sample_logits(last, jax.random.fold_in(rng, s - length),
                              temperature=temperature, top_k=top_k, top_p=top_p))
    drawn = jnp.where(done, pad_id, drawn)
    column = jnp.minimum(s, length - 1)
    tokens = jnp.where(in_prompt, prompt[:, column], drawn)
    ended = done | (~in_prompt & jnp.isin(drawn, eos_id))
    real = jnp.where(in_prompt, mask[:, column], ~ended)  # an EOS is emitted, never fed
    out = jnp.where(in_prompt, out, out.at[:, s - length].set(drawn))
    logits, cache = decode_step(cfg, params, cache, tokens, real=real, hash_key=hash_key)
    last = jnp.where(real[:, None], logits, last)
    return s + 1, out, last, cache, ended

  carry = (jnp.int32(0), jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((batch, cfg.vocab_size), jnp.float32), init_cache(cfg, batch, cache_len),
           jnp.zeros((batch,), bool))
  return jax.lax.while_loop(cond, body, carry)[1]


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT length penalty `((5 + length) / 6) ** alpha` (Wu et al. 2016); 1 at alpha 0."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(cfg: ModelConfig, params, prompt: jax.Array, prompt_mask: jax.Array | None = None,
                *, beam_size: int, max_new_tokens: int, alpha=0.6,
                cache_len: int | None = None, hash_key: jax.Array | None = None,
                eos_id: int | Sequence[int] = EOS_ID, pad_id: int = PAD_ID):
  """Batched beam search over `[B, P]` prompts.

  K = `beam_size` hypotheses per row. Each step extends every unfinished hypothesis by every
  id; a finished one (it emitted `eos_id`) has a single extension, `pad_id` at no cost, so it
  keeps its score and length. The K best of the K * V candidates by `logp / length_penalty`
  (GNMT, `alpha`) survive: unfinished ones all have the same length, so among them this is the
  raw log probability; finished ones compete through the penalty. `eos_id` may be several ids
  (as for `generate`). The search stops when all K
  are finished or after `max_new_tokens`; with K = 1 it is greedy decoding.

  Returns:
    `(tokens [B, max_new_tokens], scores [B])` of the best hypothesis (`pad_id` after its EOS),
    and `(all_tokens [B, K, max_new_tokens], all_scores [B, K])`, best first.
  """
  _check_positions(cfg, prompt.shape[1] + max_new_tokens)
  if not 1 <= beam_size <= cfg.vocab_size:
    raise ValueError(f'beam_size must be in [1, vocab_size = {cfg.vocab_size}], got {beam_size}')
  mask = jnp.ones(prompt.shape, bool) if prompt_mask is None else jnp.asarray(prompt_mask, bool)
  settings = (jnp.float32(alpha), _stop_ids(eos_id), jnp.int32(pad_id))
  return _beam_search(cfg, beam_size, max_new_tokens, cache_len, params,
                      jnp.asarray(prompt, jnp.int32), mask, _hash_key(cfg, hash_key), settings)


def _beam_extend(last, logp, seqs, done, lengths, column, *, alpha, eos_id, pad_id):
  """One beam step: the K best extensions of each row's beams, and their parents.

  Args:
    last: `[B * K, V]` next-token logits of every beam (a row's beams adjacent).
    logp, done, lengths: `[B, K]` summed log probabilities, finished flags, reply lengths.
    seqs: `[B, K, T]` tokens so far; the chosen tokens are written at `column`.
  Returns:
    `(parent [B, K], tokens [B, K], logp, seqs, done, lengths)` after the step.
  """
  batch, k = logp.shape
  vocab = last.shape[-1]
  pad_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf)  # a finished beam's extension
  step = jax.nn.log_softmax(last).reshape(batch, k, vocab)
  step = jnp.where(done[..., None], pad_only, step)
  total = logp[..., None] + step  # [B, K, V]
  new_len = lengths + (~done).astype(jnp.int32)
  score = total / length_penalty(new_len, alpha)[..., None]
  _, flat = jax.lax.top_k(score.reshape(batch, k * vocab), k)  # [B, K]
  parent, tokens = flat // vocab, (flat % vocab).astype(jnp.int32)
  pick = lambda x: jnp.take_along_axis(x, parent, axis=1)
  logp = jnp.take_along_axis(total.reshape(batch, k * vocab), flat, axis=1)
  parent_done, lengths = pick(done), pick(new_len)
  tokens = jnp.where(parent_done, pad_id, tokens)
  seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1)
  seqs = seqs.at[:, :, column].set(tokens)
  return parent, tokens, logp, seqs, parent_done | jnp.isin(tokens, eos_id), lengths


def _tile_beams(tree, k: int):
  """`[B, ...]` leaves -> `[B * K, ...]`, each row repeated for its K beams (adjacent)."""
  return jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), tree)


def _from_parents(tree, parent: jax.Array):
  """`[B * K, ...]` beam rows (a row's beams adjacent) reordered so each beam takes its
  `parent [B, K]`'s row."""
  batch, k = parent.shape
  rows = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
  return jax.tree.map(lambda x: x[rows], tree)


def _best_first(logp, seqs, lengths, alpha):
  """Sorts each row's K hypotheses by length-penalized score: `(best, all)` as beam search returns."""
  scores = logp / length_penalty(lengths, alpha)
  order = jnp.argsort(-scores, axis=1)
  seqs = jnp.take_along_axis(seqs, order[..., None], axis=1)
  scores = jnp.take_along_axis(scores, order, axis=1)
  return (seqs[:, 0], scores[:, 0]), (seqs, scores)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _beam_search(cfg, k, max_new_tokens, cache_len, params, prompt, mask, hash_key, settings):
  """Like `_generate`, one `while_loop` over prompt and reply on B * K cache rows (the prompt
  is fed to every beam's row: K times the prefill work, one compiled `decode_step`)."""
  alpha, eos_id, pad_id = settings
  batch, length = prompt.shape
  vocab = cfg.vocab_size
  prompt, mask = _tile_beams((prompt, mask), k)
  own_rows = jnp.arange(batch * k).reshape(batch, k) % k

  def cond(carry):
    s, _, _, _, _, done, _ = carry
    return (s < length + max_new_tokens) & ~((s >= length) & jnp.all(done))

  def select(last, logp, seqs, done, lengths, s):
    return _beam_extend(last, logp, seqs, done, lengths, s - length, alpha=alpha, eos_id=eos_id,
                        pad_id=pad_id)

  def body(carry):
    s, last, cache, logp, seqs, done, lengths = carry
    in_prompt = s < length
    parent, tokens, logp, seqs, done, lengths = jax.lax.cond(
        in_prompt, lambda *a: (own_rows, jnp.zeros((batch, k), jnp.int32), *a[1:5]), select,
        last, logp, seqs, done, lengths, s)
    cache, last = _from_parents((cache, last), parent)
    column = jnp.minimum(s, length - 1)
    fed = jnp.where(in_prompt, prompt[:, column], tokens.reshape(-1))
    real = jnp.where(in_prompt, mask[:, column], ~done.reshape(-1))
    logits, cache = decode_step(cfg, params, cache, fed, real=real, hash_key=hash_key)
    last = jnp.where(real[:, None], logits, last)
    return s + 1, last, cache, logp, seqs, done, lengths

  # Only beam 0 starts alive, so the first step does not pick K copies of one extension.
  logp = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (batch, 1))
  carry = (jnp.int32(0), jnp.zeros((batch * k, vocab), jnp.float32),
           init_cache(cfg, batch * k, cache_len), logp,
           jnp.full((batch, k, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch, k), bool),
           jnp.zeros((batch, k), jnp.int32))
  _, _, _, logp, seqs, _, lengths = jax.lax.while_loop(cond, body, carry)
  return _best_first(logp, seqs, lengths, alpha)


def translate(cfg: ModelConfig, params, src: jax.Array, src_mask: jax.Array | None = None, *,
              beam_size: int = 4, max_len: int, alpha=0.6, eos_id: int | Sequence[int] = EOS_ID,
              pad_id: int = PAD_ID):
  """Beam search with a `ReformerEncoderDecoder(cfg)` over `[B, S]` source ids.

  The source is encoded, and projected to each layer's cross-attention keys and values, once
  (`encode_source`); the decoder then runs one token per step through `decode_step`'s cache
  (the target starts with the shifted-in id 0, as in training) and extends the beams as
  `beam_search` does (GNMT length penalty `alpha`, EOS ends a hypothesis). K = 1 is greedy.

  Returns:
    `(tokens [B, max_len], scores [B])` of the best hypothesis (`pad_id` after its EOS), and
    `(all_tokens [B, K, max_len], all_scores [B, K])`, best first.
  """
  if max_len > cfg.max_len:
    raise ValueError(f'translate: max_len={max_len} exceeds the model\'s max_len={cfg.max_len}')
  if not 1 <= beam_size <= cfg.vocab_size:
    raise ValueError(f'beam_size must be in [1, vocab_size = {cfg.vocab_size}], got {beam_size}')
  src = jnp.asarray(src, jnp.int32)
  mask = src != pad_id if src_mask is None else jnp.asarray(src_mask, bool)
  settings = (jnp.float32(alpha), _stop_ids(eos_id), jnp.int32(pad_id))
  return _translate(cfg, beam_size, max_len, params, src, mask, settings)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _translate(cfg, k, max_len, params, src, src_mask, settings):
  alpha, eos_id, pad_id = settings
  batch = src.shape[0]
  source = _tile_beams(encode_source(cfg, params, src, src_mask), k)

  def cond(carry):
    t, _, _, _, _, done, _ = carry
    return (t < max_len) & ~jnp.all(done)

  def body(carry):
    t, fed, cache, logp, seqs, done, lengths = carry
    last, cache = decode_step(cfg, params, cache, fed, source=source)
    parent, tokens, logp, seqs, done, lengths = _beam_extend(
        last, logp, seqs, done, lengths, t, alpha=alpha, eos_id=eos_id, pad_id=pad_id)
    cache = _from_parents(cache, parent)
    return t + 1, tokens.reshape(-1), cache, logp, seqs, done, lengths

  # Only beam 0 starts alive, so the first step does not pick K copies of one extension.
  logp = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (batch, 1))
  carry = (jnp.int32(0), jnp.zeros((batch * k,), jnp.int32),  # the shifted-in start id 0
           init_cache(cfg, batch * k, max_len, layers=cfg.decoder_layers), logp,
           jnp.full((batch, k, max_len), pad_id, jnp.int32), jnp.zeros((batch, k), bool),
           jnp.zeros((batch, k), jnp.int32))
  _, _, _, logp, seqs, _, lengths = jax.lax.while_loop(cond, body, carry)
  return _best_first(logp, seqs, lengths, alpha)


def mbr_select(texts: Sequence[str]) -> int:
  """Index of the minimum-Bayes-risk text: the highest mean ROUGE-L F1 against the others.

  ROUGE-L comes from Google's `rouge-score` package, on host strings. Ties go to the first.
  """
  from rouge_score import rouge_scorer  # host-side, only needed here
  scorer = rouge_scorer.RougeScorer(['rougeL'])
  n = len(texts)
  if n == 0:
    raise ValueError('mbr_select: no candidate texts')
  sim = np.zeros((n, n))
  for i in range(n):
    for j in range(i + 1, n):
      sim[i, j] = sim[j, i] = scorer.score(texts[i], texts[j])['rougeL'].fmeasure
  return int(np.argmax(sim.sum(axis=1)))


def mbr_decode(cfg: ModelConfig, params, prompt: jax.Array, decode_fn, *, n_samples: int,
               max_new_tokens: int, rng: jax.Array, prompt_mask: jax.Array | None = None,
               temperature=1.0, top_k=0, top_p=1.0, cache_len: int | None = None,
               hash_key: jax.Array | None = None, eos_id: int | Sequence[int] = EOS_ID):
  """Minimum Bayes risk decoding of one `[P]` prompt over `n_samples` sampled replies.

  Args:
    decode_fn: ids -> text (e.g. the tokenizer's `decode`, which drops PAD and EOS).
    eos_id: the id or ids that end a sample (as for `generate`).
  Returns:
    `(best_text, texts, samples)`: the chosen text, all sampled texts, and `[n_samples, T]` ids.
  """
  prompts = jnp.tile(jnp.asarray(prompt)[None], (n_samples, 1))
  masks = None if prompt_mask is None else jnp.tile(jnp.asarray(prompt_mask)[None], (n_samples, 1))
  samples = np.asarray(generate(cfg, params, prompts, masks, max_new_tokens=max_new_tokens,
                                rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
                                cache_len=cache_len, hash_key=hash_key, eos_id=eos_id))
  texts = [decode_fn(row.tolist()) for row in samples]
  return texts[mbr_select(texts)], texts, samples
