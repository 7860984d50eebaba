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


def test_env_values(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, 'yes')
  with pytest.raises(ValueError, match=host_memory.ENV):
    host_memory.enabled()
  monkeypatch.setenv(host_memory.ENV, '0')
  assert not host_memory.enabled()
  monkeypatch.delenv(host_memory.ENV)
  assert host_memory.enabled()
