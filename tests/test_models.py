"""Whole models: causality, padding, bfloat16, randomness, diagnostics and config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax.model_config import ModelConfig
from reformer_jax.models import ReformerEncoderDecoder, ReformerLM

BASE = ModelConfig(vocab_size=32, d_model=32, d_ff=64, n_heads=2, n_layers=2, max_len=64,
                   chunk_len=16, n_hashes=2)
TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 64), 1, 32)


def _lm(cfg):
  model = ReformerLM(cfg)
  params = model.init(jax.random.PRNGKey(1), TOKENS, rng=jax.random.PRNGKey(2))['params']
  return model, params


@pytest.mark.parametrize('types,reversible', [(('full', 'local'), True), (('local',), False)])
def test_model_is_causal(types, reversible):
  model, params = _lm(BASE.replace(attention_types=types, reversible=reversible))
  apply = jax.jit(lambda tokens: model.apply({'params': params}, tokens))
  base = apply(TOKENS)
  for j in (5, 33):
    changed = apply(TOKENS.at[:, j].set((TOKENS[:, j] + 1) % 32))
    np.testing.assert_allclose(changed[:, :j], base[:, :j], atol=1e-6)
    assert not np.allclose(changed[:, j:], base[:, j:])


def test_padding_influences_nothing():
  """Left padding in a causal LM: every real token can see the pads unless they are masked."""
  model, params = _lm(BASE.replace(attention_types=('lsh', 'full', 'local'), n_layers=3))
  mask = jnp.arange(64)[None, :] >= jnp.array([[0], [20]])  # row 1: 20 pads on the left
  apply = jax.jit(lambda tokens: model.apply({'params': params}, tokens, mask=mask,
                                             rng=jax.random.PRNGKey(3)))
  base = apply(TOKENS)
  other = apply(jnp.where(mask, TOKENS, (TOKENS * 7 + 3) % 32))
  np.testing.assert_allclose(other[1, 20:], base[1, 20:], atol=1e-5)
  np.testing.assert_allclose(other[0], base[0], atol=1e-5)
  unmasked = jax.jit(lambda tokens: model.apply({'params': params}, tokens,
                                                rng=jax.random.PRNGKey(3)))
  assert not np.allclose(unmasked(TOKENS)[1, 20:], unmasked(other_tokens := jnp.where(
      mask, TOKENS, (TOKENS * 7 + 3) % 32))[1, 20:])
  del other_tokens


def _loss(model, params, tokens, rng):
  logits = model.apply({'params': params}, tokens, rng=rng, train=True)
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def test_bfloat16_compute_is_finite_and_close_to_float32():
  cfg = BASE.replace(attention_types=('lsh', 'local'))
  model32, params = _lm(cfg)
  model16 = ReformerLM(cfg.replace(dtype='bfloat16'))
  rng = jax.random.PRNGKey(4)
  grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)
  loss32, g32 = grad(model32, params, TOKENS, rng)
  loss16, g16 = grad(model16, params, TOKENS, rng)
  assert np.isfinite(float(loss16))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g16))
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))  # float32 parameters
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=0.03)


def test_randomness_is_explicit():
  cfg = BASE.replace(attention_types=('lsh',), dropout=0.1)
  model, params = _lm(cfg)
  apply = jax.jit(lambda rng, train: model.apply({'params': params}, TOKENS, rng=rng,
                                                 train=train), static_argnums=1)
  k1, k2 = jax.random.PRNGKey(5), jax.random.PRNGKey(6)
  np.testing.assert_array_equal(apply(k1, True), apply(k1, True))
  assert not np.allclose(apply(k1, True), apply(k2, True))  # fresh hashes and dropout per step
  with pytest.raises(ValueError, match='pass rng='):
    model.apply({'params': params}, TOKENS)
  seeded = ReformerLM(cfg.replace(hash_seed=0))
  eval_apply = jax.jit(lambda rng: seeded.apply({'params': params}, TOKENS, rng=rng))
  np.testing.assert_array_equal(eval_apply(k1), eval_apply(k2))  # fixed rotations in eval
  seeded.apply({'params': params}, TOKENS[:, :32])  # no rng needed with a hash seed


def test_bucket_balance_is_reported_per_lsh_layer():
  model, params = _lm(BASE.replace(attention_types=('lsh', 'full', 'lsh'), n_layers=3))
  _, state = model.apply({'params': params}, TOKENS, rng=jax.random.PRNGKey(0),
                         mutable=['diagnostics'])
  balance = state['diagnostics']['decoder']['bucket_balance']
  assert balance.shape == (2,)
  n_buckets = 8  # 2 * 64 / 16
  assert bool(jnp.all((balance >= 1.0) & (balance <= n_buckets)))


def test_encoder_decoder_shapes_gradients_and_causal_decoder():
  # Encoder: full then LSH; decoder: one full layer (LSH's sort would let a later target
  # token move chunk boundaries, which is not a leak but breaks this exact check).
  cfg = BASE.replace(attention_types=('full', 'lsh'), n_decoder_layers=1)
  model = ReformerEncoderDecoder(cfg)
  src, tgt = TOKENS, TOKENS[:, :32]
  src_mask = jnp.arange(64)[None, :] < jnp.array([[64], [40]])
  rng = jax.random.PRNGKey(1)
  params = model.init(jax.random.PRNGKey(0), src, tgt, src_mask=src_mask, rng=rng)['params']
  apply = jax.jit(lambda s, t: model.apply({'params': params}, s, t, src_mask=src_mask, rng=rng))
  logits = apply(src, tgt)
  assert logits.shape == (2, 32, 32) and logits.dtype == jnp.float32
  changed = apply(src, tgt.at[:, 10].set(0))
  np.testing.assert_allclose(changed[:, :10], logits[:, :10], atol=1e-6)
  # Source padding is invisible to the decoder.
  padded = apply(src.at[1, 40:].set(5), tgt)
  np.testing.assert_allclose(padded[1], logits[1], atol=1e-5)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.apply({'params': p}, src, tgt,
                                                          src_mask=src_mask, rng=rng) ** 2)))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads['encoder']['attention_1']['attention']['qk']['kernel']).max()) > 0


@pytest.mark.parametrize('changes,message', [
    (dict(max_len=1000, chunk_len=64), 'max_len 1000 is not a multiple of chunk_len 64: use max_len 1024'),
    (dict(n_buckets=7), 'n_buckets must be an even int'),
    (dict(attention_types=('lsh', 'flash')), "attention_types has 'flash'"),
    (dict(d_model=30, n_heads=4), 'd_model 30 is not divisible by n_heads 4'),
    (dict(axial_shape=(4, 8)), r'axial_shape \(4, 8\) covers 32 positions, fewer than max_len 64'),
    (dict(axial_dims=(8, 8)), 'axial_dims .* sum to 16, not d_model 32'),
    (dict(shared_qk=False), "shared_qk=False cannot be used with 'lsh'"),
    (dict(exclude_self=False), r"exclude_self=False needs shared_qk=True and full attention in "
                               r"every layer \(got shared_qk=True, attention_types=\('lsh',\)\)"),
    (dict(exclude_self=False, attention_types=('full',), shared_qk=False),
     'exclude_self=False needs shared_qk=True'),
    (dict(ff_chunk_len=24), 'ff_chunk_len 24 must be 0 .off. or divide max_len 64'),
    (dict(keep_last=-1), 'keep_last must be an int >= 0, got -1: 0 recomputes every function'),
    (dict(dtype='float8'), "dtype 'float8' is not one of"),
])
def test_config_errors_name_the_field_and_fix(changes, message):
  with pytest.raises(ValueError, match=message):
    BASE.replace(**changes)


def test_unknown_config_fields_and_long_inputs_are_rejected():
  with pytest.raises(ValueError, match=r"unknown fields \['n_layer'\]"):
    ModelConfig.from_dict({'n_layer': 3})
  assert ModelConfig.from_dict({'attention_types': ['lsh', 'full']}).attention_types == ('lsh', 'full')
  model, params = _lm(BASE.replace(attention_types=('full',)))
  with pytest.raises(ValueError, match='input length 128 exceeds max_len 64'):
    model.apply({'params': params}, jnp.zeros((1, 128), jnp.int32))
  model, params = _lm(BASE)
  with pytest.raises(ValueError, match='length 40 is not a multiple of chunk_len 16'):
    model.apply({'params': params}, jnp.zeros((1, 40), jnp.int32), rng=jax.random.PRNGKey(0))


def test_memory_bounded_paths_equal_the_default(monkeypatch):
  """Long-sequence paths forced at a small size: the stack as a scan over layers, per-token
  layers in chunks of positions, LSH layers by groups of heads and query-chunk steps, the loss
  in chunks: the default's loss and gradients."""
  from reformer_jax import layers, models, train
  from reformer_jax.attention import lsh
  cfg = ModelConfig(vocab_size=32, d_model=32, d_ff=64, n_heads=4, n_layers=2, max_len=64,
                    chunk_len=8, n_hashes=2, ff_chunk_len=16)
  model = ReformerLM(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 64), 1, 32)
  mask = jnp.arange(64)[None, :] < jnp.array([[64], [50]])
  weights = mask.astype(jnp.float32)
  params = model.init(jax.random.PRNGKey(1), tokens, rng=jax.random.PRNGKey(2))['params']

  def loss_and_grads():
    def loss(p):
      features = model.apply({'params': p}, tokens, mask=mask, rng=jax.random.PRNGKey(3),
                             train=True, method=ReformerLM.features)
      sums = train.chunked_token_sums(
          lambda x: model.apply({'params': p}, x, method=ReformerLM.logits), features,
          jnp.roll(tokens, -1, axis=1), weights)
      return sums['loss'] / sums['weight']
    return jax.jit(jax.value_and_grad(loss))(params)

  value, grads = loss_and_grads()
  logits = model.apply({'params': params}, tokens, mask=mask, rng=jax.random.PRNGKey(3),
                       train=True)
  sums = train.token_sums(logits, jnp.roll(tokens, -1, axis=1), weights)
  np.testing.assert_allclose(value, sums['loss'] / sums['weight'], rtol=1e-6)

  monkeypatch.setattr(models, 'SCAN_STREAM_BYTES', 0)               # the stack as a scan
  monkeypatch.setattr(layers, 'TOKEN_CHUNK_BYTES', 4 * 2 * 16 * 32)  # 4 chunks of 16 positions
  monkeypatch.setattr(lsh, 'SINGLE_PASS_LOGITS_BYTES', 0)
  monkeypatch.setattr(lsh, 'HEAD_GROUP_BYTES', 0)                    # one head at a time
  monkeypatch.setattr(lsh, 'QUERY_GROUP_LOGITS_BYTES', 4 * 2 * 8 * 16)  # steps of one chunk
  monkeypatch.setattr(train, 'LOSS_LOGITS_BYTES', 0)
  monkeypatch.setattr(train, 'LOSS_CHUNK_BYTES', 4 * 2 * 16 * 32)    # 4 chunks
  assert lsh.attention_groups(2, 64, 4, 8, 2, 8, 16) == (1, 16)
  assert layers.token_chunks(2, 64, 32) == 4
  value_b, grads_b = loss_and_grads()
  np.testing.assert_allclose(value_b, value, rtol=1e-5)
  # Float32 sums in another order, through the reversible rebuild: rounding-level differences.
  for a, b in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=5e-5 * max(1.0, float(jnp.abs(b).max())))


def test_every_projection_and_the_head_go_through_layers_matmul():
  """On CPU (one device, kernels built) the projections, feed-forward products and the LM head
  are OpenBLAS products (`layers.matmul`): no XLA dot is left in the forward pass but the
  hashing rotations."""
  from reformer_jax.attention import cpu_kernel  # pylint: disable=import-outside-toplevel
  cfg = BASE.replace(n_layers=1)
  model = ReformerLM(cfg)
  tokens = jnp.ones((1, 64), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), tokens, rng=jax.random.PRNGKey(1))['params']
  if not cpu_kernel.matmul_applies(jnp.zeros((2, 2)), jnp.zeros((2, 2))):
    pytest.skip('no OpenBLAS product here (no compiler, several devices or switched off)')
  hlo = jax.jit(lambda p, t: model.apply({'params': p}, t, rng=jax.random.PRNGKey(1))).lower(
      params, tokens).as_text()
  assert hlo.count(f'@{cpu_kernel.MATMUL}(') == 6, hlo  # qk, v, out, two feed-forward, head
