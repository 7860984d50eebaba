"""This process's resident memory, read from Linux `/proc`: current, peak, and a peak reset.

Kept apart from `experiments.common` because it imports neither JAX nor anything else heavy: the
PyTorch processes of `experiments.peers` measure themselves with it, and their peak must not
include a JAX runtime they never use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time


def proc_status(field: str) -> int:
  """A `/proc/self/status` size field in bytes: 'VmRSS' (resident now), 'VmHWM' (its peak)."""
  with open('/proc/self/status', encoding='utf-8') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1]) * 1024
  raise KeyError(f'{field} is not in /proc/self/status (Linux only)')


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
  try:
    with open('/proc/self/clear_refs', 'w', encoding='utf-8') as f:
      f.write('5')
    return True
  except OSError:
    return False


def trim_allocator() -> bool:
  """Returns heap memory that glibc's malloc keeps after `free` to the system (`malloc_trim(0)`),
  so a later peak counts what is in use, not what compilation or a warm-up freed; False where
  the C library is not glibc."""
  name = ctypes.util.find_library('c')
  try:
    trim = ctypes.CDLL(name).malloc_trim
  except (OSError, AttributeError, TypeError):
    return False
  trim(0)
  return True


class RssSampler:
  """Polls this process's resident set every `interval_s` on a thread; `peak` is the largest.

  Complements VmHWM, which the kernel only refreshes at some events (memory released with
  MADV_DONTNEED can leave it below the true peak); XLA and PyTorch run a step on their own
  threads, so the poller keeps running meanwhile.
  """

  def __init__(self, interval_s: float = 0.002):
    self.interval_s, self.peak = interval_s, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._page = os.sysconf('SC_PAGE_SIZE')

  def _rss(self) -> int:
    with open('/proc/self/statm', encoding='utf-8') as f:
      return int(f.read().split()[1]) * self._page

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._rss())
      time.sleep(self.interval_s)

  def __enter__(self) -> 'RssSampler':
    self.peak = self._rss()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._rss())
