"""Keeping freed host memory mapped, so that XLA:CPU's buffers are not faulted in every step.

XLA:CPU allocates an execution's temporaries as one block (209 MB for the 6-layer, 4K-token
training step of `experiments/peers.py`), and its outputs, from its worker threads. glibc's
malloc serves a block that large from a thread's arena with a fresh `mmap` and unmaps it when it
is freed, so every step touches its temporaries' pages for the first time: 51,000 page faults a
step there. In side checks on the 2-core CPU here (not kept): first-touching a fresh 209 MB
mapping took 85 ms; the LSH chunk kernel alone at 16K tokens, whose outputs were fresh pages
each call, ran 30% faster with the setting below; in the whole 1.3 s peers step the difference
was within the machine's noise.

`keep_freed_memory()` sets glibc's malloc to one arena, no `mmap`-backed blocks and no trimming:
a freed block stays in the heap, mapped, and the next step gets it back with no faults. The price
is that memory freed by the process stays with it (its resident size stays at its peak) rather
than going back to the system, which a training job reaches again every step anyway.

Memory kept this way is only as large as the steps' peak if each step's temporaries are freed
before the next step allocates its own. With JAX's asynchronous CPU dispatch they often were not:
a step's outputs are ready, and Python dispatches the next step, before the runtime has freed the
finished step's temporaries; the next block then came from fresh heap and both stayed resident.
In the peers step above (side checks here, not kept) 3 of 4 processes grew to 0.85-1.0 GiB
instead of 0.66 GiB, at any step, in one of them twice. So `keep_freed_memory()` also turns off
JAX's CPU asynchronous dispatch (`jax_cpu_enable_async_dispatch`): a CPU computation runs inline
and has freed its temporaries when the call returns (4 of 4 processes at 0.66 GiB, step times
within the noise). Accelerator backends are unaffected.

Process-wide, so it is called by the command-line entry points (training, evaluation, chat, the
experiments) rather than on import; call it before the first JAX computation, since threads that
have already made their own arenas keep them and the CPU client reads the dispatch setting when
it starts. It changes JAX's setting only if JAX is imported (a process running no JAX does not
load it); if JAX is imported after the first call, call it again then.
`REFORMER_JAX_KEEP_FREED_MEMORY=0` turns both off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

from absl import logging

ENV = 'REFORMER_JAX_KEEP_FREED_MEMORY'
ASYNC_DISPATCH = 'jax_cpu_enable_async_dispatch'  # JAX's setting turned off with the malloc ones
# mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def enabled() -> bool:
  """Whether `keep_freed_memory` may act: `REFORMER_JAX_KEEP_FREED_MEMORY` is 1 (default) or 0."""
  value = os.environ.get(ENV, '1').strip()
  if value not in ('0', '1'):
    raise ValueError(f'{ENV}={value!r}: set it to 1 (keep freed memory mapped, the default) or 0 '
                     f'(leave malloc as it is)')
  return value == '1'


def applied() -> bool:
  """Whether `keep_freed_memory` has applied its settings in this process."""
  return _malloc_settings.cache_info().currsize > 0 and _malloc_settings()


def keep_freed_memory() -> bool:
  """Has glibc's malloc keep freed memory mapped, and JAX run CPU computations inline (see the
  module docstring). Safe to call more than once.

  Returns:
    True if the malloc settings were applied; False where they do not apply (not Linux with
    glibc) or are turned off by `REFORMER_JAX_KEEP_FREED_MEMORY=0`.
  """
  applied = _malloc_settings()
  if applied and 'jax' in sys.modules:
    sys.modules['jax'].config.update(ASYNC_DISPATCH, False)
  return applied


@functools.cache
def _malloc_settings() -> bool:
  if not enabled() or not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement  (glibc only)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  applied = all([mallopt(param, value) == 1 for param, value in _SETTINGS])
  if not applied:
    logging.warning('mallopt refused some of %s; freed host memory may be unmapped', _SETTINGS)
  return applied
