"""`host_memory.keep_freed_memory`: XLA:CPU's large buffers stop being faulted in every call."""

import os
import subprocess
import sys

import pytest

from reformer_jax import host_memory

# Page faults per call of a jitted function with a 64 MB intermediate, after warm-up: the
# fewest over a few windows of calls (the heap can still grow now and then while it settles).
PROBE = r'''
import resource, sys
from reformer_jax import host_memory
kept = host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((256, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x.T @ x).sum(0))  # a [4096, 4096] float32 intermediate
for _ in range(10):
  f(x).block_until_ready()
windows = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(3):
    f(x).block_until_ready()
  windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
print(kept, min(windows))
'''


def _probe(keep: str) -> tuple[bool, float]:
  env = dict(os.environ, **{host_memory.ENV: keep})
  out = subprocess.run([sys.executable, '-c', PROBE], env=env, capture_output=True, text=True,
                       check=True, timeout=300).stdout.split()
  return out[-2] == 'True', float(out[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_keep_freed_memory_stops_page_faults():
  kept, faults = _probe('1')
  if not kept:
    pytest.skip('not glibc: keep_freed_memory does not apply')
  off, faults_off = _probe('0')
  assert not off
  if faults_off < 4096:  # 16 MB a call
    pytest.skip(f'this machine does not fault XLA:CPU buffers in each call ({faults_off:.0f})')
  assert faults < 0.1 * faults_off, (faults, faults_off)


# After each call of a jitted function with a 64 MB temporary returns: how much more of glibc's
# heap is in use than when the runtime has certainly freed everything (a pause after a call).
INLINE_PROBE = r"""
import ctypes, time
from reformer_jax import host_memory
kept = host_memory.keep_freed_memory()  # JAX not imported yet: the malloc settings only
import jax, jax.numpy as jnp
before = jax.config.read(host_memory.ASYNC_DISPATCH)
host_memory.keep_freed_memory()  # JAX imported: its CPU dispatch too
class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in
              'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]
libc = ctypes.CDLL('libc.so.6')
libc.mallinfo2.restype = Info
x = jnp.ones((256, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.tanh(x.T @ x).sum(0))  # a [4096, 4096] float32 temporary
f(x).block_until_ready()
time.sleep(0.2)
base = libc.mallinfo2().uordblks
held = []
for _ in range(20):
  f(x).block_until_ready()
  held.append(libc.mallinfo2().uordblks - base)
print(kept, before, jax.config.read(host_memory.ASYNC_DISPATCH), max(held))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_keep_freed_memory_runs_cpu_computations_inline():
  """With freed memory kept, a step's temporaries must be freed before the next step allocates
  its own (else both stay resident): JAX's CPU dispatch is turned off, once JAX is imported."""
  out = subprocess.run([sys.executable, '-c', INLINE_PROBE], capture_output=True, text=True,
                       check=True, timeout=300, env=dict(os.environ, **{host_memory.ENV: '1'}))
  kept, before, after, held = out.stdout.split()[-4:]
  if kept != 'True':
    pytest.skip('not glibc: keep_freed_memory does not apply')
  assert (before, after) == ('True', 'False')  # set by the second call, after JAX's import
  assert int(held) < 8 * 2**20, f'{int(held) / 2**20:.0f} MB still held after a call returned'


def test_env_values(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, 'yes')
  with pytest.raises(ValueError, match=host_memory.ENV):
    host_memory.enabled()
  monkeypatch.setenv(host_memory.ENV, '0')
  assert not host_memory.enabled()
  monkeypatch.delenv(host_memory.ENV)
  assert host_memory.enabled()
