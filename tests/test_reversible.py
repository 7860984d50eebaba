"""The reversible stack: gradients against plain autodiff, the inverse, check_grads, replay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from reformer_jax import reversible
from reformer_jax.layers import AttentionBlock, CrossAttentionBlock, FeedForwardBlock
from reformer_jax.model_config import ModelConfig
from reformer_jax.models import _pure_block

CFG = ModelConfig(vocab_size=16, d_model=16, d_ff=32, n_heads=2, max_len=32, chunk_len=8,
                  n_hashes=2, dropout=0.1)


def _blocks(cfg, attention_types, cross=False, seed=0):
  """Pure residual functions, parameters and keys of a small real stack (LSH, dropout on)."""
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, 32, cfg.d_model))
  context = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 8, cfg.d_model))
  modules = []
  for t in attention_types:
    modules.append(AttentionBlock(cfg, t, causal=True))
    if cross:
      modules.append(CrossAttentionBlock(cfg))
    modules.append(FeedForwardBlock(cfg))
  keys = [jax.random.fold_in(jax.random.PRNGKey(42), i) for i in range(len(modules))]
  params = [m.init(jax.random.PRNGKey(i), x, context=context, key=k)['params']
            for i, (m, k) in enumerate(zip(modules, keys))]
  fns = [_pure_block(m, train=True) for m in modules]
  return fns, params, keys, x, (context if cross else None)


@pytest.mark.parametrize('cross,ff_chunk_len,keep_last', [(False, 0, 0), (True, 0, 0),
                                                       (False, 8, 1), (False, 0, 1),
                                                       (True, 0, 2)])
def test_reversible_gradients_equal_autodiff(cross, ff_chunk_len, keep_last):
  """ff_chunk_len: the feed-forward blocks are per-position, rebuilt and differentiated in
  place a chunk at a time. keep_last: the last functions keep their forward activations (a
  chunked one does not)."""
  types = ('full',) if cross else ('lsh', 'local')
  fns, params, keys, x, context = _blocks(CFG.replace(ff_chunk_len=ff_chunk_len), types,
                                          cross=cross)
  assert all(getattr(f, 'chunk_len', 0) == ff_chunk_len for f in fns[1::2])
  consts = {'mask': None, 'context_mask': None}
  cot = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  @jax.jit
  def grads(params, x, context):
    def loss(params, x, context, memory_efficient):
      y1, y2, _ = reversible.reversible_stack(fns, params, x, x, keys=keys, context=context,
                                              consts=consts, memory_efficient=memory_efficient,
                                              keep_last=keep_last)
      return jnp.sum(jnp.tanh(y1) * cot) + jnp.sum(y2 * y2)
    argnums = (0, 1, 2) if cross else (0, 1)
    return [jax.value_and_grad(loss, argnums)(params, x, context, m) for m in (True, False)]

  (value_rev, grad_rev), (value_ref, grad_ref) = grads(params, x, context)
  np.testing.assert_allclose(value_rev, value_ref, rtol=1e-6)
  flat_rev, tree_rev = jax.tree.flatten(grad_rev)
  flat_ref, tree_ref = jax.tree.flatten(grad_ref)
  assert tree_rev == tree_ref
  for a, b in zip(flat_rev, flat_ref):
    # Rebuilt activations differ from stored ones by float32 rounding only.
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))
  assert any(float(jnp.abs(a).max()) > 0 for a in flat_rev)


def test_per_position_chunks_equal_the_whole_block():
  """A chunked feed-forward block's `chunk` gives the whole block's output (dropout masks
  included) at the chunk's positions."""
  fns, params, keys, x, _ = _blocks(CFG.replace(ff_chunk_len=8), ('lsh',))
  ff, p, key = fns[1], params[1], keys[1]
  whole, _ = ff(p, x, None, None, key, None)
  chunks = [ff.chunk(p, x[:, 8 * i:8 * (i + 1)], None, None, key, i) for i in range(4)]
  np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), whole, atol=1e-6)
  assert float(jnp.mean(whole == 0)) > 0.05  # dropout is on


