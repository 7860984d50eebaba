"""Helpers the experiment scripts share: machine description, timing, memory checks, JSON,
tables, plots, W&B logging and an op-level profile of a compiled function.

Nothing here imports `wandb` or `matplotlib` at module level: W&B is optional (off by default)
and plotting runs with the non-interactive Agg backend.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from reformer_jax.machine import _meminfo, machine_info, machine_name, total_ram_bytes  # noqa: F401

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GIB = 2 ** 30
WANDB_CHOICES = ('disabled', 'auto', 'offline', 'online')


# ---------------------------------------------------------------------------------------------
# Flags.

def parse_size(text: str) -> int:
  """'4096', '4K', '64k', '1M' -> int (K = 1024, M = 1024 ** 2)."""
  text = text.strip()
  scale = {'k': 2 ** 10, 'm': 2 ** 20}.get(text[-1:].lower(), 1)
  digits = text[:-1] if scale != 1 else text
  try:
    value = int(digits) * scale
  except ValueError:
    raise ValueError(f'{text!r} is not a size: use an int or a K/M suffix (4096, 4K, 1M)') from None
  if value < 1:
    raise ValueError(f'{text!r}: sizes must be positive')
  return value


def size_list(values: Iterable[str]) -> list[int]:
  """Flattens `['1K', '2K,4K']` into `[1024, 2048, 4096]` (space or comma separated)."""
  return [parse_size(part) for value in values for part in str(value).split(',') if part]


def add_wandb_flag(parser, what: str = 'the table and plot') -> None:
  """`--wandb [MODE]`: log `what` to W&B; off by default, bare `--wandb` means 'auto'."""
  parser.add_argument('--wandb', nargs='?', const='auto', default='disabled', choices=WANDB_CHOICES,
                      help=f"log {what} to W&B (bare --wandb: 'auto', offline without a key)")


def command_line(module: str, argv: Sequence[str] | None) -> str:
  """The shell command that reruns `python -m <module>` with these arguments (for the JSON)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  return shlex.join(['python', '-m', module, *argv])


def human(n: int) -> str:
  """1024 -> '1K', 1048576 -> '1M', 1536 -> '1536'."""
  for unit, suffix in ((2 ** 20, 'M'), (2 ** 10, 'K')):
    if n >= unit and n % unit == 0:
      return f'{n // unit}{suffix}'
  return str(n)


# ---------------------------------------------------------------------------------------------
# The machine (described by reformer_jax.machine, which evaluate.py shares).

def machine_title(machine: Mapping[str, Any]) -> str:
  """'cpu: AMD EPYC, 2 cores, 23 GiB, JAX 0.10.2' for plot titles and tables."""
  if machine['backend'] == 'cpu':
    where = f"{machine['cpu']}, {machine['cpu_cores']} cores, {machine['ram_bytes'] / GIB:.0f} GiB"
  else:
    where = f"{machine['device_count']}x {machine['device']}"
  return f"{machine['backend']}: {where}, JAX {machine['jax_version']}"


# ---------------------------------------------------------------------------------------------
# Memory.

def available_memory_bytes() -> int:
  """Memory a computation on the default device may still take.

  An accelerator: its allocator's limit less what is in use. The CPU: the kernel's MemAvailable
  (free memory plus reclaimable caches; other processes on the machine count against it).
  """
  stats = jax.devices()[0].memory_stats()
  if stats and 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0)
  available = _meminfo('MemAvailable')
  if available is not None:
    return available
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """`compiled.memory_analysis()` in bytes; `peak` = arguments + outputs + temporaries - aliased."""
  argument: int
  output: int
  temp: int
  alias: int

  @property
  def peak(self) -> int:
    return self.argument + self.output + self.temp - self.alias

  @classmethod
  def of(cls, compiled) -> 'CompiledMemory':
    m = compiled.memory_analysis()
    return cls(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
               temp=int(m.temp_size_in_bytes), alias=int(m.alias_size_in_bytes))


def child_env(**overrides: str) -> dict[str, str]:
  """This process's environment for a `python -m experiments.…` child: the repository first on
  PYTHONPATH (the experiments are not an installed package), then `overrides`."""
  path = os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get('PYTHONPATH')] if p])
  return dict(os.environ, PYTHONPATH=path, **overrides)


def fits(needed: int, *, margin: float, limit: int | None = None) -> tuple[bool, str | None]:
  """Whether `needed` bytes fit in `margin` times the available memory (and in `limit`, if
  given: e.g. 16 GiB to ask what an accelerator of that size would hold), and a note if not."""
  available = available_memory_bytes()
  if needed > margin * available:
    return False, (f'skipped: needs {needed / GIB:.2f} GiB (compiled memory analysis), more than '
                   f'{margin:.0%} of the {available / GIB:.2f} GiB available on {machine_name()}')
  if limit is not None and needed > limit:
    return False, (f'skipped: needs {needed / GIB:.3f} GiB (compiled memory analysis), more '
                   f'than the {limit / GIB:.3f} GiB limit')
  return True, None


