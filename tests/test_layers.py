"""Chunked feed-forward and axial positional embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reformer_jax import layers
from reformer_jax.attention import cpu_kernel
from reformer_jax.layers import AxialPositionalEmbedding, feed_forward, layer_norm, map_positions


def _ff_params(d=16, f=64, seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return {'w1': jax.random.normal(k[0], (d, f)) / 4, 'b1': jax.random.normal(k[1], (f,)),
          'w2': jax.random.normal(k[2], (f, d)) / 8, 'b2': jax.random.normal(k[3], (d,))}


def test_chunked_feed_forward_equals_unchunked_values_and_gradients():
  params = _ff_params()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 16))

  @jax.jit
  def run(params, x):
    outs = []
    for chunk_len in (0, 8):
      loss = lambda p, x: jnp.sum(jnp.sin(feed_forward(p, x, chunk_len=chunk_len)))
      outs.append((feed_forward(params, x, chunk_len=chunk_len),
                   jax.grad(loss, (0, 1))(params, x)))
    return outs

  (y, g), (y_chunked, g_chunked) = run(params, x)
  np.testing.assert_allclose(y_chunked, y, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_chunked_feed_forward_bounds_backward_memory():
  params = _ff_params(d=32, f=512)
  x = jnp.ones((1, 4096, 32))

  def temp_bytes(chunk_len):
    grad = jax.grad(lambda p, x: jnp.sum(feed_forward(p, x, chunk_len=chunk_len)), (0, 1))
    return jax.jit(grad).lower(params, x).compile().memory_analysis().temp_size_in_bytes

  # The unchunked backward keeps [4096, 512] hidden activations (8 MB); chunks of 256 do not.
  assert temp_bytes(256) < 0.4 * temp_bytes(0)


@pytest.mark.parametrize('mode', ['0', 'auto'])
def test_feed_forward_products_are_plain_products(monkeypatch, mode):
  """The products run over flattened tokens (`layers.matmul`). With XLA's dots, each weight
  gradient contracts one axis and XLA:CPU makes no transposed `[F, B * L]` copy of the hidden
  gradient (over `[B, L, .]` einsums it did, and ran those products at a third of the GEMM
  rate); with the OpenBLAS product (CPU, where it builds) no dot is left."""
  from reformer_jax.train import backend_options  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(cpu_kernel.ENV, mode)
  params = _ff_params(d=32, f=128)
  x = jnp.ones((1, 512, 32))
  grad = jax.grad(lambda p, x: jnp.sum(jnp.sin(feed_forward(p, x))), (0, 1))
  hlo = jax.jit(grad, compiler_options=backend_options() or None).lower(
      params, x).compile().as_text()
  dots = [line for line in hlo.splitlines() if ' dot(' in line]
  blas = [line for line in hlo.splitlines() if cpu_kernel.MATMUL in line and 'custom-call' in line]
  if mode == 'auto' and cpu_kernel.matmul_applies(x[0], x[0].T):
    assert not dots and len(blas) == 6, hlo  # two forward products, their input and weight grads
    return
  assert not blas and len(dots) >= 4, hlo
  assert all('lhs_contracting_dims={' in d and ',' not in d.split('lhs_contracting_dims={')[1]
             .split('}')[0] for d in dots), dots
  transposed = [line for line in hlo.splitlines() if '= f32[128,512]' in line]
  assert not transposed, transposed


@pytest.mark.parametrize('mode', ['0', 'auto'])
@pytest.mark.parametrize('t,f,d', [(24, 64, 16), (37, 16, 64)])
def test_matmul_gradients_equal_autodiff(monkeypatch, mode, t, f, d):
  monkeypatch.setenv(cpu_kernel.ENV, mode)
  x = jax.random.normal(jax.random.PRNGKey(0), (t, f))
  w = jax.random.normal(jax.random.PRNGKey(1), (f, d))
  cot = jax.random.normal(jax.random.PRNGKey(2), (t, d))
  ours = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(layers.matmul(x, w) * cot), (0, 1)))(
      x, w)
  ref = jax.value_and_grad(lambda x, w: jnp.sum((x @ w) * cot), (0, 1))(x, w)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_feed_forward_dropout_uses_the_key():
  params = _ff_params()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 16))
  a = feed_forward(params, x, chunk_len=8, rate=0.5, key=jax.random.PRNGKey(0))
  b = feed_forward(params, x, chunk_len=8, rate=0.5, key=jax.random.PRNGKey(0))
  c = feed_forward(params, x, chunk_len=8, rate=0.5, key=jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  with pytest.raises(ValueError, match='not a multiple of ff_chunk_len'):
    feed_forward(params, x, chunk_len=12)


def test_axial_positions_factorize_and_slice():
  module = AxialPositionalEmbedding(shape=(4, 8), dims=(6, 10))
  params = module.init(jax.random.PRNGKey(0), 32)
  assert sum(p.size for p in jax.tree.leaves(params)) == 4 * 6 + 8 * 10
  full = module.apply(params, 32)
  assert full.shape == (32, 16)
  np.testing.assert_array_equal(module.apply(params, 11), full[:11])
  table0, table1 = params['params']['axis_0'], params['params']['axis_1']
  # Position 8 * r + c is [row r of axis 0, row c of axis 1].
  np.testing.assert_array_equal(full[8 * 2 + 5], jnp.concatenate([table0[2], table1[5]]))
  assert len(np.unique(np.asarray(full), axis=0)) == 32
  with pytest.raises(ValueError, match='exceeds axial_shape'):
    module.apply(params, 33)


def test_per_position_layers_in_chunks_equal_the_whole_sequence():
  """LayerNorm inside the chunked feed-forward, and `map_positions`: same values and gradients."""
  params = _ff_params()
  norm = {'scale': jnp.linspace(0.5, 1.5, 16), 'bias': jnp.linspace(-1, 1, 16)}
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 16)) * 3 + 1
  w = jax.random.normal(jax.random.PRNGKey(2), (16, 4, 8))

  def project(x, norm, w):  # a per-position function with two outputs
    h = layer_norm(norm, x, x.dtype)
    return jnp.einsum('bld,dnh->blnh', h, w), jnp.tanh(h)

  @jax.jit
  def run(params, norm, w, x):
    outs = []
    for chunks in (1, 4):
      ff = lambda p, n, x: feed_forward(p, x, chunk_len=32 // chunks, norm=n)
      mapped = lambda n, w, x: map_positions(lambda c: project(c, n, w), x, chunks)
      outs.append((ff(params, norm, x), mapped(norm, w, x),
                   jax.grad(lambda *a: jnp.sum(jnp.sin(ff(*a))), (0, 1, 2))(params, norm, x),
                   jax.grad(lambda *a: sum(jnp.sum(jnp.sin(o)) for o in mapped(*a)),
                            (0, 1, 2))(norm, w, x)))
    return outs

  whole, chunked = run(params, norm, w, x)
  np.testing.assert_allclose(whole[0], feed_forward(params, layer_norm(norm, x, x.dtype)),
                             atol=1e-5)
  for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_gelu_gradient_equals_autodiff():
  x = jnp.linspace(-6.0, 6.0, 1001)
  np.testing.assert_array_equal(layers.gelu(x), jax.nn.gelu(x))
  got = jax.grad(lambda x: (layers.gelu(x) * jnp.cos(x)).sum())(x)
  want = jax.grad(lambda x: (jax.nn.gelu(x) * jnp.cos(x)).sum())(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  xb = x.astype(jnp.bfloat16)
  assert jax.grad(lambda x: layers.gelu(x).sum())(xb).dtype == jnp.bfloat16
