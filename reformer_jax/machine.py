"""What a result was measured on: backend, device, CPU, RAM, library versions, git commit, time.

Every result file of `experiments/` and `reformer_jax.evaluate` records `machine_info()`.
"""

from __future__ import annotations

import datetime
import functools
import os
import pathlib
import platform
import subprocess
from typing import Any

import jax

from reformer_jax import host_memory

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo ({} where unreadable)."""
  fields: dict[str, str] = {}
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if not line.strip():
          break
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


def _cpu_model() -> str:
  return _cpuinfo().get('model name') or platform.processor() or platform.machine()


def cpu_id() -> str | None:
  """'family/model/stepping' of an x86 CPU (virtual machines often name it only 'AMD EPYC':
  '25/1/1' is Zen 3, '25/17/...' Zen 4), None elsewhere."""
  info = _cpuinfo()
  parts = [info.get(k) for k in ('cpu family', 'model', 'stepping')]
  return '/'.join(parts) if all(parts) else None  # type: ignore[arg-type]


def cpu_flags() -> str:
  """The CPU's feature flags as /proc/cpuinfo lists them (x86 `flags`, ARM `Features`), or ''."""
  info = _cpuinfo()
  return info.get('flags') or info.get('Features') or ''


def vector_isa() -> str | None:
  """The widest vector instruction set the CPU reports: 'avx512f', 'avx2', 'avx', 'sse4_2',
  'asimd' (ARM), or None where unreadable. The LSH CPU kernel's vector width follows it."""
  flags = set(cpu_flags().split())
  return next((isa for isa in ('avx512f', 'avx2', 'avx', 'sse4_2', 'asimd') if isa in flags),
              None)


def _git_commit() -> str | None:
  """HEAD of the repository (read only), with '+dirty' when the tree has local changes."""
  try:
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=_REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                           cwd=_REPO_ROOT, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ('+dirty' if dirty.strip() else '')


def machine_info() -> dict[str, Any]:
  """What a result was measured on: backend, device, CPU, RAM, library versions, commit, time."""
  import flax  # pylint: disable=import-outside-toplevel
  import jaxlib  # pylint: disable=import-outside-toplevel

  device = jax.devices()[0]
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return {
      'name': machine_name(),
      'backend': jax.default_backend(),
      'device': device.device_kind,
      'device_count': jax.device_count(),
      'cpu': _cpu_model(),
      'cpu_id': cpu_id(),
      'cpu_vector_isa': vector_isa(),
      'cpu_cores': cpus,
      'ram_bytes': total_ram_bytes(),
      'device_memory_bytes': (device.memory_stats() or {}).get('bytes_limit'),
      'jax_version': jax.__version__,
      'jaxlib_version': jaxlib.__version__,
      'flax_version': flax.__version__,
      'python_version': platform.python_version(),
      'platform': platform.platform(),
      'git_commit': _git_commit(),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      # host_memory.keep_freed_memory: freed host memory kept mapped (no page faults per step)
      'keeps_freed_memory': host_memory.applied(),
      # and CPU computations run inline (their temporaries freed before the call returns)
      'cpu_async_dispatch': bool(jax.config.read(host_memory.ASYNC_DISPATCH)),
  }


def machine_name() -> str:
  """A short tag for file names and plot titles: 'cpu', 'gpu-h100-80gb-hbm3', 'tpu-v4' ..."""
  backend = jax.default_backend()
  if backend == 'cpu':
    return 'cpu'
  kind = jax.devices()[0].device_kind.lower().replace('nvidia ', '')
  return f'{backend}-' + '-'.join(kind.split())


def _meminfo(field: str) -> int | None:
  try:
    with open('/proc/meminfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def total_ram_bytes() -> int:
  return _meminfo('MemTotal') or os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
