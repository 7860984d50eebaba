"""The compiled CPU chunk kernel (attention/chunk_attention.cc) against the XLA chunk step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax import lsh_attention
from reformer_jax.attention import common, cpu_kernel, lsh

needs_compiler = pytest.mark.skipif(cpu_kernel._compiler() is None,  # pylint: disable=protected-access
                                    reason='no C++ compiler to build the kernel')


def _uses_kernel(fn, *args) -> bool:
  return cpu_kernel.FORWARD in jax.jit(fn).lower(*args).as_text()


def _chunk_inputs(n_chunks, before, after, chunk=16, dim=16, dim_v=32):
  """Unsorted rows, two rounds of sorted slots (each a permutation of the positions) and the
  inverse permutation, masks and cotangents."""
  batch, heads = 2, 2
  keys = jax.random.split(jax.random.PRNGKey(n_chunks), 6)
  length = n_chunks * chunk // 2
  qk_t = jax.random.normal(keys[0], (batch, heads, length, dim))
  v_t = jax.random.normal(keys[1], (batch, heads, length, dim_v))
  pos = jax.vmap(lambda k: jax.random.permutation(k, length))(
      jax.random.split(keys[2], batch * heads * 2)).reshape(batch, heads, 2 * length)
  slot = pos + length * (jnp.arange(2 * length) // length)  # round-major slot of each sorted one
  undo_idx = jnp.argsort(slot, axis=-1).astype(jnp.int32)
  q_pos = pos.reshape(batch, heads, n_chunks, chunk)
  k_valid = common.neighbour_valid(n_chunks, n_chunks // 2, chunk, before, after)
  pad = jax.random.bernoulli(keys[3], 0.8, (batch, heads, n_chunks, chunk))
  k_valid = k_valid & common.look_around(pad, before, after)
  d_out = jax.random.normal(keys[4], (batch, heads, n_chunks, chunk, dim_v))
  d_lse = jax.random.normal(keys[5], q_pos.shape)
  return qk_t, v_t, q_pos, undo_idx, k_valid, d_out, d_lse


@needs_compiler
@pytest.mark.parametrize('n_chunks,causal,before,after', [
    (6, True, 1, 0),     # one block per row: every window wraps within it
    (38, True, 1, 0),    # two blocks per row (19 chunks each): the halo pass joins them
    (38, False, 1, 1),
    (70, True, 2, 0),    # four blocks of 17 or 18
    (38, False, 0, 0)])  # no neighbours
def test_kernel_equals_xla_chunk_step(n_chunks, causal, before, after):
  qk_t, v_t, q_pos, undo_idx, k_valid, d_out, d_lse = _chunk_inputs(n_chunks, before, after)
  assert cpu_kernel.applies(qk_t, v_t, q_pos.shape[-1], before, after)  # builds and registers it
  # Rows whose keys are all masked (padding amid padding) attend uniformly in the kernel, while
  # XLA's float32 logsumexp of -1e9 logits loses the log(K) and gives each key probability 1.
  # Neither reaches a loss: such queries are padding, whose outputs get no gradient.
  live = jnp.broadcast_to(jnp.any(lsh._chunk_masks(q_pos, k_valid, before, after, causal)[1], -1),  # pylint: disable=protected-access
                          q_pos.shape)
  assert float(live.mean()) > 0.5
  d_out, d_lse = d_out * live[..., None], d_lse * live

  kernel = lambda a, b: lsh.attend_sorted_chunks(a, b, q_pos, undo_idx, k_valid, before, after,
                                                  causal)
  xla = lambda a, b: lsh.attend_chunks(*lsh._sorted_chunks(a, b, q_pos), q_pos, k_valid, before,  # pylint: disable=protected-access
                                       after, causal)

  def results(attend):
    def run(a, b):
      (out, lse), vjp = jax.vjp(attend, a, b)
      return (out, lse, *vjp((d_out, d_lse)))
    assert _uses_kernel(run, qk_t, v_t) == (attend is kernel)
    return jax.jit(run)(qk_t, v_t)

  got, want = results(kernel), results(xla)
  live = np.asarray(live)
  # Outside differentiation the kernel keeps no probabilities: the same outputs.
  primal = jax.jit(kernel)(qk_t, v_t)
  for a, b in zip(primal, got[:2]):
    np.testing.assert_array_equal(np.asarray(a)[live], np.asarray(b)[live])
  for name, a, b in zip(['out', 'lse', 'd_qk', 'd_v'], got, want):
    a, b = np.asarray(a), np.asarray(b)
    if name in ('out', 'lse'):
      a, b = a[live], b[live]
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=name)


@needs_compiler
@pytest.mark.parametrize('causal', [False, True])
def test_lsh_attention_with_the_kernel_equals_xla(monkeypatch, causal):
  """The whole LSH attention (hash, sort, chunk step, unsort, rounds) and its gradients."""
  batch, length, heads, dim = 2, 256, 2, 16
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  qk, v, cot = (jax.random.normal(k, (batch, length, heads, dim)) for k in keys)
  mask = jnp.arange(length)[None, :] < jnp.array([[length], [length * 3 // 4]])
  cot = cot * mask[:, :, None, None]
  attend = functools.partial(lsh_attention, rng=jax.random.PRNGKey(5), n_hashes=2, n_buckets=8,
                             chunk_len=16, causal=causal, mask=mask)

  results = {}
  for mode in ('1', '0'):
    def run(qk, v):
      out, vjp = jax.vjp(attend, qk, v)
      return (out, *vjp(cot))
    monkeypatch.setenv(cpu_kernel.ENV, mode)
    assert _uses_kernel(run, qk, v) == (mode == '1')
    results[mode] = jax.jit(run)(qk, v)
  valid = np.asarray(mask)[:, :, None, None]
  for got, want in zip(results['1'], results['0']):
    np.testing.assert_allclose(np.asarray(got) * valid, np.asarray(want) * valid, rtol=2e-5,
                               atol=2e-5)


@needs_compiler
def test_bucket_sort_equals_xla_sort():
  """The counting sort against XLA's sort: every round's positions by bucket, ties in position
  order, padding's bucket last; its inverse permutation and positions."""
  total_buckets, n_hashes, length = 12, 3, 40
  buckets = jax.random.randint(jax.random.PRNGKey(6), (2, 3, n_hashes, length), 0,
                               total_buckets + 1)  # total_buckets: padding's bucket
  assert cpu_kernel.available()
  got = jax.jit(lambda b: cpu_kernel.bucket_sort(b, total_buckets + 1))(buckets)
  want = lsh._xla_sort_slots(buckets, total_buckets=total_buckets)  # pylint: disable=protected-access
  for name, a, b in zip(('sort_idx', 'undo_idx', 'pos'), got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  # Stable: within a bucket, positions ascend.
  slots = np.asarray(got[0]).reshape(2, 3, n_hashes, length)
  keys = np.take_along_axis(np.asarray(buckets), slots % length, axis=-1)
  assert (np.diff(keys, axis=-1) >= 0).all()
  with pytest.raises(Exception, match='outside'):
    jax.block_until_ready(cpu_kernel.bucket_sort(buckets, total_buckets))  # too few keys


@needs_compiler
@pytest.mark.parametrize('m,k,n', [(37, 24, 19), (5, 40, 64)])  # rows split / columns split
def test_blas_matmul_equals_xla(m, k, n):
  """`cpu_kernel.matmul` (OpenBLAS, in parts over XLA's pool) with every transpose flag."""
  assert cpu_kernel.matmul_applies(jnp.zeros((2, 2)), jnp.zeros((2, 2)))  # builds it
  a = jax.random.normal(jax.random.PRNGKey(7), (m, k))
  b = jax.random.normal(jax.random.PRNGKey(8), (k, n))
  want = np.asarray(a) @ np.asarray(b)
  for trans_a in (False, True):
    for trans_b in (False, True):
      got = jax.jit(lambda a, b: cpu_kernel.matmul(a, b, trans_a, trans_b))(  # pylint: disable=cell-var-from-loop
          a.T if trans_a else a, b.T if trans_b else b)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5,
                                 err_msg=f'trans_a={trans_a} trans_b={trans_b}')
  assert not cpu_kernel.matmul_applies(a.astype(jnp.bfloat16), b)  # float32 only
  assert not cpu_kernel.matmul_applies(a[None], b)  # 2-D only


