"""Attention kernels against full attention, causality, masks, gradients and memory."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from reformer_jax import full_attention, local_attention, lsh_attention
from reformer_jax.attention import bucket_balance, common, hash_vectors
from reformer_jax.attention.lsh import attend_chunks, default_n_buckets, gather_rounds, permute

B, L, N, H = 2, 32, 2, 8


def _inputs(seed=0, length=L, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  qk = jax.random.normal(k1, (B, length, N, H), dtype)
  v = jax.random.normal(k2, (B, length, N, H), dtype)
  mask = jnp.arange(length)[None, :] < jnp.array([[length], [length * 3 // 4]])
  return qk, v, mask


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('n_hashes', [1, 2, 3, 4])
def test_lsh_with_one_chunk_equals_full_shared_qk(causal, n_hashes):
  qk, v, mask = _inputs()
  valid = mask[:, :, None, None]
  cot = jax.random.normal(jax.random.PRNGKey(3), qk.shape) * valid

  @jax.jit
  def outputs_and_grads(qk, v):
    lsh = lambda a, b: lsh_attention(a, b, rng=jax.random.PRNGKey(7), n_hashes=n_hashes,
                                     chunk_len=L, causal=causal, mask=mask)
    full = lambda a, b: full_attention(a, None, b, causal=causal, mask=mask)
    return [(f(qk, v) * valid, jax.grad(lambda a, b: jnp.sum(f(a, b) * cot), (0, 1))(qk, v))
            for f in (lsh, full)]

  (out_lsh, g_lsh), (out_full, g_full) = outputs_and_grads(qk, v)
  np.testing.assert_allclose(out_lsh, out_full, atol=2e-6)
  for a, b in zip(g_lsh, g_full):
    np.testing.assert_allclose(a, b, atol=2e-5)


@pytest.mark.parametrize('causal', [False, True])
def test_local_with_covering_window_equals_full(causal):
  qk, v, mask = _inputs()
  k = jax.random.normal(jax.random.PRNGKey(5), qk.shape)
  after = 0 if causal else 3
  for key in (None, k):
    local = local_attention(qk, key, v, chunk_len=8, n_chunks_before=3, n_chunks_after=after,
                            causal=causal, mask=mask)
    np.testing.assert_allclose(local, full_attention(qk, key, v, causal=causal, mask=mask),
                               atol=2e-6)


@pytest.mark.parametrize('causal', [False, True])
def test_full_attention_exclude_self(causal):
  """Shared query/keys: by default a query sees its own key only when nothing else is allowed
  (the first query under causality); `exclude_self=False` is plain softmax attention over the
  unit-normalized queries, its own key included."""
  qk, v, mask = _inputs()
  keys = qk / jnp.sqrt(jnp.sum(qk * qk, -1, keepdims=True) + 1e-6)
  logits = jnp.einsum('bqnh,bknh->bnqk', qk, keys)
  allowed = mask[:, None, None, :] & (jnp.tril(jnp.ones((L, L), bool)) if causal else True)
  own = jnp.eye(L, dtype=bool)

  def reference(logits):
    probs = jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1)
    return jnp.einsum('bnqk,bknh->bqnh', probs, v)

  with_self = full_attention(qk, None, v, causal=causal, mask=mask, exclude_self=False)
  np.testing.assert_allclose(with_self, reference(logits), atol=2e-6)
  excluded = full_attention(qk, None, v, causal=causal, mask=mask)
  expected = reference(jnp.where(own, -1e5, logits))  # own key: a last resort
  np.testing.assert_allclose(excluded, expected, atol=2e-6)
  assert float(jnp.abs(with_self - excluded).max()) > 0.1
  # Separate keys have no "own" key: the flag changes nothing.
  k = jax.random.normal(jax.random.PRNGKey(5), qk.shape)
  np.testing.assert_array_equal(full_attention(qk, k, v, causal=causal, exclude_self=False),
                                full_attention(qk, k, v, causal=causal))


def test_local_attention_sees_only_its_window():
  qk, v, _ = _inputs()
  out = local_attention(qk, None, v, chunk_len=8, n_chunks_before=1, causal=True)
  # Values two chunks back (positions 0..7) are outside the window of positions 16..31.
  out2 = local_attention(qk, None, v.at[:, :8].set(100.0), chunk_len=8, n_chunks_before=1,
                         causal=True)
  np.testing.assert_array_equal(out[:, 16:], out2[:, 16:])
  assert not np.allclose(out[:, 8:16], out2[:, 8:16])


@pytest.mark.parametrize('kernel', ['lsh', 'local', 'full'])
def test_future_values_never_change_the_past(kernel):
  qk, v, _ = _inputs(length=64)
  attend = {
      'lsh': lambda vv: lsh_attention(qk, vv, rng=jax.random.PRNGKey(1), n_hashes=2,
                                      chunk_len=8, causal=True),
      'local': lambda vv: local_attention(qk, None, vv, chunk_len=8, causal=True),
      'full': lambda vv: full_attention(qk, None, vv, causal=True),
  }[kernel]
  base = attend(v)
  for j in (1, 17, 40):
    changed = attend(v.at[:, j:].add(jax.random.normal(jax.random.PRNGKey(j), v[:, j:].shape)))
    np.testing.assert_array_equal(base[:, :j], changed[:, :j])
    assert not np.allclose(base[:, j:], changed[:, j:])


def test_first_causal_token_attends_to_itself():
  qk, v, _ = _inputs()
  for out in (lsh_attention(qk, v, rng=jax.random.PRNGKey(0), chunk_len=8, causal=True),
              full_attention(qk, None, v, causal=True),
              local_attention(qk, None, v, chunk_len=8, causal=True)):
    np.testing.assert_allclose(out[:, 0], v[:, 0], atol=1e-6)


def test_self_is_masked_when_other_keys_exist():
  # A query aligned with its own key would attend mostly to itself without the self-mask.
  qk = jnp.concatenate([jnp.eye(H)[None, :, None, :] * 20] * 2, axis=1)  # [1, 16, 1, H]
  v = jax.random.normal(jax.random.PRNGKey(0), qk.shape)
  out = full_attention(qk, None, v)
  # Token i has a twin at i + 8 with the same vector: all of its weight goes to the twin.
  np.testing.assert_allclose(out[0, :8], v[0, 8:], atol=1e-4)


def _clustered(n_clusters=64, length=256, seed=0):
  """Well-separated clusters: keys of one cluster are near-identical, others near-orthogonal."""
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  centers = jax.random.normal(k1, (n_clusters, 1, 32)) * 4.0
  ids = jax.random.randint(k2, (1, length), 0, n_clusters)
  qk = centers[ids[0]][None] + 0.05 * jax.random.normal(k3, (1, length, 1, 32))
  v = jax.random.normal(jax.random.PRNGKey(seed + 1), (1, length, 1, 32))
  return qk, v


def test_lsh_approximates_full_attention_on_clusters_and_improves_with_hashes():
  qk, v = _clustered()
  ref = full_attention(qk, None, v)
  scale = float(jnp.mean(jnp.abs(ref)))

  def error(n_hashes, n_chunks_after=0):
    attend = jax.jit(lambda seed: lsh_attention(qk, v, rng=jax.random.PRNGKey(seed),
                                                n_hashes=n_hashes, chunk_len=32,
                                                n_chunks_after=n_chunks_after))
    return np.mean([float(jnp.mean(jnp.abs(attend(s) - ref))) for s in range(3)])

  errors = [error(n) for n in (1, 2, 4, 8)]
  assert errors[0] > errors[1] > errors[2] > errors[3], errors
  assert errors[3] < 0.15 * scale, (errors, scale)
  # Seeing the next chunk too, every cluster (smaller than a chunk) is seen whole.
  assert error(8, n_chunks_after=1) < 0.03 * scale


def test_buckets_replay_exactly():
  qk, v, mask = _inputs(length=64)
  out, buckets = lsh_attention(qk, v, rng=jax.random.PRNGKey(0), n_hashes=2, chunk_len=8,
                               mask=mask, return_buckets=True)
  assert buckets.shape == (B, N, 2, 64) and buckets.dtype == jnp.int32
  replay = lsh_attention(qk, v, rng=jax.random.PRNGKey(99), n_hashes=2, chunk_len=8, mask=mask,
                         buckets=buckets)
  np.testing.assert_array_equal(out, replay)
  other = lsh_attention(qk, v, rng=jax.random.PRNGKey(99), n_hashes=2, chunk_len=8, mask=mask)
  assert not np.allclose(out, other)


def test_hashing_factorized_buckets_and_balance():
  qk, _, _ = _inputs(length=64)
  x = qk.transpose(0, 2, 1, 3)
  b = hash_vectors(x, jax.random.PRNGKey(0), 3, (4, 6))
  assert b.shape == (B, N, 3, 64) and int(b.min()) >= 0 and int(b.max()) < 24
  assert len(np.unique(b)) > 12  # both factors are used
  # Heads draw different rotations from fold_in(rng, head).
  assert not np.array_equal(hash_vectors(jnp.repeat(x[:, :1], 2, 1), jax.random.PRNGKey(0), 1, 8)[:, 0],
                            hash_vectors(jnp.repeat(x[:, :1], 2, 1), jax.random.PRNGKey(0), 1, 8)[:, 1])
  balanced = jnp.tile(jnp.arange(8, dtype=jnp.int32), 8)[None, None, None]
  assert float(bucket_balance(balanced, 8)) == 1.0
  assert float(bucket_balance(jnp.zeros((1, 1, 1, 64), jnp.int32), 8)) == 8.0


def test_argmax_hash_is_rotation_sign():
  # With 2 buckets the bucket is the sign of the single rotated coordinate.
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 16, 4))
  b = hash_vectors(x, jax.random.PRNGKey(1), 1, 2)
  rot = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(1), 0), (4, 1, 1))
  expected = (jnp.einsum('lh,h->l', x[0, 0], rot[:, 0, 0]) < 0).astype(jnp.int32)
  np.testing.assert_array_equal(b[0, 0, 0], expected)


def test_hash_is_argmax_of_rotation_and_its_negation():
  """The paper's h(x) = argmax([xR; -xR]) per factor, bucket = sum of factor * stride."""
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 32, 8))
  factors = (4, 6)
  got = hash_vectors(x, jax.random.PRNGKey(3), 2, factors)
  for n in range(3):
    rot = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), n), (8, 2, 5))
    rotated = jnp.einsum('blh,hrk->brlk', x[:, n], rot)
    want, start, stride = 0, 0, 1
    for f in factors:
      part = rotated[..., start:start + f // 2]
      want = want + stride * jnp.argmax(jnp.concatenate([part, -part], -1), -1)
      start, stride = start + f // 2, stride * f
    np.testing.assert_array_equal(got[:, n], want)


def test_padding_content_never_reaches_real_tokens():
  qk, v, mask = _inputs(length=64)
  pad = ~mask[:, :, None, None]
  noise = jax.random.normal(jax.random.PRNGKey(4), qk.shape) * 50
  for fn in (lambda a, b: lsh_attention(a, b, rng=jax.random.PRNGKey(0), n_hashes=2,
                                        chunk_len=8, mask=mask),
             lambda a, b: local_attention(a, None, b, chunk_len=8, mask=mask, n_chunks_after=1),
             lambda a, b: full_attention(a, None, b, mask=mask)):
    out = fn(qk, v)
    out2 = fn(jnp.where(pad, noise, qk), jnp.where(pad, -noise, v))
    np.testing.assert_allclose(out * ~pad, out2 * ~pad, atol=1e-6)


def test_bfloat16_is_finite_and_close_to_float32():
  qk, v, mask = _inputs(length=64)
  for fn in (lambda a, b: lsh_attention(a, b, buckets=buckets, n_hashes=2, chunk_len=8,
                                        causal=True, mask=mask, rng=None),
             lambda a, b: local_attention(a, None, b, chunk_len=8, causal=True, mask=mask)):
    _, buckets = lsh_attention(qk, v, rng=jax.random.PRNGKey(0), n_hashes=2, chunk_len=8,
                               causal=True, mask=mask, return_buckets=True)
    out32 = fn(qk, v)
    out16 = fn(qk.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out16)))
    np.testing.assert_allclose(out16.astype(jnp.float32), out32, atol=0.1, rtol=0.05)
    grad = jax.grad(lambda a: jnp.sum(fn(a, v.astype(jnp.bfloat16)).astype(jnp.float32)))(
        qk.astype(jnp.bfloat16))
    assert bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))
  assert common.MASK_VALUE < common.SELF_MASK_VALUE < 0
  assert np.isfinite(float(jnp.bfloat16(common.MASK_VALUE)))