def is_resource_exhausted(err: BaseException) -> bool:
  """True for XLA's out-of-memory error (`RESOURCE_EXHAUSTED`), false for every other failure."""
  return isinstance(err, jax.errors.JaxRuntimeError) and 'RESOURCE_EXHAUSTED' in str(err)


def out_of_memory_note(err: BaseException) -> str:
  first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return f'skipped: out of memory while running ({first[:200]})'


# ---------------------------------------------------------------------------------------------
# Timing.

def block(tree) -> None:
  jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, 'block_until_ready') else x, tree)


def time_call(fn: Callable[[], Any]) -> float:
  """Seconds of one call of `fn`, waiting for its results."""
  start = time.perf_counter()
  block(fn())
  return time.perf_counter() - start


def median(samples: Sequence[float]) -> float | None:
  return statistics.median(samples) if samples else None


def spread(values: Sequence[float]) -> float | None:
  """max / min - 1 of positive values (0.3 = the largest is 30% above the smallest)."""
  values = [v for v in values if v]
  return max(values) / min(values) - 1 if values else None


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> tuple[float, list[float]]:
  """Median float32 FLOP/s of a `[size, size] @ [size, size]` matmul, and the per-call samples."""
  a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul).lower(a, b).compile()
  block(matmul(a, b))  # warm-up
  flops = 2 * size ** 3
  samples = [flops / time_call(lambda: matmul(a, b)) for _ in range(repeats)]
  return statistics.median(samples), samples


# ---------------------------------------------------------------------------------------------
# Results.

