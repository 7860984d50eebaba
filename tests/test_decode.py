"""Cached decoding against full recomputation, and the decoding strategies against each other."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax import decode
from reformer_jax.attention import common
from reformer_jax.layers import HASH
from reformer_jax.model_config import ModelConfig
from reformer_jax.models import DECODER, ReformerEncoderDecoder, ReformerLM

BASE = ModelConfig(vocab_size=32, d_model=32, d_ff=64, n_heads=2, n_layers=2, max_len=32,
                   chunk_len=8, n_hashes=2, n_buckets=4)
TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 32), 2, 32)


@functools.lru_cache(maxsize=None)
def _params(cfg):
  init = jax.jit(lambda t: ReformerLM(cfg).init(jax.random.PRNGKey(1), t, rng=jax.random.PRNGKey(2)))
  return init(TOKENS)['params']


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg):
  return jax.jit(lambda params, t, rng: ReformerLM(cfg).apply({'params': params}, t, rng=rng))


def _apply(cfg, params, tokens, rng=None):
  return _jitted_apply(cfg)(params, tokens, rng)


def _tv(a, b):
  """Mean total-variation distance between the next-token distributions of two logit arrays."""
  return float(0.5 * jnp.abs(jax.nn.softmax(a) - jax.nn.softmax(b)).sum(-1).mean())


@pytest.mark.parametrize('changes', [
    dict(attention_types=('full', 'local'), reversible=True),
    dict(attention_types=('full',), exclude_self=False),
    dict(attention_types=('local', 'full'), reversible=False, shared_qk=False,
         tie_embeddings=True, pos_embedding='learned'),
])
def test_cached_logits_equal_full_recomputation(changes):
  """32 tokens through chunk_len 8: the local cache (16 slots) slides twice and stays exact."""
  cfg = BASE.replace(**changes)
  params = _params(cfg)
  cached = decode.teacher_forced_logits(cfg, params, TOKENS)
  np.testing.assert_allclose(cached, _apply(cfg, params, TOKENS), atol=2e-5, rtol=1e-5)


def test_full_cache_slides_past_its_size():
  """A full-attention cache of 8 slots: exact while the context fits, then a sliding window in
  which tokens that slid out of every layer's reach no longer matter (not a wipe: the others do)."""
  cfg = BASE.replace(attention_types=('full',), reversible=False)
  params = _params(cfg)
  run = lambda t: decode.teacher_forced_logits(cfg, params, t, cache_len=8)
  base = run(TOKENS)
  np.testing.assert_allclose(base[:, :8], _apply(cfg, params, TOKENS)[:, :8], atol=2e-5)
  assert bool(jnp.all(jnp.isfinite(base)))
  changed = run(TOKENS.at[:, 0].set(TOKENS[:, 0] % 30 + 2))
  # Two layers of 8-token windows: token 0 reaches positions up to 2 * 8 - 2 = 14.
  assert not np.allclose(changed[:, 1:15], base[:, 1:15])
  np.testing.assert_allclose(changed[:, 15:], base[:, 15:], atol=1e-6)


