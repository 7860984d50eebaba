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
memory is therefore that of one function, whatever the depth. The last `keep_last` functions
(in the models `ModelConfig.keep_last`, by default one: the last feed-forward) instead keep
their activations from the forward pass: the backward pass starts with them, so they are held
only across the loss, and their forward pass does not run twice. At the other end, the first two functions read the stack's
inputs (f_1 reads x2 and adds to x1, f_2 reads f_1's output and adds to x2): kept, these are not
rebuilt, and what only the two functions' outputs need (in the models, the first feed-forward's
second product) drops out of the backward pass.

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

A per-position function (the chunked feed-forward) may also carry attributes `chunk_len` and
`chunk(params, x, context, consts, key, i)`, the latter giving its delta at the positions of
chunk i (`x`, `chunk_len` positions of the stream), dropout masks included. The stack then
adds its delta into the other stream, and in the backward pass rebuilds that stream and adds
the input's cotangent, in place a chunk at a time: neither its `[B, L, D]` output nor its input
gradient exists whole, and one step holds the four streams (outputs and cotangents) and one
chunk's activations.
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
    a, b, replay = _step(f, p, a, b, context, consts, key,
                         None if replays is None else replays[i])
    out_replays.append(replay)
  return a, b, tuple(out_replays)


def _step(f, p, a, b, context, consts, key, replay):
  """`(a, b) -> (b, a + f(b))` and f's replay data. A per-position function (see
  `_chunks`) adds its output into `a`'s buffer a chunk of positions at a time, so its
  `[B, L, D]` output never exists whole."""
  n = _chunks(f, b.shape[1])
  if n == 1:
    delta, replay = f(p, b, context, consts, key, replay)
    return b, a + delta, replay

  def body(i, a):
    delta = f.chunk(p, _part(b, i, f.chunk_len), context, consts, key, i)
    return _put(a, i, f.chunk_len, _part(a, i, f.chunk_len) + delta)
  return b, jax.lax.fori_loop(0, n, body, a), None


def _chunks(f, length: int) -> int:
  """How many chunks of positions the stack takes a function through: 1 unless it is
  per-position, with attributes `chunk_len` and `chunk(params, x, context, consts, key, i)`,
  the latter giving `f(params, x_all, context, consts, key, None)[0]` at the positions of
  chunk i (`x`, of `chunk_len` positions), dropout masks included."""
  size = getattr(f, 'chunk_len', 0)
  return length // size if size and size < length and length % size == 0 else 1


def _part(x, i, size):
  """Chunk i (of `size` positions) of `x [B, L, ...]`."""
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _put(x, i, size, value):
  """`x` with chunk i (of `size` positions) replaced by `value`, in place."""
  return jax.lax.dynamic_update_slice_in_dim(x, value.astype(x.dtype), i * size, axis=1)


# Scanned stacks: when the functions repeat with a period (f_i is f_{i + period} with other
# parameters), the stack runs as a `lax.scan` over the n / period groups, parameters, keys and
# replays stacked along a leading axis. The loop body is one group: the compiler sees (and
# schedules, and allocates for) one group at a time, so nothing of one group's work can be
# hoisted next to another's, and compile time no longer grows with depth.

def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _by_position(items, period):
  """`[g0p0, g0p1, g1p0, g1p1, ...]` -> one stacked pytree per position in the period."""
  return tuple(_stack(items[k::period]) for k in range(period))