def test_inverse_rebuilds_the_inputs():
  fns, params, keys, x, _ = _blocks(CFG, ('lsh', 'full'))
  x2 = x * 0.5 + 1.0
  y1, y2, replays = reversible.reversible_stack(fns, params, x, x2, keys=keys)
  r1, r2 = reversible.reversible_inverse(fns, params, y1, y2, keys=keys, replays=replays)
  np.testing.assert_allclose(r1, x, atol=1e-5)
  np.testing.assert_allclose(r2, x2, atol=1e-5)
  assert not np.allclose(y1, x, atol=1e-2)  # the stack did something


def test_backward_replays_forward_buckets():
  """With buckets recomputed in the backward pass, float error could flip an argmax; replaying
  the forward's buckets keeps the gradient exactly that of the forward computation."""
  fns, params, keys, x, _ = _blocks(CFG, ('lsh',))
  calls = []

  def spy(p, xx, ctx, consts, key, replay, fn=fns[0]):
    calls.append(replay is None)
    return fn(p, xx, ctx, consts, key, replay)

  jax.jit(jax.grad(lambda p: jnp.sum(reversible.reversible_stack(
      [spy, fns[1]], p, x, x, keys=keys)[1])))(params)
  assert calls == [True, False]  # forward hashes, backward reuses


def test_check_grads_on_the_reversible_vjp():
  """Finite differences in float64 against the custom VJP, with context and replay data."""
  def residual(p, x, context, consts, key, replay):
    gate = jax.random.uniform(key, x.shape[-1:], x.dtype)  # stands in for dropout
    delta = jnp.tanh(x @ p['w'] + context['bias']) * gate * consts['scale']
    return delta, jnp.argmax(x, -1) if replay is None else replay

  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = [{'w': jnp.asarray(rng.normal(size=(6, 6)) / 3)} for _ in range(3)]
    keys = [jax.random.PRNGKey(i) for i in range(3)]
    context = {'bias': jnp.asarray(rng.normal(size=(6,)))}
    consts = {'scale': jnp.asarray(0.7)}
    x1, x2 = jnp.asarray(rng.normal(size=(2, 4, 6))), jnp.asarray(rng.normal(size=(2, 4, 6)))

    def f(params, x1, x2, context):
      y1, y2, _ = reversible.reversible_stack([residual] * 3, params, x1, x2, keys=keys,
                                              context=context, consts=consts)
      return jnp.concatenate([y1, y2], -1)

    check_grads(f, (params, x1, x2, context), order=1, modes=['rev'])


def test_mismatched_arguments_are_reported():
  fns, params, keys, x, _ = _blocks(CFG, ('full',))
  with pytest.raises(ValueError, match='one of each per function'):
    reversible.reversible_stack(fns, params[:1], x, x, keys=keys)


def test_kept_functions_skip_their_backward_rebuild():
  """`keep_last`: the kept functions run once (forward), the others twice (forward and the
  backward pass's rebuild); a chunked function is never kept."""
  fns, params, keys, x, _ = _blocks(CFG, ('lsh', 'local'))
  calls = []

  def counted(i):
    def f(p, xx, ctx, consts, key, replay):
      calls.append(i)
      return fns[i](p, xx, ctx, consts, key, replay)
    return f

  counted_fns = [counted(i) for i in range(len(fns))]
  for keep, once in ((0, set()), (1, {3}), (2, {2, 3})):
    calls.clear()
    jax.jit(jax.grad(lambda p: jnp.sum(reversible.reversible_stack(
        counted_fns, p, x, x, keys=keys, keep_last=keep)[1])))(params)
    assert {i for i in range(4) if calls.count(i) == 1} == once, (keep, calls)
  assert reversible._kept(fns, 2, 32) == 2
  chunked, *_ = _blocks(CFG.replace(ff_chunk_len=8), ('lsh',))
  assert reversible._kept(chunked, 2, 32) == 0  # the chunked feed-forward ends the stack