def test_kernel_applies_only_where_it_can(monkeypatch):
  monkeypatch.setenv(cpu_kernel.ENV, '0')
  x = jnp.zeros((1, 1, 64, 16))
  assert not cpu_kernel.applies(x, x, 16, 1, 0)
  monkeypatch.setenv(cpu_kernel.ENV, 'auto')
  if cpu_kernel._compiler() is not None:  # pylint: disable=protected-access
    assert cpu_kernel.applies(x, x, 16, 1, 0)
  assert not cpu_kernel.applies(x.astype(jnp.bfloat16), x, 16, 1, 0)  # float32 only
  assert not cpu_kernel.applies(x, x, 8, 1, 0)  # chunk not a multiple of 16
  assert not cpu_kernel.applies(jnp.zeros((1, 1, 64, 8)), x, 16, 1, 0)  # head width
  assert not cpu_kernel.applies(x, jnp.zeros((1, 1, 64, 8)), 16, 1, 0)  # value width
  assert not cpu_kernel.applies(x, x, 16, 16, 0)  # 17 chunks a window
  monkeypatch.setenv(cpu_kernel.ENV, 'yes')
  with pytest.raises(ValueError, match=cpu_kernel.ENV):
    cpu_kernel.mode()


def test_a_failed_build_falls_back_to_xla_or_raises_when_required(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv('REFORMER_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setattr(cpu_kernel, '_load', cpu_kernel._load.__wrapped__)  # pylint: disable=protected-access
  x = jnp.zeros((1, 1, 64, 16))
  monkeypatch.setenv(cpu_kernel.ENV, 'auto')
  assert not cpu_kernel.applies(x, x, 16, 1, 0)
  assert 'XLA version' in caplog.text
  monkeypatch.setenv(cpu_kernel.ENV, '1')
  with pytest.raises(RuntimeError, match='cannot be built'):
    cpu_kernel.applies(x, x, 16, 1, 0)
  # The OpenBLAS product alike.
  monkeypatch.setattr(cpu_kernel, '_load_blas', cpu_kernel._load_blas.__wrapped__)  # pylint: disable=protected-access
  a = jnp.zeros((4, 4))
  monkeypatch.setenv(cpu_kernel.ENV, 'auto')
  assert not cpu_kernel.matmul_applies(a, a)
  assert "XLA's dot" in caplog.text
  monkeypatch.setenv(cpu_kernel.ENV, '1')
  with pytest.raises(RuntimeError, match='OpenBLAS matrix product cannot be built'):
    cpu_kernel.matmul_applies(a, a)