def write_json(path: str | os.PathLike[str], obj: Any) -> pathlib.Path:
  """Writes `obj` as indented JSON through a temporary file, so a crash leaves the old file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(obj, indent=1, allow_nan=True) + '\n', encoding='utf-8')
  os.replace(tmp, path)
  return path


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """A GitHub markdown table of `rows` (dicts) over `columns`; None prints as '-'."""
  def cell(v):
    if v is None:
      return '-'
    if isinstance(v, float):
      return f'{v:.4g}'
    return str(v)
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |' for r in rows]
  return '\n'.join(lines)


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def log_to_wandb(mode: str, *, job: str, config: Mapping[str, Any], rows: Sequence[Mapping],
                 columns: Sequence[str], images: Mapping[str, os.PathLike[str] | str],
                 summary: Mapping[str, Any]) -> str | None:
  """Logs a results table, plots and summary numbers to one W&B run; returns its mode or None.

  `mode`: 'disabled' (nothing is imported), 'auto' (online with an API key, else offline, as
  `reformer_jax.tracking.wandb_mode` decides), 'offline' or 'online'. An offline run is saved
  under `$WANDB_DIR` (default ./wandb) for `wandb sync`.
  """
  if mode == 'disabled':
    return None
  from reformer_jax import tracking  # pylint: disable=import-outside-toplevel
  mode = tracking.wandb_mode(mode)
  if mode == 'disabled':
    return None
  import wandb  # pylint: disable=import-outside-toplevel

  run = wandb.init(project='reformer-jax', job_type=job, mode=mode, config=dict(config),
                   tags=['experiments', job], dir=os.environ.get('WANDB_DIR'))
  table = wandb.Table(columns=list(columns),
                      data=[[_wandb_cell(r.get(c)) for c in columns] for r in rows])
  run.log({f'{job}/table': table,
           **{f'{job}/{name}': wandb.Image(str(path)) for name, path in images.items()}})
  for key, value in summary.items():
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
      run.summary[f'{job}/{key}'] = value
  run.finish()
  return mode


def _wandb_cell(v):
  return v if v is None or isinstance(v, (int, float, str, bool)) else str(v)


# ---------------------------------------------------------------------------------------------
# Op-level profile of one compiled function.

_OPCODES = {'dot': 'matmul', 'convolution': 'matmul', 'sort': 'sort', 'gather': 'gather',
            'scatter': 'scatter', 'reduce': 'reduce', 'concatenate': 'concatenate'}
_MOVES = {'copy', 'slice', 'bitcast', 'transpose', 'pad', 'iota', 'broadcast', 'reshape',
          'dynamic-slice', 'dynamic-update-slice', 'tuple', 'get-tuple-element', 'wrapped'}


def _hlo_lines(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
  """(instruction name -> its line, computation name -> its body) of compiled HLO text."""
  lines, bodies, current = {}, {}, None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    if stripped.endswith('{') and ' = ' not in stripped:  # a computation's header
      words = stripped.split()
      current = (words[1] if words[0] == 'ENTRY' else words[0]).lstrip('%')
      bodies[current] = ''
    elif current is not None and ' = ' in stripped:
      bodies[current] += stripped + '\n'
      lines.setdefault(stripped.removeprefix('ROOT ').split(' = ')[0].lstrip('%'), stripped)
  return lines, bodies


def _opcode(line: str) -> str:
  """'fusion' from '%x = f32[2]{0} fusion(...)' (tuple shapes '(s32[2], s32[2]) sort(' too)."""
  rhs = line.split(' = ', 1)[1] if ' = ' in line else ''
  if rhs.startswith('('):  # skip a tuple shape
    depth = 0
    for i, ch in enumerate(rhs):
      depth += {'(': 1, ')': -1}.get(ch, 0)
      if depth == 0:
        rhs = 'tuple' + rhs[i + 1:]
        break
  match = re.match(r'\S+\s+([\w\-]+)\(', rhs)
  return match.group(1) if match else 'unknown'


def categorize(name: str, line: str, bodies: Mapping[str, str]) -> str:
  """What an HLO op mostly does: matmul, sort, gather, scatter, reduce, concatenate,
  elementwise (masks, exp, arithmetic), copy (transposes, slices, pads) or chunk_kernel (the
  CPU LSH chunk kernel's FFI calls; its counting sort is a sort)."""
  opcode = _opcode(line)
  if opcode == 'custom-call':
    target = re.search(r'custom_call_target="([^"]*)"', line)
    target = target.group(1) if target else ''
    return 'sort' if 'sort' in target else 'chunk_kernel' if 'chunk_attention' in target else (
        'elementwise')
  if opcode != 'fusion':
    return _OPCODES.get(opcode, 'copy' if opcode in _MOVES else 'elementwise')
  if 'kind=kCustom' in line:  # a library fusion (XNNPACK/YNNPACK): look inside
    called = line.split('calls=', 1)[1].split(',')[0].strip().lstrip('%')
    ops = {_opcode(l) for l in bodies.get(called, '').splitlines()}
    return 'matmul' if 'dot' in ops else 'reduce' if 'reduce' in ops else 'elementwise'
  words = set(name.split('.')[0].split('_')) - {'fusion'}
  for word, category in _OPCODES.items():
    if word in words:
      return category
  return 'copy' if words <= _MOVES else 'elementwise'


def op_profile(compiled, call: Callable[[], Any], *, steps: int = 3) -> list[dict[str, Any]]:
  """Per-op wall time (ms per call, summed over threads) of `call`, a run of `compiled`.

  Traces `steps` calls with `jax.profiler` and reads the trace back with
  `jax.profiler.ProfileData`; each op is named by its HLO instruction and given a category
  from its (fused) computation and timed as `_op_rows` says (matrix products to their
  completion markers). Sorted by time, largest first.
  """
  import tempfile  # pylint: disable=import-outside-toplevel
  lines, bodies = _hlo_lines(compiled.as_text())
  block(call())
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      for _ in range(steps):
        block(call())
    path = next(pathlib.Path(tmp).rglob('*.xplane.pb'))
    data = jax.profiler.ProfileData.from_file(str(path))
    events = [(event.name, event.start_ns, event.duration_ns) for plane in data.planes
              for line in plane.lines if line.name != 'python' for event in line.events]
  return _op_rows(events, lines, bodies, steps)


def _op_rows(events, lines: Mapping[str, str], bodies: Mapping[str, str],
             steps: int) -> list[dict[str, Any]]:
  """`op_profile`'s rows from trace events `(name, start_ns, duration_ns)`.

  A matrix product lasts from its event's start to its completion marker `end: <op>` (the k-th
  marker closes the k-th execution): XLA:CPU hands a large one to Eigen's thread pool, whose
  work is not in the trace, and closes its event at the hand-off, long before the product is
  done. Any other op lasts its events' durations (for a loop fusion split across threads, the
  parts in the trace): its completion marker can come much later only because the op waited
  for a thread.
  """
  starts: dict[str, list[tuple[int, int]]] = {}
  ends: dict[str, list[int]] = {}
  for name, start, duration in events:
    if name.startswith('end: ') and name[5:] in lines:
      ends.setdefault(name[5:], []).append(start + duration)
    elif name in lines:  # HLO ops only (not the executor's own spans)
      starts.setdefault(name, []).append((start, start + duration))
  rows = []
  for name, runs in starts.items():
    category = categorize(name, lines[name], bodies)
    marks = sorted(ends.get(name, [])) if category == 'matmul' else []
    runs.sort()
    total = 0
    for k, (start, stop) in enumerate(runs):
      total += max(stop, marks[k] if k < len(marks) else stop) - start
    rows.append({'op': name, 'ms': total / steps / 1e6, 'category': category,
                 'hlo': lines[name][:200]})
  return sorted(rows, key=lambda r: -r['ms'])


def profile_summary(rows: list[dict[str, Any]], top: int = 40) -> dict[str, Any]:
  """`{'total_ms', 'categories_ms' (largest first), 'ops' (the `top` largest)}` of `op_profile`
  rows, printed as a table too."""
  total = sum(row['ms'] for row in rows)
  categories: dict[str, float] = {}
  for row in rows:
    categories[row['category']] = categories.get(row['category'], 0.0) + row['ms']
  categories = dict(sorted(categories.items(), key=lambda kv: -kv[1]))
  print(f'{total:.1f} ms of ops per call (summed over threads)')
  for name, ms in categories.items():
    print(f'  {name:>12}: {ms:8.1f} ms {ms / max(total, 1e-9):6.1%}')
  for row in rows[:10]:
    print(f"  {row['ms']:8.1f} ms {row['category']:>12} {row['hlo'][:110]}")
  return {'total_ms': total, 'categories_ms': categories, 'ops': rows[:top]}