@pytest.mark.parametrize('period', [None, 2])
def test_first_functions_read_the_kept_inputs(period):
  """The first two functions' inputs are the stack's own, kept rather than rebuilt. Here the
  second function's output dwarfs x2 (f_2 = 1e5 * y1), so a rebuilt x2 = y2 - f_2(y1) keeps few
  of its digits, and the first function's parameter gradient (which reads x2) with them; the
  kept x2 gives autodiff's gradient. With `period` 2 the first group runs after the scan over
  the others (whose functions add zero here, so their rebuilds are exact)."""
  scale = lambda p, x, ctx, consts, key, replay: (p * x, None)
  n = 2 if period is None else 4
  params = [jnp.float32(v) for v in (0.7, 1e5, 0.0, 0.0)[:n]]
  keys = [jax.random.PRNGKey(i) for i in range(n)]
  x1, x2 = (1e-3 * jax.random.normal(jax.random.PRNGKey(s), (2, 64, 8)) for s in (1, 2))
  cot = jax.random.normal(jax.random.PRNGKey(3), x1.shape)

  def grads(memory_efficient):
    def loss(params):
      y1, y2, _ = reversible.reversible_stack([scale] * n, params, x1, x2, keys=keys,
                                              memory_efficient=memory_efficient, period=period)
      return jnp.sum(y1 * cot) + jnp.sum(y2 * cot)
    return jax.jit(jax.grad(loss))(params)

  rev, ref = grads(True), grads(False)
  for a, b in zip(rev, ref):
    np.testing.assert_allclose(a, b, rtol=1e-5)


LSH_LOCAL, LSH = ('lsh', 'local', 'lsh', 'local'), ('lsh',) * 4


@pytest.mark.parametrize('memory_efficient,keep_last,types,period', [
    (True, 0, LSH_LOCAL, 4), (False, 0, LSH_LOCAL, 4), (True, 2, LSH, 2), (True, 1, LSH, 2)])
def test_scanned_stack_equals_unrolled(memory_efficient, keep_last, types, period):
  """`period`: the stack as a scan over groups of blocks gives the unrolled stack's values,
  replays and gradients (keep_last 2: a scan over the first three groups, the fourth kept; 1:
  a scan over three groups, one function unrolled, one kept)."""
  fns, params, keys, x, _ = _blocks(CFG, types)
  cot = jax.random.normal(jax.random.PRNGKey(9), x.shape)

  @jax.jit
  def run(params, x):
    out = []
    for stack_period in (None, period):
      def loss(params, x):
        y1, y2, replays = reversible.reversible_stack(fns, params, x, x * 0.5, keys=keys,
                                                      memory_efficient=memory_efficient,
                                                      period=stack_period,
                                                      keep_last=keep_last)
        return jnp.sum(jnp.tanh(y1) * cot) + jnp.sum(y2 * y2), replays
      out.append(jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x))
    return out

  ((value, replays), grads), ((value_s, replays_s), grads_s) = run(params, x)
  scanned = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(reversible.reversible_stack(
      fns, p, x, x, keys=keys, period=period, keep_last=keep_last)[1])))(params)
  assert 'scan' in str(scanned)  # the kept tail does not unroll the scanned groups
  # Scan and unrolled stack fuse (and round) differently: float32 rounding only.
  np.testing.assert_allclose(value_s, value, rtol=1e-5)
  assert len(replays_s) == 8 and replays_s[1] is None and replays_s[0] is not None
  for a, b in zip(jax.tree.leaves(replays_s), jax.tree.leaves(replays)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(grads_s) == jax.tree.structure(grads)
  for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(jnp.abs(b).max())))
