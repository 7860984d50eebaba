"""Reversible residual stacks (Gomez et al. 2017; Reformer section 4) under one `jax.custom_vjp`.

A stack is a sequence of residual functions f_1 ... f_n applied to a pair of streams:

    (a, b)  ->  (b, a + f_i(b))

With f_1 = attention and f_2 = feed-forward this is the Reformer block
`y1 = x1 + Attention(x2)`, `y2 = x2 + FeedForward(y1)`; an encoder-decoder block inserts
cross-attention as a third function. Each step is inverted exactly from its outputs,

    b = a',  a = b' - f_i(a'),

so the backward pass rebuilds every step's inputs from the stack's outputs, runs `jax.vjp` of
that one function, and moves on. The forward pass keeps only the outputs, the parameters, the
RNG keys and each function's *replay* data (the integer LSH buckets, so the backward pass hashes
exactly as the forward did even though rebuilt activations differ by float error). Activation
memory is therefore that of one function, whatever the depth.

Everything here is pure: parameters are explicit pytrees and every function receives its own
PRNG key, so dropout masks and hash rotations replay identically in the backward pass.

A residual function has the signature

    f(params, x, context, consts, key, replay) -> (delta, replay_out)

  x       `[B, L, D]` the stream it reads;
  context a pytree of differentiable arrays shared by all steps (e.g. the encoder output), or None;
  consts  a pytree of non-differentiable arrays (padding masks), or None;
  key     its PRNG key;
  replay  None in the forward pass, else the `replay_out` the forward pass returned;
  delta   `[B, L, D]` added to the other stream.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

ResidualFn = Callable[..., tuple[jax.Array, Any]]


def _forward(fns, params, x1, x2, context, consts, keys, replays=None):
  a, b = x1, x2
  out_replays = []
  for i, (f, p, key) in enumerate(zip(fns, params, keys)):
    delta, replay = f(p, b, context, consts, key, None if replays is None else replays[i])
    a, b = b, a + delta
    out_replays.append(replay)
  return a, b, tuple(out_replays)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reversible(fns, params, x1, x2, context, consts, keys):
  return _forward(fns, params, x1, x2, context, consts, keys)


def _reversible_fwd(fns, params, x1, x2, context, consts, keys):
  y1, y2, replays = _forward(fns, params, x1, x2, context, consts, keys)
  return (y1, y2, replays), (params, y1, y2, context, consts, keys, replays)


def _reversible_bwd(fns, residuals, cotangents):
  params, a, b, context, consts, keys, replays = residuals
  ga, gb, _ = cotangents  # replays are integers: no cotangent
  grad_params = [None] * len(fns)
  grad_context = jax.tree.map(lambda c: jnp.zeros_like(c), context)
  for i in reversed(range(len(fns))):
    # Without the barrier XLA may rebuild every step's inputs ahead of the cotangents (they
    # depend only on the outputs), holding all of them at once: memory would grow with depth.
    a, b, ga, gb = jax.lax.optimization_barrier((a, b, ga, gb))

    def step(p, x, ctx, i=i):
      return fns[i](p, x, ctx, consts, keys[i], replays[i])[0]
    # Outputs (a, b) = (b_in, a_in + f(b_in)): rebuild the inputs, then pull the cotangents back.
    delta, vjp = jax.vjp(step, params[i], a, context)
    gp, gx, gc = vjp(gb)
    a, b = b - delta, a
    ga, gb = gb, ga + gx
    grad_params[i] = gp
    grad_context = jax.tree.map(lambda acc, g: acc + g, grad_context, gc)
  return tuple(grad_params), ga, gb, grad_context, None, None


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def reversible_stack(fns: Sequence[ResidualFn], params: Sequence[Any], x1: jax.Array,
                     x2: jax.Array, *, keys: Sequence[jax.Array], context: Any = None,
                     consts: Any = None, memory_efficient: bool = True):
  """Applies `(a, b) -> (b, a + f_i(b))` for each function in turn.

  Args:
    fns: the residual functions (see the module docstring for their signature).
    params: one parameter pytree per function.
    x1, x2: `[B, L, D]` the two input streams (usually both the embeddings).
    keys: one PRNG key per function.
    context: differentiable pytree passed to every function (e.g. encoder output), or None.
    consts: non-differentiable pytree passed to every function (masks), or None.
    memory_efficient: True uses the reversible backward pass (activation memory independent of
      depth); False lets autodiff store every activation (the same function, for testing).
  Returns:
    `(y1, y2, replays)`: the output streams and each function's replay data.
  """
  if not (len(fns) == len(params) == len(keys)):
    raise ValueError(f'reversible_stack: got {len(fns)} functions, {len(params)} parameter '
                     f'trees and {len(keys)} keys; pass one of each per function')
  fns, params, keys = tuple(fns), tuple(params), tuple(keys)
  if memory_efficient:
    return _reversible(fns, params, x1, x2, context, consts, keys)
  return _forward(fns, params, x1, x2, context, consts, keys)


def reversible_inverse(fns: Sequence[ResidualFn], params: Sequence[Any], y1: jax.Array,
                       y2: jax.Array, *, keys: Sequence[jax.Array], replays: Sequence[Any],
                       context: Any = None, consts: Any = None) -> tuple[jax.Array, jax.Array]:
  """Rebuilds the stack's inputs `(x1, x2)` from its outputs, as the backward pass does."""
  a, b = y1, y2
  for i in reversed(range(len(fns))):
    delta, _ = fns[i](params[i], a, context, consts, keys[i], replays[i])
    a, b = b - delta, a
  return a, b