def test_check_grads_custom_vjps():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 10, 4), jnp.float64)
    perm = jnp.stack([jax.random.permutation(jax.random.PRNGKey(i), 10) for i in range(6)])
    perm = perm.reshape(2, 3, 10)
    inv = jnp.argsort(perm, axis=-1)
    check_grads(lambda a: permute(a, perm, inv), (x,), order=1, modes=['rev'])
    check_grads(lambda a: permute(a, perm, inv), (x[..., 0],), order=1, modes=['rev'])
    # Two rounds of 5 positions: slots hold positions perm % 5 of round perm // 5.
    check_grads(lambda a: gather_rounds(a, perm % 5, inv, 2), (x[:, :, :5],), order=1,
                modes=['rev'])
    qk, v, mask = (a.astype(jnp.float64) if a.dtype != jnp.bool_ else a for a in _inputs(length=16))
    _, buckets = lsh_attention(qk, v, rng=jax.random.PRNGKey(0), n_hashes=2, chunk_len=4,
                               causal=True, mask=mask, return_buckets=True)
    check_grads(lambda a, b: lsh_attention(a, b, rng=None, buckets=buckets, n_hashes=2,
                                           chunk_len=4, causal=True, mask=mask),
                (qk, v), order=1, modes=['rev'])


@pytest.mark.parametrize('causal,before,after', [(True, 1, 0), (False, 1, 1), (True, 2, 0)])
def test_attend_chunks_backward_equals_autodiff_of_masked_attend(causal, before, after):
  # The written-out backward pass of the chunk core against autodiff of the formulation it
  # replaces, with padding, wrapped and other-round neighbours masked, and cotangents on both
  # the outputs and the logsumexps (the rounds are mixed by the latter).
  batch, heads, n_chunks, chunk, dim = 2, 2, 6, 4, 8
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  sqk = jax.random.normal(keys[0], (batch, heads, n_chunks, chunk, dim))
  sv = jax.random.normal(keys[1], (batch, heads, n_chunks, chunk, dim))
  pos = jax.vmap(jax.vmap(lambda k: jax.random.permutation(k, n_chunks * chunk)))(
      jax.random.split(keys[2], batch * heads).reshape(batch, heads, 2))
  q_pos = (pos % (n_chunks * chunk // 2)).reshape(batch, heads, n_chunks, chunk)  # 2 rounds
  k_valid = common.neighbour_valid(n_chunks, n_chunks // 2, chunk, before, after)
  pad = jax.random.bernoulli(keys[3], 0.8, (batch, heads, n_chunks, chunk))
  k_valid = k_valid & common.look_around(pad, before, after)

  def reference(a, b):
    return common.masked_attend(
        a, common.look_around(common.unit_normalize(a), before, after),
        common.look_around(b, before, after), q_pos=q_pos,
        k_pos=common.look_around(q_pos, before, after), k_valid=k_valid[..., None, :],
        causal=causal, shared_qk=True, scale=1.0)

  def ours(a, b):
    return attend_chunks(a, b, q_pos, k_valid, before, after, causal)

  d_out = jax.random.normal(keys[4], sv.shape)
  d_lse = jax.random.normal(keys[0], q_pos.shape)
  def outputs_and_grads(fn):
    (out, lse), vjp = jax.vjp(fn, sqk, sv)
    return (out, lse, *vjp((d_out, d_lse)))

  for got, want in zip(outputs_and_grads(ours), outputs_and_grads(reference)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('total_buckets', [8, 2 ** 26])  # one packed int32 key / pair sort
def test_sort_slots_orders_by_round_bucket_position(total_buckets):
  from reformer_jax.attention.lsh import _sort_slots  # pylint: disable=import-outside-toplevel
  batch, heads, rounds, length = 2, 2, 3, 64
  buckets = jax.random.randint(jax.random.PRNGKey(0), (batch, heads, rounds, length), 0,
                               min(total_buckets, 8))  # few values: many ties to order by position
  mask = jnp.arange(length)[None] < jnp.array([[length], [40]])
  sort_idx, undo_idx, pos = _sort_slots(buckets, mask, total_buckets)
  padded = jnp.where(mask[:, None, None, :], buckets, total_buckets)
  keyed = (padded + (total_buckets + 1) * jnp.arange(rounds)[:, None]).reshape(batch, heads, -1)
  np.testing.assert_array_equal(sort_idx, jnp.argsort(keyed, axis=-1, stable=True))
  np.testing.assert_array_equal(jnp.take_along_axis(sort_idx, undo_idx, -1),
                                jnp.broadcast_to(jnp.arange(rounds * length), sort_idx.shape))
  np.testing.assert_array_equal(pos, sort_idx % length)


def test_configuration_errors_name_the_field():
  qk, v, _ = _inputs(length=40)
  with pytest.raises(ValueError, match='length 40 is not a multiple of chunk_len 16.*pad the input to 48'):
    lsh_attention(qk, v, rng=jax.random.PRNGKey(0), chunk_len=16)
  with pytest.raises(ValueError, match='n_buckets must be an even int'):
    lsh_attention(qk, v, rng=jax.random.PRNGKey(0), chunk_len=8, n_buckets=5)
  with pytest.raises(ValueError, match='pass rng='):
    lsh_attention(qk, v, rng=None, chunk_len=8)
  with pytest.raises(ValueError, match=r'\[batch, length, heads, head_dim\]'):
    lsh_attention(qk[0], v[0], rng=jax.random.PRNGKey(0), chunk_len=8)
  with pytest.raises(ValueError, match='mask must be'):
    full_attention(qk, None, v, mask=jnp.ones((B, 3), bool))
  assert default_n_buckets(1024, 64) == 32 and default_n_buckets(64, 64) == 2
  assert default_n_buckets(2 ** 20, 64) == (128, 256)
  # Factorized above chunk_len buckets: 2K tokens in chunks of 64 -> 64, 4K -> 8 x 16.
  assert default_n_buckets(2048, 64) == 64 and default_n_buckets(4096, 64) == (8, 16)


def _compiled_temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_lsh_memory_grows_linearly_not_quadratically():
  def step(attend, length):
    qk = jnp.ones((1, length, 2, 16))
    grad = jax.grad(lambda a, b: jnp.sum(attend(a, b)), argnums=(0, 1))
    return _compiled_temp_bytes(grad, qk, qk)

  lsh = lambda a, b: lsh_attention(a, b, rng=jax.random.PRNGKey(0), n_hashes=2, chunk_len=32,
                                   causal=True)
  full = lambda a, b: full_attention(a, None, b, causal=True)
  lsh_ratio = step(lsh, 4096) / step(lsh, 1024)
  full_ratio = step(full, 4096) / step(full, 1024)
  assert lsh_ratio < 6, lsh_ratio     # 4x the length: ~4x the memory
  assert full_ratio > 12, full_ratio  # ~16x for an [L, L] matrix


def _reference_lsh(qk, v, buckets, chunk_len, causal, mask, total_buckets, before=1, after=0):
  """Loop-by-loop LSH attention for given buckets, written from the paper's description."""
  qk, v, buckets, mask = (np.asarray(a, np.float64 if a.dtype.kind == 'f' else a.dtype)
                          for a in (qk, v, buckets, mask))
  batch, length, heads, _ = qk.shape
  rounds = buckets.shape[2]
  out = np.zeros(v.shape)
  for b in range(batch):
    for n in range(heads):
      outs, lses = [], []
      for r in range(rounds):
        key = np.where(mask[b], buckets[b, n, r], total_buckets)
        order = np.argsort(key, kind='stable')  # by bucket, then position
        o_r, l_r = np.zeros((length, v.shape[-1])), np.zeros(length)
        for s, i in enumerate(order):
          g = s // chunk_len
          slots = [t for t in range(length) if g - before <= t // chunk_len <= g + after]
          logits = []
          for t in slots:
            j = order[t]
            k_hat = qk[b, j, n] / np.linalg.norm(qk[b, j, n])
            logit = qk[b, i, n] @ k_hat
            if j == i:
              logit = common.SELF_MASK_VALUE
            if (causal and j > i) or not mask[b, j]:
              logit = common.MASK_VALUE
            logits.append(logit)
          logits = np.array(logits)
          lse = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()
          o_r[i] = np.exp(logits - lse) @ v[b, [order[t] for t in slots], n]
          l_r[i] = lse
        outs.append(o_r)
        lses.append(l_r)
      w = np.exp(np.array(lses) - np.max(lses, axis=0))
      w /= w.sum(axis=0)
      out[b, :, n] = np.einsum('rl,rlh->lh', w, np.array(outs))
  return out


@pytest.mark.parametrize('causal', [False, True])
def test_lsh_matches_loop_reference_across_chunks(causal):
  qk, v, mask = _inputs(length=16)
  after = 0 if causal else 1
  out, buckets = lsh_attention(qk, v, rng=jax.random.PRNGKey(2), n_hashes=3, n_buckets=4,
                               chunk_len=4, causal=causal, mask=mask, n_chunks_after=after,
                               return_buckets=True)
  ref = _reference_lsh(qk, v, buckets, 4, causal, mask, 4, after=after)
  valid = np.asarray(mask)[:, :, None, None]
  np.testing.assert_allclose(np.asarray(out) * valid, ref * valid, atol=2e-5)


def _outputs_and_grads(fn, qk, v, cot):
  return fn(qk, v), jax.grad(lambda a, b: jnp.sum(fn(a, b) * cot), (0, 1))(qk, v)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('n_hashes', [1, 3])
@pytest.mark.parametrize('groups', [dict(n_parallel_heads=1),
                                    dict(query_chunk_groups=2),
                                    dict(n_parallel_heads=2, query_chunk_groups='per_chunk'),
                                    dict(n_parallel_heads=1, query_chunk_groups='two_chunks')])
def test_grouped_lsh_equals_single_pass(causal, n_hashes, groups):
  """Heads in groups and query chunks in steps: the same outputs and gradients as one pass."""
  heads, length, chunk = 4, 64, 8
  qk, v, mask = (jax.random.normal(jax.random.PRNGKey(i), (B, length, heads, H)) for i in (0, 1, 2))
  mask = jnp.arange(length)[None, :] < jnp.array([[length], [length * 3 // 4]])
  cot = jax.random.normal(jax.random.PRNGKey(3), qk.shape) * mask[:, :, None, None]
  n_chunks = n_hashes * length // chunk
  sizes = {'per_chunk': n_chunks, 'two_chunks': n_chunks // 2}
  groups = {k: sizes.get(v, v) for k, v in groups.items()}
  # Two chunks back and one ahead (non-causal): windows reach past a step of one chunk.
  kw = dict(rng=jax.random.PRNGKey(5), n_hashes=n_hashes, n_buckets=8, chunk_len=chunk,
            causal=causal, mask=mask, n_chunks_before=2, n_chunks_after=0 if causal else 1)

  @jax.jit
  def run(qk, v):
    single = lambda a, b: lsh_attention(a, b, n_parallel_heads=heads, query_chunk_groups=1, **kw)
    grouped = lambda a, b: lsh_attention(a, b, **groups, **kw)
    return _outputs_and_grads(single, qk, v, cot), _outputs_and_grads(grouped, qk, v, cot)

  (out, grads), (out_g, grads_g) = run(qk, v)
  valid = np.asarray(mask)[:, :, None, None]
  np.testing.assert_allclose(out_g * valid, out * valid, atol=2e-6)
  for a, b in zip(grads_g, grads):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_automatic_groups_keep_one_pass_until_the_logits_are_large():
  from reformer_jax.attention import lsh
  # batch 8 x 16K tokens, 8 heads, 2 rounds: 1 GiB of logits, still one pass.
  assert lsh.attention_groups(8, 2 ** 14, 8, 64, 2, 64, 128) == (8, 1)
  # One 1M-token sequence: one head at a time, each head's chunks in 64 MiB steps of logits.
  parallel, groups = lsh.attention_groups(1, 2 ** 20, 8, 64, 2, 64, 128)
  assert parallel == 1
  assert 4 * 2 * 2 ** 20 * 128 // groups <= lsh.QUERY_GROUP_LOGITS_BYTES
  qk, v, _ = _inputs(length=64)
  with pytest.raises(ValueError, match='n_parallel_heads 3 does not divide the 2 heads'):
    lsh_attention(qk, v, rng=jax.random.PRNGKey(0), chunk_len=8, n_parallel_heads=3)
  with pytest.raises(ValueError, match='query_chunk_groups 3 does not divide the 16 sorted'):
    lsh_attention(qk, v, rng=jax.random.PRNGKey(0), n_hashes=2, chunk_len=8,
                  query_chunk_groups=3)


def test_hashing_in_blocks_of_positions_gives_the_same_buckets(monkeypatch):
  from reformer_jax.attention import lsh
  x = jax.random.normal(jax.random.PRNGKey(0), (B, N, 64, H))
  whole = hash_vectors(x, jax.random.PRNGKey(1), 3, (4, 8))
  monkeypatch.setattr(lsh, 'HASH_SINGLE_PASS_BYTES', 0)
  monkeypatch.setattr(lsh, 'HASH_BLOCK_BYTES', 1024)  # 16+ blocks of positions
  np.testing.assert_array_equal(hash_vectors(x, jax.random.PRNGKey(1), 3, (4, 8)), whole)


def test_grouped_lsh_backward_memory_does_not_scale_with_heads_and_rounds():
  """At a fixed length, one pass holds logits for every head and round (~16x from 2 heads x 1
  round to 8 heads x 4 rounds); one head at a time in fixed-size steps holds one step's."""
  length, chunk = 1024, 32

  def temp_bytes(heads, hashes, **groups):
    qk = jnp.ones((1, length, heads, 16))
    buckets = jnp.zeros((1, heads, hashes, length), jnp.int32)  # replayed, as in the backward
    loss = lambda a, b: jnp.sum(lsh_attention(a, b, rng=None, buckets=buckets, n_hashes=hashes,
                                              n_buckets=64, chunk_len=chunk, causal=True,
                                              **groups))
    return _compiled_temp_bytes(jax.grad(loss, (0, 1)), qk, qk)

  steps = lambda hashes: hashes * length // chunk // 4  # 4 chunks per step
  single = temp_bytes(8, 4, query_chunk_groups=1) / temp_bytes(2, 1, query_chunk_groups=1)
  grouped = (temp_bytes(8, 4, n_parallel_heads=1, query_chunk_groups=steps(4))
             / temp_bytes(2, 1, n_parallel_heads=1, query_chunk_groups=steps(1)))
  assert single > 12, single
  assert grouped < 2.5, grouped  # what remains grows with the rounds' sorted indices only


@pytest.mark.parametrize('causal,replay,prenorm', [(False, False, False), (True, False, True),
                                                    (False, True, True), (True, True, False)])
def test_lsh_self_attention_by_head_groups_equals_projected_lsh_attention(causal, replay,
                                                                          prenorm):
  """prenorm: the input is layer-normalized inside, a chunk of positions at a time."""
  from reformer_jax.attention.common import layer_norm
  from reformer_jax.attention.lsh import lsh_self_attention
  d, heads, length = 16, 4, 64
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(ks[0], (B, length, d)) * 2 + 1
  w_qk, w_v = (jax.random.normal(k, (d, heads, H)) / 4 for k in ks[1:3])
  w_out = jax.random.normal(ks[3], (heads, H, d)) / 4
  norm = ({'scale': jnp.linspace(0.5, 1.5, d), 'bias': jnp.linspace(-1, 1, d)} if prenorm
          else None)
  cot = jax.random.normal(ks[4], x.shape)
  mask = jnp.arange(length)[None, :] < jnp.array([[length], [length * 3 // 4]])
  kw = dict(rng=jax.random.PRNGKey(5), n_hashes=2, chunk_len=8, causal=causal, mask=mask,
            n_chunks_after=0 if causal else 1)

  def reference(x, w_qk, w_v, w_out, norm):
    h = x if norm is None else layer_norm(norm, x, x.dtype)
    out, buckets = lsh_attention(jnp.einsum('bld,dnh->blnh', h, w_qk),
                                 jnp.einsum('bld,dnh->blnh', h, w_v), return_buckets=True, **kw)
    return jnp.einsum('blnh,nhd->bld', out, w_out), buckets

  @jax.jit
  def run(*args):
    ref_out, ref_buckets = reference(*args)
    grouped = lambda *a: lsh_self_attention(*a[:4], norm=a[4],
                                            buckets=ref_buckets if replay else None,
                                            n_parallel_heads=1, query_chunk_groups=4, **kw)
    out, buckets = grouped(*args)
    grads = [jax.grad(lambda *a: jnp.sum(f(*a)[0] * cot), (0, 1, 2, 3, 4))(*args)
             for f in (reference, grouped)]
    return ref_out, ref_buckets, out, buckets, grads

  ref_out, ref_buckets, out, buckets, (ref_grads, grads) = run(x, w_qk, w_v, w_out, norm)
  np.testing.assert_array_equal(buckets, ref_buckets)  # each group hashes as lsh_attention does
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=1e-5)
