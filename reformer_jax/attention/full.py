"""Full dot-product attention: every query against every key, O(L^2) memory.

The reference the approximate kernels are tested against, and the `full` choice of the
attention layer. Arrays are `[B, L, N, H]`; see `common.py` for the axis legend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from reformer_jax.attention import common


def full_attention(q: jax.Array, k: jax.Array | None, v: jax.Array, *, causal: bool = False,
                   mask: jax.Array | None = None, exclude_self: bool = True) -> jax.Array:
  """Attention of every query over every key.

  Args:
    q: `[B, T, N, H]` queries.
    k: `[B, S, N, H]` keys, or None for shared query/key attention: keys are the unit-normalized
      queries, logits `q . k_hat` are not scaled, and a query sees its own key only when no other
      key is allowed (the Reformer's convention, as in trax and Hugging Face).
    v: `[B, S, N, H]` values.
    causal: a query at position i sees keys at positions <= i (needs T == S).
    mask: `[B, S]` booleans, False at padding keys.
    exclude_self: with shared query/keys, the Reformer's rule above; False lets a query see its
      own key like any other (plain attention with keys = unit-normalized queries, where a
      query's own key usually scores highest). Ignored with separate keys.
  Returns:
    `[B, T, N, H]` in the dtype of `v`.
  """
  shared_qk = k is None
  common.check_inputs(q if shared_qk else k, v, mask, 'full_attention')
  if shared_qk:
    k = common.unit_normalize(q)
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f'full_attention: causal=True needs as many queries as keys, got '
                     f'{q.shape[1]} and {k.shape[1]}')
  scale = 1.0 if shared_qk else q.shape[-1] ** -0.5
  qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N, L, H]
  k_valid = None if mask is None else mask[:, None, None, :]
  out, _ = common.masked_attend(
      qt, kt, vt, q_pos=jnp.arange(q.shape[1]), k_pos=jnp.arange(k.shape[1]), k_valid=k_valid,
      causal=causal, shared_qk=shared_qk and exclude_self, scale=scale)
  return out.astype(v.dtype).transpose(0, 2, 1, 3)
