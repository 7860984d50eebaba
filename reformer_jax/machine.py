"""What a result was measured on: backend, device, CPU, RAM, library versions, git commit, time.

Every result file of `experiments/` and `reformer_jax.evaluate` records `machine_info()`.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
from typing import Any

import jax

from reformer_jax import host_memory

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


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