def _bucket_union_reference(cfg, params, tokens, key, window):
  """One plain LSH layer with every query attending to the keys of the last `window` tokens
  that share a bucket with it in any round: the documented semantics of the LSH cache, computed
  densely over the sequence."""
  p, dec = params, params['decoder']
  length = tokens.shape[1]
  table = p['embedding']['tokens']['embedding']
  coords = (jnp.arange(length) // cfg.axial[0][1], jnp.arange(length) % cfg.axial[0][1])
  pos_emb = jnp.concatenate([p['embedding']['positions'][f'axis_{i}'][c]
                             for i, c in enumerate(coords)], -1)
  x = table[tokens] + pos_emb

  def norm(q, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * q['scale'] + q['bias']

  ap = dec['attention_0']['attention']
  h = norm(dec['attention_0']['norm'], x)
  qk = jnp.einsum('bld,dnh->bnlh', h, ap['qk']['kernel'])
  v = jnp.einsum('bld,dnh->bnlh', h, ap['value']['kernel'])
  block_key = jax.random.fold_in(jax.random.fold_in(key, DECODER), 0)
  buckets = decode.hash_vectors(qk, jax.random.fold_in(block_key, HASH), cfg.n_hashes,
                                cfg.n_buckets)  # [B, N, R, L]
  share = jnp.any(buckets[..., :, None] == buckets[..., None, :], axis=2)  # [B, N, L, L]
  share = share & (jnp.arange(length)[:, None] - jnp.arange(length)[None, :] < window)
  out, _ = common.masked_attend(qk, common.unit_normalize(qk), v, q_pos=jnp.arange(length),
                                k_pos=jnp.arange(length), k_valid=share, causal=True,
                                shared_qk=True, scale=1.0)
  x = x + jnp.einsum('bnlh,nhd->bld', out, ap['out']['kernel'])
  fp = dec['feed_forward_0']
  h = jax.nn.gelu(norm(fp['norm'], x) @ fp['w1'] + fp['b1']) @ fp['w2'] + fp['b2']
  x = norm(p['head']['norm'], x + h)
  return x @ p['head']['logits']['kernel'] + p['head']['logits']['bias']


@pytest.mark.parametrize('cache_len', [None, 8])
def test_lsh_cache_is_bucket_union_attention(cache_len):
  """Exact, with the cache holding the whole sequence and with 8 slots sliding past 32 tokens."""
  cfg = BASE.replace(attention_types=('lsh',), n_layers=1, reversible=False)
  params = _params(cfg)
  key = jax.random.PRNGKey(7)
  cached = decode.teacher_forced_logits(cfg, params, TOKENS, hash_key=key, cache_len=cache_len)
  reference = jax.jit(_bucket_union_reference, static_argnums=(0, 4))(
      cfg, params, TOKENS, key, cache_len or TOKENS.shape[1])
  np.testing.assert_allclose(cached, reference, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('reversible', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_lsh_cache_is_as_close_to_recomputation_as_rehashing(reversible):
  """Closeness for LSH: the cached next-token distributions differ from recomputing the whole
  sequence with the same rotations (mean total variation) by at most 1.5x what recomputing
  with other rotations differs by, i.e. the cache's approximation is within LSH's own noise.
  Projections are scaled up so attention is sharp and the comparison is not trivial."""
  cfg = BASE.replace(attention_types=('lsh',), reversible=reversible)
  params = jax.tree.map(lambda w: 3 * w if w.ndim == 3 else w, _params(cfg))
  k0, k1 = jax.random.PRNGKey(10), jax.random.PRNGKey(11)
  recomputed = _apply(cfg, params, TOKENS, k0)
  cached = decode.teacher_forced_logits(cfg, params, TOKENS, hash_key=k0)
  rehashed = _apply(cfg, params, TOKENS, k1)
  noise = _tv(recomputed, rehashed)
  assert noise > 0.02  # attention matters at this scale
  assert _tv(cached, recomputed) < 1.5 * noise
  # The first chunk hashes identically in both: position 0 sees only itself in either.
  np.testing.assert_allclose(cached[:, 0], recomputed[:, 0], atol=2e-5)


MIXED = BASE.replace(attention_types=('lsh', 'local', 'full'), n_layers=3, hash_seed=0)


def test_batched_prompts_of_different_lengths_equal_one_at_a_time():
  """Left- and right-padded batches (one compiled decoder) against each prompt alone."""
  cfg = MIXED
  params = _params(cfg)
  prompts = [TOKENS[0, :5], TOKENS[1, :11]]
  alone = [decode.generate(cfg, params, p[None], max_new_tokens=6)[0] for p in prompts]
  width = 11
  for side in ('left', 'right'):
    rows, masks = [], []
    for p in prompts:
      pad = width - len(p)
      rows.append(jnp.pad(p, (pad, 0) if side == 'left' else (0, pad)))
      masks.append(jnp.arange(width) >= pad if side == 'left' else jnp.arange(width) < len(p))
    out = decode.generate(cfg, params, jnp.stack(rows), jnp.stack(masks), max_new_tokens=6)
    for i in range(2):
      np.testing.assert_array_equal(out[i], alone[i])


# Strategy tests share one compiled `generate`: batch 2, prompt 6, 8 new tokens, no mask.
STRATEGY = BASE.replace(attention_types=('lsh', 'local'), hash_seed=0)
PROMPT = TOKENS[:, :6]
NEW = 8


def test_beam_of_one_and_near_zero_temperature_equal_greedy():
  cfg, params = STRATEGY, _params(STRATEGY)
  compiled_before = decode._generate._cache_size()  # pylint: disable=protected-access
  greedy = decode.generate(cfg, params, PROMPT, max_new_tokens=NEW)
  (beam, _), _ = decode.beam_search(cfg, params, PROMPT, beam_size=1, max_new_tokens=NEW)
  np.testing.assert_array_equal(beam, greedy)
  for temperature, top_k in ((1e-6, 0), (1.0, 1)):
    sampled = decode.generate(cfg, params, PROMPT, max_new_tokens=NEW, rng=jax.random.PRNGKey(3),
                              temperature=temperature, top_k=top_k)
    np.testing.assert_array_equal(sampled, greedy)
  warm = decode.generate(cfg, params, PROMPT, max_new_tokens=NEW, rng=jax.random.PRNGKey(3),
                         temperature=1.0)
  assert not np.array_equal(warm, greedy)
  # Settings are traced: greedy and every sampling setting share one compilation.
  assert decode._generate._cache_size() - compiled_before <= 1  # pylint: disable=protected-access


def test_generation_stops_at_eos():
  cfg, params = STRATEGY, _params(STRATEGY)
  greedy = decode.generate(cfg, params, PROMPT, max_new_tokens=NEW)
  eos = int(greedy[0, 2])
  first = int(jnp.argmax(greedy[0] == eos))  # its first occurrence, at index <= 2
  stopped = decode.generate(cfg, params, PROMPT, max_new_tokens=NEW, eos_id=eos)
  np.testing.assert_array_equal(stopped[0, :first + 1], greedy[0, :first + 1])
  assert bool(jnp.all(stopped[0, first + 1:] == decode.PAD_ID))
  # Several stop ids (EOS and a speaker label's first piece): the first one drawn ends the row.
  either = decode.generate(cfg, params, PROMPT, max_new_tokens=NEW, eos_id=(-1, eos))
  np.testing.assert_array_equal(either, stopped)


def test_top_k_and_top_p_restrict_the_support():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 256))
  sample = jax.jit(lambda k, t, top_k, top_p: decode.sample_logits(
      logits, k, temperature=t, top_k=top_k, top_p=top_p))
  key = jax.random.PRNGKey(0)
  support = lambda *args: set(np.asarray(sample(key, *args)).tolist())
  assert support(1.0, 2, 1.0) == {0, 1}
  assert support(1.0, 0, 0.6) == {0, 1}  # 0.5 < 0.6 <= 0.8
  assert support(1.0, 0, 0.4) == {0}
  assert support(1.0, 0, 1.0) == {0, 1, 2, 3}
  assert support(0.0, 0, 1.0) == {0}


def test_beam_search_scores_are_the_sequences_log_probabilities():
  """With no length penalty a beam's score is its log probability under the model, recomputed
  here by teacher forcing: checks the cache follows each beam's parent."""
  cfg, params = STRATEGY, _params(STRATEGY)
  _, (seqs, scores) = decode.beam_search(cfg, params, PROMPT, beam_size=3, max_new_tokens=NEW,
                                         alpha=0.0, eos_id=-1)
  assert bool(jnp.all(scores[:, :-1] >= scores[:, 1:]))  # best first
  full = jnp.concatenate([jnp.repeat(PROMPT, 3, axis=0), seqs.reshape(6, NEW)], axis=1)
  logp = jax.nn.log_softmax(decode.teacher_forced_logits(cfg, params, full))
  picked = jnp.take_along_axis(logp[:, 5:-1], full[:, 6:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(picked.sum(-1), scores.reshape(6), atol=1e-4)


def test_beam_search_ends_hypotheses_at_eos():
  cfg, params = STRATEGY, _params(STRATEGY)
  (_, _), (seqs, _) = decode.beam_search(cfg, params, PROMPT, beam_size=3, max_new_tokens=NEW,
                                         eos_id=int(PROMPT[0, 0]))
  for row in np.asarray(seqs).reshape(-1, NEW):
    ends = np.flatnonzero(row == int(PROMPT[0, 0]))
    if ends.size:
      assert np.all(row[ends[0] + 1:] == decode.PAD_ID)


def test_mbr_returns_one_of_its_samples():
  cfg, params = STRATEGY, _params(STRATEGY)
  best, texts, samples = decode.mbr_decode(
      cfg, params, PROMPT[0], lambda ids: ' '.join(f'w{i}' for i in ids if i > 1),
      n_samples=2, max_new_tokens=NEW, rng=jax.random.PRNGKey(5))
  assert samples.shape == (2, NEW) and len(texts) == 2
  assert best in texts
  assert decode.mbr_select(['a b c', 'x y z', 'a b d']) in (0, 2)
  assert decode.mbr_select(['a b c d', 'a b c e', 'q r s t', 'a b c d']) in (0, 3)


def test_too_long_for_the_positional_table_is_a_clear_error():
  with pytest.raises(ValueError, match='positional table'):
    decode.generate(STRATEGY, _params(STRATEGY), TOKENS[:, :30], max_new_tokens=NEW)


def test_decode_speed_script_contract(tmp_path):
  from experiments import decode_speed
  out = tmp_path / 'speed.json'
  result = decode_speed.main([
      '--contexts', '32', '--attention', 'local', '--new-tokens', '2', '--d-model', '16',
      '--d-ff', '16', '--heads', '1', '--layers', '1', '--chunk-len', '16', '--vocab', '16',
      '--repeats', '1', '--out', str(out)])
  (point,) = result['points']
  assert point['context'] == 32 and point['cached_tokens_per_s'] > 0
  assert point['speedup'] == point['cached_tokens_per_s'] / point['recomputed_tokens_per_s']
  assert out.exists() and out.with_suffix('.png').read_bytes()[:4] == b'\x89PNG'


def _translation_model(**changes):
  cfg = ModelConfig(vocab_size=13, d_model=16, d_ff=32, n_heads=2, n_layers=1, n_decoder_layers=1,
                    max_len=8, attention_types=('full',), shared_qk=False,
                    pos_embedding='learned').replace(**changes)
  model = ReformerEncoderDecoder(cfg)
  src = jnp.array([[3, 4, 5, 1, 0, 0], [7, 1, 0, 0, 0, 0]], jnp.int32)
  params = model.init(jax.random.PRNGKey(0), src, jnp.zeros((2, 8), jnp.int32),
                      src_mask=src != 0)['params']
  return cfg, model, params, src


def test_translate_beam_one_is_greedy_and_beams_score_their_sequences():
  """`translate`: K = 1 equals greedy decoding by full recomputation, and every hypothesis's
  score is its log probability under the model over the GNMT length penalty."""
  cfg, model, params, src = _translation_model()
  (greedy, _), _ = decode.translate(cfg, params, src, beam_size=1, max_len=8)
  prefix = np.zeros((2, 8), np.int32)
  for t in range(8):  # greedy by recomputation, rows stop after EOS
    logits = model.apply({'params': params}, src, jnp.asarray(prefix), src_mask=src != 0)
    step = np.asarray(jnp.argmax(logits[:, t], -1))
    if t + 1 < 8:
      prefix[:, t + 1] = step
    ended = (np.asarray(greedy)[:, :t] == 1).any(axis=1)
    np.testing.assert_array_equal(np.asarray(greedy)[~ended, t], step[~ended])
  (_, best), (seqs, scores) = decode.translate(cfg, params, src, beam_size=3, max_len=8, alpha=0.0)
  assert seqs.shape == (2, 3, 8) and float(best[0]) == float(scores[0, 0])
  for b in range(2):
    for j in range(3):
      tokens = np.asarray(seqs[b, j])
      n = int(np.argmax(tokens == 1)) + 1 if (tokens == 1).any() else 8
      tgt = np.zeros((1, 8), np.int32)
      tgt[0, 1:n] = tokens[:n - 1][:7]
      logp = jax.nn.log_softmax(model.apply({'params': params}, src[b:b + 1], jnp.asarray(tgt),
                                            src_mask=src[b:b + 1] != 0))
      total = float(sum(logp[0, t, tokens[t]] for t in range(n)))
      np.testing.assert_allclose(float(scores[b, j]), total, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('reversible', [True, False], ids=['reversible', 'standard'])
def test_cached_translation_decoder_equals_full_recomputation(reversible):
  """`decode_step` with an `encode_source` source: a target fed one token at a time gives the
  logits of `ReformerEncoderDecoder.apply` on the whole target (two decoder layers, so the
  reversible streams alternate through three blocks a layer; a padded source)."""
  cfg, model, params, src = _translation_model(n_decoder_layers=2, reversible=reversible)
  tgt = jnp.array([[0, 5, 6, 7, 2, 3, 9, 4], [0, 8, 1, 0, 0, 0, 0, 0]], jnp.int32)
  full = model.apply({'params': params}, src, tgt, src_mask=src != 0)
  source = decode.encode_source(cfg, params, src, src != 0)
  cache = decode.init_cache(cfg, 2, 8, layers=cfg.decoder_layers)
  assert len(cache.layers) == 2
  for t in range(8):
    logits, cache = decode.decode_step(cfg, params, cache, tgt[:, t], source=source)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, t]), rtol=1e-5, atol=1e-5)