def _unstack(stacked, n, period):
  """The inverse of `_by_position`: a list of n per-function pytrees."""
  return [jax.tree.map(lambda x, i=i: x[i // period], stacked[i % period]) for i in range(n)]


def _forward_scan(fns, period, params, x1, x2, context, consts, keys):
  def body(carry, xs):
    a, b = carry
    group_params, group_keys = xs
    replays = []
    for k in range(period):
      a, b, replay = _step(fns[k], group_params[k], a, b, context, consts, group_keys[k], None)
      replays.append(replay)
    return (a, b), tuple(replays)

  (a, b), replays = jax.lax.scan(body, (x1, x2), (_by_position(params, period),
                                                  _by_position(keys, period)))
  return a, b, replays  # replays: one stacked pytree per position in the period


def _scanned(fns, period) -> bool:
  return period is not None and len(fns) % period == 0 and len(fns) // period >= 2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _reversible(fns, period, keep, params, x1, x2, context, consts, keys):
  return _reversible_fwd(fns, period, keep, params, x1, x2, context, consts, keys)[0]


def _kept(fns, keep, length) -> int:
  """How many of the last functions keep their forward activations: up to `keep`, counted back
  from the last one and stopping at a per-position (chunked) function, whose point is never to
  hold a whole activation (a chunked last function keeps none)."""
  n = 0
  while n < min(keep, len(fns)) and _chunks(fns[len(fns) - 1 - n], length) == 1:
    n += 1
  return n


def _parts(fns, period, keep, length) -> tuple[int, int]:
  """`(m, n)`: functions `[0, m)` run as a scan over groups of `period` (m = 0: none), `[m, n)`
  unrolled, `[n, len(fns))` keep their activations (`_kept`)."""
  n = len(fns) - _kept(fns, keep, length)
  m = n - n % period if period else 0
  return (m if _scanned(fns[:m], period) else 0), n


def _reversible_fwd(fns, period, keep, params, x1, x2, context, consts, keys):
  m, n = _parts(fns, period, keep, x1.shape[1])
  y1, y2, stacked, replays = x1, x2, None, []
  if m:
    y1, y2, stacked = _forward_scan(fns[:m], period, params[:m], y1, y2, context, consts,
                                    keys[:m])
    replays = _unstack(stacked, m, period)
  y1, y2, unrolled = _forward(fns[m:n], params[m:n], y1, y2, context, consts, keys[m:n])
  replays += list(unrolled)
  # The kept tail: each step's vjp (its activations) and output stay from here to the start of
  # the backward pass, which then needs no forward recomputation for them.
  tail = []
  for f, p, key in zip(fns[n:], params[n:], keys[n:]):
    step = lambda p, x, ctx, f=f, key=key: f(p, x, ctx, consts, key, None)
    delta, vjp, replay = jax.vjp(step, p, y2, context, has_aux=True)
    y1, y2 = y2, y1 + delta
    replays.append(replay)
    tail.append((vjp, delta))
  return (y1, y2, tuple(replays)), (params, y1, y2, context, consts, keys, stacked, unrolled,
                                    tuple(tail), (x1, x2))


def _distinct(x, like):
  """`x [B, L, D]`, as a value XLA cannot identify with `x`: `x + 0 * isnan(like[:, :1, :1])`,
  decided at run time (always `x`, finite where `x` is; per example, so a batch-sharded step
  needs no communication for it). A kept stack input handed on as a rebuilt one would otherwise
  let XLA merge the backward pass's recomputation of the first function with the forward
  pass's and hold the latter's intermediates from the forward pass to the end (43 MB more
  temporaries in the training step of experiments/peers.py)."""
  return x + 0 * jnp.isnan(like[:, :1, :1]).astype(x.dtype)


def _backward_step(f, p, key, replay, a, b, ga, gb, context, consts, a_in=None):
  """Rebuilds one step's inputs from its outputs (a, b) and pulls the cotangents back. Given
  `a_in` (a kept stack input), the step's input `a_in` is not rebuilt: f's output is unused, and
  what only it needs drops out of the compiled step. A per-position (chunked) f still rebuilds
  it in place: not rebuilding it there (tried) raised the compiled peak of the 1M-token,
  12-layer step of experiments/memory.py from 15.4 to 17.4 GiB, one stream more (not traced)."""
  # Without the barrier XLA may rebuild every step's inputs ahead of the cotangents (they
  # depend only on the outputs), holding all of them at once: memory would grow with depth.
  a, b, ga, gb = jax.lax.optimization_barrier((a, b, ga, gb))

  if _chunks(f, a.shape[1]) > 1:
    return _backward_step_in_chunks(f, p, key, a, b, ga, gb, context, consts)

  def step(p, x, ctx):
    return f(p, x, ctx, consts, key, replay)[0]
  # Outputs (a, b) = (b_in, a_in + f(b_in)): rebuild the inputs, then pull the cotangents back.
  delta, vjp = jax.vjp(step, p, a, context)
  if a_in is None:
    # The backward pass of f starts once its forward output is folded into the stream, so XLA
    # cannot allocate its buffers (input gradient) alongside the forward's.
    b, gb = jax.lax.optimization_barrier((b - delta, gb))
  else:
    b = _distinct(a_in, gb)
  gp, gx, gc = vjp(gb)
  return (b, a, gb, ga + gx), gp, gc


def _backward_step_in_chunks(f, p, key, a, b, ga, gb, context, consts):
  """`_backward_step` of a per-position function, a chunk of positions at a time: the rebuilt
  input and the input's cotangent are written into the buffers of `b` and `ga` in place, so
  besides the four streams only one chunk's activations exist (no `[B, L, D]` output of `f`,
  nor its input gradient)."""
  size = f.chunk_len
  part = lambda x, i: _part(x, i, size)
  put = lambda x, i, value: _put(x, i, size, value)
  add = lambda x, y: jax.tree.map(jnp.add, x, y)

  def body(i, carry):
    b, ga, gp, gc = carry
    delta, vjp = jax.vjp(lambda p, x, ctx: f.chunk(p, x, ctx, consts, key, i), p, part(a, i),
                         context)
    gp_i, gx, gc_i = vjp(part(gb, i).astype(delta.dtype))
    return (put(b, i, part(b, i) - delta), put(ga, i, part(ga, i) + gx), add(gp, gp_i),
            add(gc, gc_i))

  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  b, ga, gp, gc = jax.lax.fori_loop(0, a.shape[1] // size, body, (b, ga, zeros(p), zeros(context)))
  return (b, a, gb, ga), gp, gc


def _reversible_bwd(fns, period, keep, residuals, cotangents):
  del keep
  params, a, b, context, consts, keys, stacked, unrolled, tail, inputs = residuals
  ga, gb, _ = cotangents  # replays are integers: no cotangent
  grad_context = jax.tree.map(jnp.zeros_like, context)
  add = lambda x, y: jax.tree.map(jnp.add, x, y)
  n = len(fns) - len(tail)
  m = n - len(unrolled)
  grads = [None] * len(fns)
  # Function i < 2 adds to stream x1 (i = 0) or x2 (i = 1): that input is kept, not rebuilt.
  known = lambda i: inputs[i] if i < 2 else None
  # The kept tail first, from its stored activations: outputs (a, b) = (b_in, a_in + delta).
  for i, (vjp, delta) in reversed(list(enumerate(tail, n))):
    grads[i], gx, gc = vjp(gb)
    a, b, ga, gb = b - delta if known(i) is None else _distinct(known(i), gb), a, gb, ga + gx
    grad_context = add(grad_context, gc)
  streams = (a, b, ga, gb)
  for i in reversed(range(m, n)):
    streams, grads[i], gc = _backward_step(fns[i], params[i], keys[i], unrolled[i - m],
                                           *streams, context, consts, known(i))
    grad_context = add(grad_context, gc)

  def group_step(streams, acc, group_params, group_keys, group_replays, first):
    group_grads = [None] * period
    for k in reversed(range(period)):
      streams, group_grads[k], gc = _backward_step(
          fns[k], group_params[k], group_keys[k], group_replays[k], *streams, context, consts,
          known(k) if first else None)
      acc = add(acc, gc)
    return streams, acc, list(group_grads)

  if m:
    # Groups m / period - 1 ... 1 as a scan; the first group, which reads the kept inputs, after
    # it (unrolled).
    def body(carry, xs):
      streams, acc, group_grads = group_step(*carry, *xs, first=False)
      return (streams, acc), tuple(group_grads)

    xs = (_by_position(params[:m], period), _by_position(keys[:m], period), stacked)
    (streams, grad_context), scanned = jax.lax.scan(
        body, (streams, grad_context), jax.tree.map(lambda x: x[1:], xs), reverse=True)
    streams, grad_context, grads[:period] = group_step(
        streams, grad_context, *jax.tree.map(lambda x: x[0], xs), first=True)
    grads[period:m] = _unstack(scanned, m - period, period)
  _, _, ga, gb = streams
  return tuple(grads), ga, gb, grad_context, None, None


_reversible.defvjp(_reversible_fwd, _reversible_bwd)


def reversible_stack(fns: Sequence[ResidualFn], params: Sequence[Any], x1: jax.Array,
                     x2: jax.Array, *, keys: Sequence[jax.Array], context: Any = None,
                     consts: Any = None, memory_efficient: bool = True,
                     period: int | None = None, keep_last: int = 0):
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
    period: when `fns[i + period]` is `fns[i]` (applied to other parameters of the same
      structure) for every i, the stack runs as a `lax.scan` over the groups of `period`
      functions (at least two groups; otherwise unrolled): one group's code, compiled once,
      whatever the depth. The functions `fns[period:]` are then never called.
    keep_last: the last `keep_last` functions keep their forward activations for the backward
      pass, which starts with them, instead of running their forward again there (counted back
      from the last, stopping at a per-position, chunked function): they are held from the end
      of the forward pass, where little else is live, to the start of the backward pass.
  Returns:
    `(y1, y2, replays)`: the output streams and each function's replay data.
  """
  if not (len(fns) == len(params) == len(keys)):
    raise ValueError(f'reversible_stack: got {len(fns)} functions, {len(params)} parameter '
                     f'trees and {len(keys)} keys; pass one of each per function')
  fns, params, keys = tuple(fns), tuple(params), tuple(keys)
  if memory_efficient:
    return _reversible(fns, period, keep_last, params, x1, x2, context, consts, keys)
  if _scanned(fns, period):
    y1, y2, stacked = _forward_scan(fns, period, params, x1, x2, context, consts, keys)
    return y1, y2, tuple(_unstack(stacked, len(fns), period))
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
